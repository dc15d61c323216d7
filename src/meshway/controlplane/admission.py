"""Admission: what happens between a validated batch and the store.

Cross-object checks (references, immutable fields, deletions that would orphan objects) and the
assignments a cluster makes: a pod CIDR per Node, a stable IP per Workload from its node's CIDR,
a virtual IP per Service from the service CIDR. The batch is admitted whole or not at all.

Status is not taken from the batch: like a Kubernetes status subresource, a Workload's phase
(the runtime reports it) and a Gateway's status (the waypoint controller writes it) are kept
from the stored object, so that re-applying a manifest does not reset them. Objects the control
plane creates for a Gateway (annotated `meshway.io/managed-by`) change only through their
Gateway: a user's apply or delete of one is refused, and deleting the Gateway deletes them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from meshway.config.errors import ConfigError, ConfigIssue
from meshway.config.labels import ANNOTATION_MANAGED_BY, LABEL_PROXY_MODE, PROXY_MODE_WAYPOINT
from meshway.config.model import (
    Gateway,
    GatewayStatus,
    Node,
    ObjectKey,
    Resource,
    Service,
    Workload,
)
from meshway.config.references import check_deletions, check_references, check_update
from meshway.config.store import ApplyResult, SqliteStore
from meshway.controlplane.waypoints import (
    EXCLUSIVE_KINDS,
    is_waypoint,
    owned_keys,
    owner_of,
    replica_candidates,
    waypoint_conflict,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Sources = Mapping[ObjectKey, tuple[str, int]]


@dataclass(frozen=True)
class ClusterNetwork:
    """The address plan of the cluster; fixed once objects have been assigned addresses."""

    pod_cidr: IPNetwork
    service_cidr: IPNetwork
    node_prefix: int = 24

    def __post_init__(self) -> None:
        if (
            self.node_prefix < self.pod_cidr.prefixlen
            or self.node_prefix > self.pod_cidr.max_prefixlen - 2
        ):
            raise ValueError(
                f"node prefix /{self.node_prefix} does not fit the pod CIDR {self.pod_cidr}"
            )
        if self.pod_cidr.overlaps(self.service_cidr):
            raise ValueError(f"pod CIDR {self.pod_cidr} overlaps service CIDR {self.service_cidr}")

    def describe(self) -> str:
        return f"{self.pod_cidr},{self.service_cidr},/{self.node_prefix}"

    @classmethod
    def parse(cls, pod_cidr: str, service_cidr: str, node_prefix: int = 24) -> ClusterNetwork:
        return cls(ipaddress.ip_network(pod_cidr), ipaddress.ip_network(service_cidr), node_prefix)


class _AddressPool:
    """Free addresses of one network, handed out lowest first within one admission.

    The scan resumes where the previous allocation stopped, so a batch of N allocations costs
    O(N + used), not O(N * used). The first host address is skipped: the local runtime gives
    it to the node's gateway (and Kubernetes to the `kubernetes` Service).
    """

    def __init__(self, network: IPNetwork, used: set[str]) -> None:
        self.network = network
        self.used = used
        self._candidates = network.hosts()
        next(self._candidates, None)

    def take(self) -> str | None:
        for candidate in self._candidates:
            text = str(candidate)
            if text not in self.used:
                self.used.add(text)
                return text
        return None


class Admission:
    """Admits batches into a store, enforcing references and assigning addresses."""

    def __init__(self, store: SqliteStore, network: ClusterNetwork) -> None:
        self.store = store
        self.network = network
        recorded = store.get_setting("network")
        if recorded is None:
            store.put_setting("network", network.describe())
        elif recorded != network.describe() and len(store) > 0:
            raise ValueError(
                f"the state directory was created with network {recorded}; it cannot change to "
                f"{network.describe()} while objects exist"
            )
        else:
            store.put_setting("network", network.describe())

    def apply(
        self,
        batch: Sequence[Resource],
        sources: Sources | None = None,
        *,
        dry_run: bool = False,
        controller: bool = False,
    ) -> list[ApplyResult]:
        """Admit `batch`. `controller` marks the control plane's own writes (the waypoint
        controller's), which may create and change the objects it manages."""
        sources = sources or {}
        issues = check_references(batch, self.store.get, sources)
        for obj in batch:
            old = self.store.get(obj.key)
            if old is not None:
                issues.extend(check_update(old, obj))
        if not controller:
            issues.extend(self._check_ownership(batch, sources))
        if issues:
            raise ConfigError(issues)
        admitted = self._assign(batch, sources)
        return self.store.apply(admitted, dry_run=dry_run)

    def delete(self, keys: Sequence[ObjectKey], *, controller: bool = False) -> list[Resource]:
        """Delete `keys` and, with a waypoint Gateway, the objects made for it (in the same
        transaction, so that deleting a namespace with everything in it works in one go)."""
        doomed = dict.fromkeys(keys)
        issues: list[ConfigIssue] = []
        if not controller:
            for key in keys:
                if key.kind == Gateway.KIND:
                    for okey in owned_keys(key):
                        obj = self.store.get(okey)
                        if obj is not None and owner_of(obj) == key:
                            doomed[okey] = None
            for key in keys:
                obj = self.store.get(key)
                owner = owner_of(obj) if obj is not None else None
                if owner is not None and owner not in doomed:
                    issues.append(ConfigIssue("", None, str(key), "", _managed_message(owner)))
        remaining = (obj for key, obj in self._items() if key not in doomed)
        issues += check_deletions(list(doomed), remaining)
        if issues:
            raise ConfigError(issues)
        return self.store.delete(list(doomed))

    def _check_ownership(self, batch: Sequence[Resource], sources: Sources) -> list[ConfigIssue]:
        """A user may not change what the control plane manages, claim to be the control plane,
        or take the name of a waypoint's Workload or Service."""
        issues: list[ConfigIssue] = []
        gateways = {o.key: o for o in batch if isinstance(o, Gateway)}
        in_batch = {o.key: o for o in batch if o.KIND in EXCLUSIVE_KINDS}

        def lookup(okey: ObjectKey) -> Resource | None:
            return in_batch.get(okey) or self.store.get(okey)

        def issue(obj: Resource, path: str, message: str) -> None:
            source, doc = sources.get(obj.key, ("", 0))
            issues.append(
                ConfigIssue(source or "<request>", doc or None, obj.object_ref, path, message)
            )

        for obj in batch:
            ns, name = obj.key.namespace, obj.metadata.name
            old = self.store.get(obj.key)
            owner = owner_of(old) if old is not None else None
            if owner is not None:
                issue(obj, "metadata", _managed_message(owner))
                continue
            if ANNOTATION_MANAGED_BY in obj.metadata.annotations:
                issue(
                    obj,
                    f"metadata.annotations[{ANNOTATION_MANAGED_BY}]",
                    "is set by the control plane on the objects it creates for a Gateway; "
                    "remove it",
                )
            if (
                isinstance(obj, Workload)
                and obj.metadata.labels.get(LABEL_PROXY_MODE) == PROXY_MODE_WAYPOINT
            ):
                issue(
                    obj,
                    f"metadata.labels[{LABEL_PROXY_MODE}]",
                    f"'{PROXY_MODE_WAYPOINT}' is reserved for the waypoints the control plane "
                    "deploys (it gives the pod its node's credential): apply a Gateway of "
                    "class istio-waypoint instead",
                )
            if isinstance(obj, Gateway) and is_waypoint(obj):
                conflict = waypoint_conflict(obj.key, obj.replicas, lookup)
                if conflict is not None:
                    issue(obj, "metadata.name", conflict)
            elif obj.KIND in EXCLUSIVE_KINDS and old is None:
                # A Service takes a waypoint's name; a Workload that of one of its replicas.
                candidates = replica_candidates(name) if isinstance(obj, Workload) else [(name, 0)]
                for gateway_name, index in candidates:
                    gateway_key = ObjectKey(Gateway.KIND, ns, gateway_name)
                    gateway = self.store.get(gateway_key)
                    if (
                        gateway_key not in gateways
                        and isinstance(gateway, Gateway)
                        and is_waypoint(gateway)
                        and index < gateway.replicas
                    ):
                        what = "waypoint" if index == 0 else f"waypoint replica {index}"
                        issue(
                            obj,
                            "metadata.name",
                            f"'{name}' is the name of the {what} of Gateway "
                            f"{ns}/{gateway_name}; choose another name",
                        )
        return issues

    def _items(self) -> Iterator[tuple[ObjectKey, Resource]]:
        for obj in self.store.list():
            yield obj.key, obj

    # -- address assignment ------------------------------------------------------------------

    def _assign(self, batch: Sequence[Resource], sources: Sources) -> list[Resource]:
        issues: list[ConfigIssue] = []
        # Nodes first: workloads in the same batch need their node's CIDR.
        ordered = sorted(batch, key=lambda o: 0 if isinstance(o, Node) else 1)
        node_cidrs = {
            n.metadata.name: n.status.pod_cidr
            for n in self.store.list("Node")
            if isinstance(n, Node) and n.status.pod_cidr
        }
        used_pod_ips = {
            w.status.pod_ip
            for w in self.store.list("Workload")
            if isinstance(w, Workload) and w.status.pod_ip
        }
        used_vips = {
            s.spec.cluster_ip: s.key
            for s in self.store.list("Service")
            if isinstance(s, Service) and s.spec.cluster_ip and s.spec.cluster_ip != "None"
        }
        pools: dict[str, _AddressPool] = {}
        # Addresses asked for explicitly in this batch are not handed out to others in it.
        requested = {
            o.spec.cluster_ip for o in batch if isinstance(o, Service) and o.spec.cluster_ip
        }
        service_pool = _AddressPool(self.network.service_cidr, set(used_vips) | requested)
        admitted: list[Resource] = []
        for obj in ordered:
            old = self.store.get(obj.key)
            try:
                if isinstance(obj, Node):
                    obj = self._assign_node(obj, old, node_cidrs)
                elif isinstance(obj, Workload):
                    obj = self._assign_workload(obj, old, node_cidrs, used_pod_ips, pools)
                elif isinstance(obj, Service):
                    obj = self._assign_service(obj, old, used_vips, service_pool)
                elif isinstance(obj, Gateway):
                    status = old.status if isinstance(old, Gateway) else GatewayStatus()
                    obj = obj.model_copy(update={"status": status})
            except _AssignError as exc:
                source, doc = sources.get(obj.key, ("", 0))
                issues.append(
                    ConfigIssue(
                        source or "<request>",
                        doc or None,
                        f"{obj.KIND} {obj.display_name}",
                        exc.path,
                        str(exc),
                    )
                )
                continue
            admitted.append(obj)
        if issues:
            raise ConfigError(issues)
        # Keep the user's order for the store (and so for watch events).
        by_key = {o.key: o for o in admitted}
        return [by_key[o.key] for o in batch]

    def _assign_node(self, node: Node, old: Resource | None, node_cidrs: dict[str, str]) -> Node:
        cidr = old.status.pod_cidr if isinstance(old, Node) else None
        if not cidr:
            taken = {ipaddress.ip_network(c) for c in node_cidrs.values()}
            for subnet in self.network.pod_cidr.subnets(new_prefix=self.network.node_prefix):
                if subnet not in taken:
                    cidr = str(subnet)
                    break
            else:
                raise _AssignError(
                    "status.podCIDR",
                    f"pod CIDR {self.network.pod_cidr} has no free /{self.network.node_prefix} "
                    "left for another node",
                )
        node_cidrs[node.metadata.name] = cidr
        return node.model_copy(update={"status": node.status.model_copy(update={"pod_cidr": cidr})})

    def _assign_workload(
        self,
        workload: Workload,
        old: Resource | None,
        node_cidrs: dict[str, str],
        used: set[str],
        pools: dict[str, _AddressPool],
    ) -> Workload:
        ip = old.status.pod_ip if isinstance(old, Workload) else None
        if not ip:
            cidr = node_cidrs.get(workload.spec.node_name)
            if cidr is None:
                raise _AssignError(
                    "spec.nodeName", f"node '{workload.spec.node_name}' has no pod CIDR yet"
                )
            pool = pools.get(cidr)
            if pool is None:
                pool = pools[cidr] = _AddressPool(ipaddress.ip_network(cidr), used)
            ip = pool.take()
            if ip is None:
                raise _AssignError(
                    "status.podIP", f"node '{workload.spec.node_name}' has no free pod IP in {cidr}"
                )
        phase = (old.status.phase if isinstance(old, Workload) else None) or "Pending"
        status = workload.status.model_copy(update={"pod_ip": ip, "phase": phase})
        return workload.model_copy(update={"status": status})

    def _assign_service(
        self,
        service: Service,
        old: Resource | None,
        used: dict[str, ObjectKey],
        pool: _AddressPool,
    ) -> Service:
        wanted = service.spec.cluster_ip
        if not wanted and isinstance(old, Service):
            wanted = old.spec.cluster_ip  # omitted on update: keep what was assigned
        if wanted == "None":
            return service
        if wanted:
            address = ipaddress.ip_address(wanted)
            if address not in self.network.service_cidr:
                raise _AssignError(
                    "spec.clusterIP",
                    f"{wanted} is not in the service CIDR {self.network.service_cidr}",
                )
            owner = used.get(wanted)
            if owner is not None and owner != service.key:
                raise _AssignError(
                    "spec.clusterIP",
                    f"{wanted} is already used by Service {owner.namespace}/{owner.name}",
                )
        else:
            wanted = pool.take()
            if wanted is None:
                raise _AssignError(
                    "spec.clusterIP", f"service CIDR {self.network.service_cidr} is exhausted"
                )
        used[wanted] = service.key
        spec = service.spec.model_copy(update={"cluster_ip": wanted})
        return service.model_copy(update={"spec": spec})


def _managed_message(owner: ObjectKey) -> str:
    return (
        f"managed by Gateway {owner.namespace}/{owner.name}: change or delete the Gateway instead"
    )


class _AssignError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
