"""The waypoint deployment controller: a Gateway of a waypoint class becomes a running waypoint.

For each Gateway with `gatewayClassName: istio-waypoint` (or `meshway-waypoint`) the control
plane creates, in the Gateway's namespace and under the Gateway's name, what Istio's deployment
controller creates on Kubernetes:

- a ServiceAccount (unless the namespace already has one of that name: then it is used, and
  left alone when the waypoint goes),
- a Workload per replica running `python -m meshway.waypoint --gateway <ns>/<name>`, with ports
  15008 (`hbone`) and 15020 (`metrics`): replica 0 is named like the Gateway, the others
  `<name>-1`, `<name>-2`, ... (the `meshway.io/replicas` annotation, default 1), and
- a Service selecting those Workloads on the same two ports, with a cluster IP,

and keeps the Gateway's status (its address, `Accepted`, `Programmed`) up to date.

A new replica goes to the schedulable node that runs the fewest replicas of the same Gateway,
then the fewest workloads; a placed replica stays where it is. Scaling down removes the
highest indexes. See docs/decisions/0009-waypoint-replicas.md.

What it creates carries the annotation `meshway.io/managed-by: Gateway/<name>`. Admission
refuses a user's change to such an object, and deleting the Gateway deletes them in the same
transaction. The controller is level-triggered: `sync` computes the desired objects from the
store and writes only what differs, so a second run, a run after a restart, or an update of the
Gateway that leaves the desired objects as they were changes nothing and restarts nothing.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from meshway.config.errors import ConfigError
from meshway.config.labels import (
    ANNOTATION_MANAGED_BY,
    LABEL_DATAPLANE_MODE,
    LABEL_GATEWAY_NAME,
    LABEL_PROXY_MODE,
    MAX_WAYPOINT_REPLICAS,
    PROXY_MODE_WAYPOINT,
    WAYPOINT_GATEWAY_CLASSES,
)
from meshway.config.model import (
    Gateway,
    GatewayAddress,
    GatewayStatus,
    Node,
    ObjectKey,
    Resource,
    Service,
    ServiceAccount,
    StatusCondition,
    Workload,
)
from meshway.config.store import ApplyOutcome, ResourceVersionTooOld, SqliteStore

if TYPE_CHECKING:
    from meshway.controlplane.admission import Admission

log = logging.getLogger(__name__)

HBONE_PORT = 15008
METRICS_PORT = 15020
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
# The kinds the controller creates for a waypoint, named like its Gateway (Workloads of
# replicas 1.. with a suffix, see `replica_name`).
MANAGED_KINDS = (ServiceAccount.KIND, Workload.KIND, Service.KIND)
# The kinds whose name a waypoint takes: a user's object of that name cannot coexist with it.
EXCLUSIVE_KINDS = (Workload.KIND, Service.KIND)


def is_waypoint(obj: Resource | None) -> bool:
    return isinstance(obj, Gateway) and obj.spec.gateway_class_name in WAYPOINT_GATEWAY_CLASSES


def managed_by_value(gateway_name: str) -> str:
    return f"Gateway/{gateway_name}"


def owner_of(obj: Resource) -> ObjectKey | None:
    """The Gateway that owns `obj` (same namespace), if the control plane created it for one."""
    value = obj.metadata.annotations.get(ANNOTATION_MANAGED_BY)
    if value is None:
        return None
    kind, _, name = value.partition("/")
    if kind != Gateway.KIND or not name:
        return None
    return ObjectKey(Gateway.KIND, obj.key.namespace, name)


def replica_name(gateway_name: str, index: int) -> str:
    """The Workload of replica `index`: the Gateway's name for 0 (as before replicas existed),
    `<name>-<index>` for the others."""
    return gateway_name if index == 0 else f"{gateway_name}-{index}"


def replica_candidates(workload_name: str) -> list[tuple[str, int]]:
    """The (Gateway name, replica index) pairs whose replica would be named `workload_name`."""
    found = [(workload_name, 0)]
    base, dash, suffix = workload_name.rpartition("-")
    if dash and base and suffix.isascii() and suffix.isdigit() and suffix == str(int(suffix)):
        index = int(suffix)
        if 0 < index < MAX_WAYPOINT_REPLICAS:
            found.append((base, index))
    return found


def owned_keys(gateway: ObjectKey) -> list[ObjectKey]:
    """Where the objects of a waypoint may live: its namespace, its name (and for Workloads
    every replica's name), the managed kinds."""
    keys = [ObjectKey(kind, gateway.namespace, gateway.name) for kind in MANAGED_KINDS]
    keys += [
        ObjectKey(Workload.KIND, gateway.namespace, replica_name(gateway.name, index))
        for index in range(1, MAX_WAYPOINT_REPLICAS)
    ]
    return keys


def waypoint_labels(gateway_name: str) -> dict[str, str]:
    """The labels of a waypoint's pod: selected by its Service, not captured by the node proxy
    (a waypoint speaks HBONE itself), and given the node's credential by the runtime."""
    return {
        LABEL_GATEWAY_NAME: gateway_name,
        LABEL_DATAPLANE_MODE: "none",
        LABEL_PROXY_MODE: PROXY_MODE_WAYPOINT,
    }


def waypoint_command(
    namespace: str, name: str, python: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
) -> list[str]:
    command = [python, "-m", "meshway.waypoint", "--gateway", f"{namespace}/{name}"]
    if cluster_domain != DEFAULT_CLUSTER_DOMAIN:
        command += ["--cluster-domain", cluster_domain]
    return command


def desired_objects(
    gateway: Gateway,
    nodes: str | Sequence[str | None] | None,
    *,
    python: str,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
    service_account: bool = True,
) -> list[Resource]:
    """What a waypoint Gateway stands for: its ServiceAccount (unless the user provides it), its
    Service, and the Workload of replica i on `nodes[i]` (none while that is None). A single
    node (or None) stands for one replica."""
    placement: Sequence[str | None] = [nodes] if nodes is None or isinstance(nodes, str) else nodes
    ns = gateway.key.namespace
    name = gateway.metadata.name
    meta = {
        "name": name,
        "namespace": ns,
        "labels": {LABEL_GATEWAY_NAME: name},
        "annotations": {ANNOTATION_MANAGED_BY: managed_by_value(name)},
    }
    objects: list[Resource] = []
    if service_account:
        objects.append(ServiceAccount.model_validate({"metadata": meta}))
    objects.append(
        Service.model_validate(
            {
                "metadata": meta,
                "spec": {
                    "selector": {LABEL_GATEWAY_NAME: name},
                    "ports": [
                        {
                            "name": "mesh",
                            "port": HBONE_PORT,
                            "targetPort": HBONE_PORT,
                            "appProtocol": "hbone",
                        },
                        {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT},
                    ],
                },
            }
        )
    )
    for index, node in enumerate(placement):
        if node is None:
            continue
        objects.append(
            Workload.model_validate(
                {
                    "metadata": {
                        **meta,
                        "name": replica_name(name, index),
                        "labels": waypoint_labels(name),
                    },
                    "spec": {
                        "serviceAccountName": name,
                        "nodeName": node,
                        "command": waypoint_command(ns, name, python, cluster_domain),
                        "ports": [
                            {"name": "hbone", "containerPort": HBONE_PORT},
                            {"name": "metrics", "containerPort": METRICS_PORT},
                        ],
                    },
                }
            )
        )
    return objects


def schedulable_nodes(nodes: Iterable[Resource]) -> list[str]:
    """Nodes that can take a pod (they have a pod CIDR and are not cordoned), by name."""
    return sorted(
        n.metadata.name
        for n in nodes
        if isinstance(n, Node) and n.status.pod_cidr and not n.spec.unschedulable
    )


def choose_node(nodes: Iterable[Resource], workloads: Iterable[Resource]) -> str | None:
    """The schedulable node that runs the fewest workloads; ties go to the first name, so
    that the same store gives the same choice."""
    (node,) = place_replicas(1, {}, nodes, workloads)
    return node


def place_replicas(
    replicas: int,
    placed: Mapping[int, str],
    nodes: Iterable[Resource],
    workloads: Iterable[Resource],
) -> list[str | None]:
    """The node of each replica 0..replicas-1.

    A replica in `placed` (index -> node) stays where it is. Each other one, lowest index
    first, goes to the schedulable node that runs the fewest replicas of this Gateway so far,
    then the fewest `workloads` (every Workload of the cluster, this Gateway's included), then
    the first name. None when no node is schedulable.
    """
    candidates = schedulable_nodes(nodes)
    load = Counter(w.spec.node_name for w in workloads if isinstance(w, Workload))
    ours = Counter(node for index, node in placed.items() if index < replicas)
    result: list[str | None] = []
    for index in range(replicas):
        node = placed.get(index)
        if node is None and candidates:
            node = min(candidates, key=lambda n: (ours[n], load[n], n))
            ours[node] += 1
            load[node] += 1
        result.append(node)
    return result


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def gateway_status(
    gateway: Gateway,
    service: Resource | None,
    workloads: Resource | Sequence[Resource] | None,
    problem: tuple[str, str] | None,
    now: str,
) -> GatewayStatus:
    """The Gateway API status of a waypoint Gateway.

    `Programmed` is True once one of the waypoint's replicas runs (the runtime reports the
    phase; the message says how many of how many); until then it says what is missing.
    `problem` is a (reason, message) that keeps it False. `lastTransitionTime` changes only
    when a condition's status does.
    """
    generation = gateway.metadata.generation
    addresses = []
    if isinstance(service, Service) and service.spec.cluster_ip and not service.spec.headless:
        addresses.append(GatewayAddress(type="IPAddress", value=service.spec.cluster_ip))
    if workloads is None or isinstance(workloads, Resource):
        workloads = [workloads] if workloads is not None else []
    replicas = [w for w in workloads if isinstance(w, Workload)]
    if problem is not None:
        reason, message = problem
        programmed = ("False", reason, message)
    elif not replicas:
        programmed = ("False", "Pending", "waiting for a schedulable node to run the waypoint on")
    elif gateway.replicas == 1 and len(replicas) == 1:
        (workload,) = replicas
        if workload.status.phase != "Running":
            programmed = (
                "False",
                "Pending",
                f"waypoint Workload {workload.display_name} on node '{workload.spec.node_name}' "
                f"is {workload.status.phase or 'Pending'}",
            )
        else:
            programmed = (
                "True",
                "Programmed",
                f"waypoint Workload {workload.display_name} runs on node "
                f"'{workload.spec.node_name}'",
            )
    else:
        programmed = _replicas_programmed(gateway.replicas, replicas)
    before = {c.type: c for c in gateway.status.conditions}
    conditions = []
    for ctype, (status, reason, message) in (
        ("Accepted", ("True", "Accepted", "")),
        ("Programmed", programmed),
    ):
        old = before.get(ctype)
        since = old.last_transition_time if old is not None and old.status == status else None
        conditions.append(
            StatusCondition.model_validate(
                {
                    "type": ctype,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": since or now,
                    "observedGeneration": generation,
                }
            )
        )
    return gateway.status.model_copy(update={"addresses": addresses, "conditions": conditions})


def _replicas_programmed(wanted: int, replicas: Sequence[Workload]) -> tuple[str, str, str]:
    """`Programmed` of a waypoint with several replicas: True while at least one runs."""
    running = [w for w in replicas if w.status.phase == "Running"]
    parts = [
        f"{w.display_name} on node '{w.spec.node_name}'"
        + ("" if w.status.phase == "Running" else f" is {w.status.phase or 'Pending'}")
        for w in sorted(replicas, key=lambda w: w.metadata.name)
    ]
    if len(replicas) < wanted:
        parts.append(f"{wanted - len(replicas)} waiting for a schedulable node")
    message = f"{len(running)} of {wanted} waypoint replicas run: " + ", ".join(parts)
    if running:
        return ("True", "Programmed", message)
    return ("False", "Pending", message)


@dataclass
class OwnedObjects:
    """What the control plane made for one waypoint Gateway and still holds."""

    service_account: Resource | None = None
    service: Resource | None = None
    # Replica index -> its Workload.
    workloads: dict[int, Workload] = field(default_factory=dict)

    def keys(self) -> list[ObjectKey]:
        found = [o.key for o in (self.service_account, self.service) if o is not None]
        return found + [w.key for w in self.workloads.values()]


class WaypointController:
    """Keeps one waypoint deployment per waypoint Gateway, from store events."""

    def __init__(
        self,
        store: SqliteStore,
        admission: Admission,
        *,
        cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
        python: str = sys.executable,
        clock: Callable[[], str] = _now,
    ) -> None:
        self.store = store
        self.admission = admission
        self.cluster_domain = cluster_domain
        self.python = python
        self.clock = clock

    # -- what to look at ---------------------------------------------------------------------

    def waypoint_gateways(self) -> list[ObjectKey]:
        return [g.key for g in self.store.list(Gateway.KIND) if is_waypoint(g)]

    def all_keys(self) -> set[ObjectKey]:
        """Every waypoint Gateway, and the owner of every managed object (to clean orphans)."""
        keys = set(self.waypoint_gateways())
        for kind in MANAGED_KINDS:
            for obj in self.store.list(kind):
                owner = owner_of(obj)
                if owner is not None:
                    keys.add(owner)
        return keys

    def affected(self, objects: Iterable[Resource]) -> set[ObjectKey]:
        """The Gateways whose waypoint may need work after `objects` changed.

        A Gateway itself; every waypoint Gateway when a Node changes (one may have been waiting
        for a node); the owner of a managed object (its phase or address feeds the status, and
        a removed one is recreated); the Gateway named like a Service, or whose replica would
        be named like a Workload (`<gw>` or `<gw>-<i>`: a conflict may have appeared or gone).
        Lookups are by key, so that a batch of ten thousand workloads costs at most twenty
        thousand dictionary lookups.
        """
        keys: set[ObjectKey] = set()
        nodes_changed = False
        for obj in objects:
            if isinstance(obj, Gateway):
                keys.add(obj.key)
            elif isinstance(obj, Node):
                nodes_changed = True
            elif obj.KIND in MANAGED_KINDS:
                owner = owner_of(obj)
                if owner is not None:
                    keys.add(owner)
                names = (
                    [name for name, _ in replica_candidates(obj.metadata.name)]
                    if isinstance(obj, Workload)
                    else [obj.metadata.name]
                )
                for name in names:
                    namesake = ObjectKey(Gateway.KIND, obj.key.namespace, name)
                    if namesake != owner and self.store.get(namesake) is not None:
                        keys.add(namesake)
        if nodes_changed:
            keys.update(self.waypoint_gateways())
        return keys

    # -- reconciliation ----------------------------------------------------------------------

    def sync(self, keys: Iterable[ObjectKey]) -> None:
        """Bring the waypoint of each Gateway in `keys` to what the store says it should be.

        One Gateway's failure is logged and does not stop the others: the controller must not
        take the control plane down with it.
        """
        for key in sorted(set(keys)):
            try:
                self._sync_one(key)
            except Exception:
                log.exception("waypoint controller: reconciling Gateway %s failed", key)

    def _owned(self, key: ObjectKey) -> OwnedObjects:
        found = OwnedObjects()
        for okey in owned_keys(key):
            obj = self.store.get(okey)
            if obj is None or owner_of(obj) != key:
                continue
            if isinstance(obj, Workload):
                index = next(i for n, i in replica_candidates(obj.metadata.name) if n == key.name)
                found.workloads[index] = obj
            elif isinstance(obj, Service):
                found.service = obj
            else:
                found.service_account = obj
        return found

    def _sync_one(self, key: ObjectKey) -> None:
        gateway = self.store.get(key)
        owned = self._owned(key)
        if not isinstance(gateway, Gateway) or not is_waypoint(gateway):
            if owned.keys():
                self.admission.delete(owned.keys(), controller=True)
                log.info("removed the waypoint of Gateway %s/%s", key.namespace, key.name)
            return
        replicas = gateway.replicas
        conflict = self._conflict(key, replicas)
        if conflict is not None:
            self._write_status(gateway, ("Invalid", conflict))
            return
        # A placed replica stays where it is; scaling down removes the highest indexes.
        placed = {i: w.spec.node_name for i, w in owned.workloads.items() if i < replicas}
        surplus = sorted((i for i in owned.workloads if i >= replicas), reverse=True)
        if len(placed) == replicas:
            nodes: list[str | None] = [placed[i] for i in range(replicas)]
        else:
            leaving = {owned.workloads[i].key for i in surplus}
            nodes = place_replicas(
                replicas,
                placed,
                self.store.list(Node.KIND),
                [w for w in self.store.list(Workload.KIND) if w.key not in leaving],
            )
        account = self.store.get(ObjectKey(ServiceAccount.KIND, key.namespace, key.name))
        desired = desired_objects(
            gateway,
            nodes,
            python=self.python,
            cluster_domain=self.cluster_domain,
            service_account=account is None or owner_of(account) == key,
        )
        problem = None
        try:
            results = self.admission.apply(desired, controller=True)
        except ConfigError as exc:
            problem = ("NoResources", "; ".join(issue.message for issue in exc.issues))
            log.warning("cannot deploy the waypoint of Gateway %s: %s", key, problem[1])
        else:
            for result in results:
                if result.outcome is not ApplyOutcome.UNCHANGED:
                    log.info("waypoint: %s %s", result.object.object_ref, result.outcome)
        if surplus:
            self.admission.delete([owned.workloads[i].key for i in surplus], controller=True)
            log.info(
                "waypoint %s/%s scaled down to %d: removed %s",
                key.namespace,
                key.name,
                replicas,
                ", ".join(owned.workloads[i].metadata.name for i in surplus),
            )
        self._write_status(gateway, problem)

    def _conflict(self, key: ObjectKey, replicas: int = 1) -> str | None:
        return waypoint_conflict(key, replicas, self.store.get)

    def _write_status(self, gateway: Gateway, problem: tuple[str, str] | None) -> None:
        """Status goes to the store directly: it is the controller's to write, and admission
        keeps whatever status the stored Gateway has when a user applies it."""
        owned = self._owned(gateway.key)
        replicas = [w for i, w in sorted(owned.workloads.items()) if i < gateway.replicas]
        status = gateway_status(gateway, owned.service, replicas, problem, self.clock())
        if status != gateway.status:
            self.store.apply([gateway.model_copy(update={"status": status})])

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile every waypoint, then follow the store's events; start over if the watch
        falls behind the event log."""
        while True:
            revision = self.store.revision
            self.sync(self.all_keys())
            try:
                async for event in self.store.watch(revision):
                    keys = self.affected([event.object])
                    if keys:
                        self.sync(keys)
            except ResourceVersionTooOld:
                log.warning("waypoint controller fell behind the store; reconciling everything")


def waypoint_conflict(
    gateway: ObjectKey,
    replicas: int,
    lookup: Callable[[ObjectKey], Resource | None],
) -> str | None:
    """Why the waypoint of `gateway` with `replicas` replicas cannot take its names: the first
    Service or replica Workload of that name that another owner (or a user) holds."""
    wanted = [(Workload.KIND, gateway.name), (Service.KIND, gateway.name)] + [
        (Workload.KIND, replica_name(gateway.name, i)) for i in range(1, replicas)
    ]
    for kind, name in wanted:
        other = lookup(ObjectKey(kind, gateway.namespace, name))
        if other is not None and owner_of(other) != gateway:
            return conflict_message(kind, gateway, name)
    return None


def conflict_message(kind: str, gateway: ObjectKey, name: str | None = None) -> str:
    name = name or gateway.name
    if name == gateway.name:
        return (
            f"{kind} {gateway.namespace}/{name} exists and is not managed by this Gateway: "
            f"a waypoint's Workload and Service take its Gateway's name; rename the Gateway or "
            f"delete the {kind}"
        )
    return (
        f"{kind} {gateway.namespace}/{name} exists and is not managed by this Gateway: "
        f"the waypoint's replicas take the names {gateway.name}, {gateway.name}-1, ...; "
        f"rename the Gateway, lower its meshway.io/replicas or delete the {kind}"
    )
