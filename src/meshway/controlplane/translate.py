"""From configuration objects to the xDS resources the node proxies and waypoints read.

`MeshTranslator` keeps indexes of the objects by namespace and, for a batch of store events,
recomputes only the resources the batch can affect: a Workload change recomputes that workload;
a Service change recomputes the service and the workloads its old and new selectors match; a
policy change recomputes the policy and the workloads it selects; a Namespace or waypoint
Gateway change recomputes its namespace; a route change recomputes that route. Unchanged output
(same bytes) is not pushed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshway.api.v1 import address_pb2, authorization_pb2, route_pb2
from meshway.config.labels import (
    LABEL_DATAPLANE_MODE,
    LABEL_GATEWAY_NAME,
    LABEL_USE_WAYPOINT,
    LABEL_WAYPOINT_FOR,
)
from meshway.config.model import (
    AuthorizationPolicy,
    Gateway,
    Namespace,
    ObjectKey,
    PeerAuthentication,
    RequestAuthentication,
    Resource,
    Service,
    Workload,
)
from meshway.config.selection import selects, target_port
from meshway.config.store import EventType, WatchEvent
from meshway.xds.server import CachedResource, Change
from meshway.xds.types import (
    ADDRESS_TYPE,
    ALL_TYPE_URLS,
    AUTHORIZATION_TYPE,
    ROUTE_TYPE,
    WAYPOINT_CONFIG_KINDS,
    route_resource_name,
)

HBONE_PORT = 15008

_ACTIONS = {
    "ALLOW": authorization_pb2.ALLOW,
    "DENY": authorization_pb2.DENY,
    "AUDIT": authorization_pb2.AUDIT,
    "CUSTOM": authorization_pb2.CUSTOM,
}


@dataclass(frozen=True)
class MeshSettings:
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    root_namespace: str = "istio-system"


def _version(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


def _ip_bytes(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


_INDEXED_KINDS = (
    "Workload",
    "Service",
    "AuthorizationPolicy",
    "Gateway",
    "PeerAuthentication",
    *WAYPOINT_CONFIG_KINDS,
)
_MTLS_MODES = {
    "PERMISSIVE": address_pb2.MTLS_PERMISSIVE,
    "STRICT": address_pb2.MTLS_STRICT,
    "DISABLE": address_pb2.MTLS_DISABLE,
}


class _Namespaced:
    """The objects of one namespace that the translation reads, by kind and name."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, Any]] = {kind: {} for kind in _INDEXED_KINDS}

    @property
    def workloads(self) -> dict[str, Workload]:
        return self.tables["Workload"]

    @property
    def services(self) -> dict[str, Service]:
        return self.tables["Service"]

    @property
    def policies(self) -> dict[str, AuthorizationPolicy]:
        return self.tables["AuthorizationPolicy"]

    @property
    def gateways(self) -> dict[str, Gateway]:
        return self.tables["Gateway"]

    @property
    def peer_authentications(self) -> dict[str, PeerAuthentication]:
        return self.tables["PeerAuthentication"]

    def route(self, kind: str, name: str) -> Resource | None:
        table = self.tables.get(kind)
        return table.get(name) if table is not None else None


class MeshTranslator:
    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self._ns: dict[str, _Namespaced] = defaultdict(_Namespaced)
        self._namespaces: dict[str, Namespace] = {}
        self._current: dict[str, dict[str, CachedResource]] = {t: {} for t in ALL_TYPE_URLS}

    # -- input -------------------------------------------------------------------------------

    def full(self, objects: Iterable[Resource], version: str) -> list[Change]:
        """Build everything from a list of objects (start-up)."""
        for obj in objects:
            self._index(obj, deleted=False)
        dirty: dict[str, set[str]] = {t: set() for t in ALL_TYPE_URLS}
        for ns, bucket in self._ns.items():
            dirty[ADDRESS_TYPE] |= {f"{ns}/{n}" for n in bucket.workloads}
            dirty[ADDRESS_TYPE] |= {self._service_name(s) for s in bucket.services.values()}
            dirty[AUTHORIZATION_TYPE] |= {f"{ns}/{n}" for n in bucket.policies}
            for kind in WAYPOINT_CONFIG_KINDS:
                dirty[ROUTE_TYPE] |= {route_resource_name(ns, kind, n) for n in bucket.tables[kind]}
        return self._recompute(dirty, version)

    def apply(self, events: Iterable[WatchEvent], version: str) -> list[Change]:
        """Apply store events and return the resulting resource changes."""
        dirty: dict[str, set[str]] = {t: set() for t in ALL_TYPE_URLS}
        for event in events:
            obj = event.object
            old = self._lookup(obj.key)
            self._index(obj, deleted=event.type is EventType.DELETED)
            for candidate in (old, obj):
                if candidate is not None:
                    self._mark(candidate, dirty)
        return self._recompute(dirty, version)

    def _lookup(self, key: ObjectKey) -> Resource | None:
        if key.kind == "Namespace":
            return self._namespaces.get(key.name)
        bucket = self._ns.get(key.namespace)
        return bucket.tables.get(key.kind, {}).get(key.name) if bucket else None

    def _index(self, obj: Resource, *, deleted: bool) -> None:
        name = obj.metadata.name
        if isinstance(obj, Namespace):
            if deleted:
                self._namespaces.pop(name, None)
            else:
                self._namespaces[name] = obj
            return
        table = self._ns[obj.metadata.namespace or ""].tables.get(obj.KIND)
        if table is None:
            return
        if deleted:
            table.pop(name, None)
        else:
            table[name] = obj

    def _mark(self, obj: Resource, dirty: dict[str, set[str]]) -> None:
        ns = obj.metadata.namespace or ""
        if isinstance(obj, Workload):
            dirty[ADDRESS_TYPE].add(f"{ns}/{obj.metadata.name}")
        elif isinstance(obj, Service):
            dirty[ADDRESS_TYPE].add(self._service_name(obj))
            for wl in self._ns[ns].workloads.values():
                if selects(obj.spec.selector, wl.metadata.labels):
                    dirty[ADDRESS_TYPE].add(f"{ns}/{wl.metadata.name}")
            if obj.metadata.name in self._ns[ns].gateways:
                self._mark_namespace(ns, dirty)
        elif isinstance(obj, AuthorizationPolicy):
            dirty[AUTHORIZATION_TYPE].add(f"{ns}/{obj.metadata.name}")
            selector = obj.spec.selector.match_labels if obj.spec.selector else None
            if selector:
                scope = list(self._ns) if ns == self.settings.root_namespace else [ns]
                for namespace in scope:
                    for wl in self._ns[namespace].workloads.values():
                        if selects(selector, wl.metadata.labels):
                            dirty[ADDRESS_TYPE].add(f"{namespace}/{wl.metadata.name}")
        elif isinstance(obj, PeerAuthentication):
            mesh_wide = ns == self.settings.root_namespace and not (
                obj.spec.selector and obj.spec.selector.match_labels
            )
            for namespace in list(self._ns) if mesh_wide else [ns]:
                self._mark_namespace(namespace, dirty)
        elif obj.KIND in WAYPOINT_CONFIG_KINDS:
            dirty[ROUTE_TYPE].add(route_resource_name(ns, obj.KIND, obj.metadata.name))
        elif isinstance(obj, (Namespace, Gateway)):
            self._mark_namespace(obj.metadata.name if isinstance(obj, Namespace) else ns, dirty)

    def _mark_namespace(self, ns: str, dirty: dict[str, set[str]]) -> None:
        bucket = self._ns[ns]
        dirty[ADDRESS_TYPE] |= {f"{ns}/{n}" for n in bucket.workloads}
        dirty[ADDRESS_TYPE] |= {self._service_name(s) for s in bucket.services.values()}

    # -- output ------------------------------------------------------------------------------

    def _recompute(self, dirty: Mapping[str, set[str]], version: str) -> list[Change]:
        changes: list[Change] = []
        for type_url, names in dirty.items():
            if not names:
                continue
            current = self._current[type_url]
            updated: dict[str, CachedResource] = {}
            removed: set[str] = set()
            for name in sorted(names):
                message = self._build(type_url, name)
                if message is None:
                    if current.pop(name, None) is not None:
                        removed.add(name)
                    continue
                payload = message.SerializeToString(deterministic=True)
                rversion = _version(payload)
                previous = current.get(name)
                if previous is not None and previous.version == rversion:
                    continue
                resource = CachedResource.build(name, rversion, message, type_url)
                current[name] = resource
                updated[name] = resource
            if updated or removed:
                changes.append(Change(type_url, updated, removed, version))
        return changes

    def _build(
        self, type_url: str, name: str
    ) -> address_pb2.Address | authorization_pb2.Authorization | route_pb2.Route | None:
        ns, _, rest = name.partition("/")
        bucket = self._ns.get(ns)
        if bucket is None:
            return None
        if type_url == ROUTE_TYPE:
            kind, _, route_name = rest.partition("/")
            route = bucket.route(kind, route_name)
            if isinstance(route, RequestAuthentication) and not (
                route.spec.target_refs or route.spec.target_ref
            ):
                return None  # a selector RequestAuthentication is not for waypoints
            return self._route(route) if route is not None else None
        if type_url == AUTHORIZATION_TYPE:
            policy = bucket.policies.get(rest)
            return self._authorization(policy) if policy else None
        workload = bucket.workloads.get(rest)
        if workload is not None:
            return address_pb2.Address(workload=self._workload(workload, bucket))
        # A service resource is named "<ns>/<name>.<ns>.svc.<domain>": look it up by name
        # rather than scanning the namespace's services for every one rebuilt.
        service = bucket.services.get(rest.split(".", 1)[0])
        if service is not None and self._service_name(service) == name:
            return address_pb2.Address(service=self._service(service))
        return None

    def _service_name(self, svc: Service) -> str:
        ns = svc.metadata.namespace or ""
        return f"{ns}/{self._hostname(svc.metadata.name, ns)}"

    def _hostname(self, name: str, ns: str) -> str:
        return f"{name}.{ns}.svc.{self.settings.cluster_domain}"

    def _namespace_labels(self, ns: str) -> Mapping[str, str]:
        namespace = self._namespaces.get(ns)
        return namespace.metadata.labels if namespace else {}

    def _waypoint(
        self, ns: str, own_labels: Mapping[str, str], traffic: str
    ) -> address_pb2.GatewayAddress | None:
        """The waypoint named by the object's or its namespace's use-waypoint label, if it serves
        this kind of traffic (`service` or `workload`).

        A Gateway's own pods and Service (labelled with its name) never use a waypoint: a
        waypoint enrolled through its namespace's label would otherwise send to itself.
        """
        if LABEL_GATEWAY_NAME in own_labels:
            return None
        name = own_labels.get(LABEL_USE_WAYPOINT) or self._namespace_labels(ns).get(
            LABEL_USE_WAYPOINT
        )
        if not name or name == "none":
            return None
        bucket = self._ns.get(ns)
        gateway = bucket.gateways.get(name) if bucket else None
        if gateway is None:
            return None
        serves = gateway.metadata.labels.get(LABEL_WAYPOINT_FOR, "service")
        if serves not in (traffic, "all"):
            return None
        address = address_pb2.GatewayAddress(
            service=f"{ns}/{self._hostname(name, ns)}", hbone_mtls_port=HBONE_PORT
        )
        svc = bucket.services.get(name) if bucket else None
        if svc is not None and svc.spec.cluster_ip and svc.spec.cluster_ip != "None":
            address.address.address = _ip_bytes(svc.spec.cluster_ip)
        return address

    def _workload(self, wl: Workload, bucket: _Namespaced) -> address_pb2.Workload:
        ns = wl.metadata.namespace or ""
        labels = wl.metadata.labels
        mode = labels.get(LABEL_DATAPLANE_MODE) or self._namespace_labels(ns).get(
            LABEL_DATAPLANE_MODE
        )
        out = address_pb2.Workload(
            uid=f"{ns}/{wl.metadata.name}",
            name=wl.metadata.name,
            namespace=ns,
            node=wl.spec.node_name,
            service_account=wl.spec.service_account_name,
            trust_domain=self.settings.trust_domain,
            tunnel_protocol=address_pb2.HBONE if mode == "ambient" else address_pb2.NONE,
            canonical_name=labels.get("app", wl.metadata.name),
            canonical_revision=labels.get("version", "latest"),
            labels=labels,
        )
        if wl.status.pod_ip:
            out.addresses.append(_ip_bytes(wl.status.pod_ip))
        for port in wl.spec.ports:
            if port.name:
                out.named_ports[port.name] = port.container_port
        for svc in bucket.services.values():
            if not selects(svc.spec.selector, labels):
                continue
            mapping = out.services[self._service_name(svc)]
            for sp in svc.spec.ports:
                target = target_port(sp, wl)
                if target is not None:  # a named target this workload lacks maps nowhere
                    mapping.ports.append(
                        address_pb2.PortMapping(service_port=sp.port, target_port=target)
                    )
        # Selector policies of the workload's namespace, and (as in Istio) those of the root
        # namespace, which select across the whole mesh.
        root = self._ns.get(self.settings.root_namespace)
        sources = [(ns, bucket)] + (
            [(self.settings.root_namespace, root)] if root and root is not bucket else []
        )
        for policy_ns, policy_bucket in sources:
            for pname, policy in sorted(policy_bucket.policies.items()):
                selector = policy.spec.selector.match_labels if policy.spec.selector else None
                if selector and selects(selector, labels):
                    out.authorization_policies.append(f"{policy_ns}/{pname}")
        waypoint = self._waypoint(ns, labels, "workload")
        if waypoint is not None:
            out.waypoint.CopyFrom(waypoint)
        self._peer_authentication(out, ns, labels, bucket)
        return out

    def _peer_authentication(
        self, out: address_pb2.Workload, ns: str, labels: Mapping[str, str], bucket: _Namespaced
    ) -> None:
        """Istio's precedence: the workload's own policy (oldest first), then its namespace's,
        then the mesh-wide one in the root namespace; UNSET inherits; PERMISSIVE at the end."""

        def age(pa: PeerAuthentication) -> tuple[str, str]:
            return (pa.metadata.creation_timestamp or "", pa.metadata.name)

        def unselected(pas: Mapping[str, PeerAuthentication]) -> list[PeerAuthentication]:
            return sorted(
                (p for p in pas.values() if not (p.spec.selector and p.spec.selector.match_labels)),
                key=age,
            )

        own = sorted(
            (
                p
                for p in bucket.peer_authentications.values()
                if p.spec.selector and selects(p.spec.selector.match_labels, labels)
            ),
            key=age,
        )
        root = self._ns.get(self.settings.root_namespace)
        chain = own[:1] + unselected(bucket.peer_authentications)[:1]
        if root is not None and root is not bucket:
            chain += unselected(root.peer_authentications)[:1]
        mode = "PERMISSIVE"
        for pa in chain:
            if pa.spec.mtls is not None and pa.spec.mtls.mode != "UNSET":
                mode = pa.spec.mtls.mode
                break
        out.mtls_mode = _MTLS_MODES[mode]
        if own:
            for port, setting in own[0].spec.port_level_mtls.items():
                if setting.mode != "UNSET":
                    out.port_mtls[port] = _MTLS_MODES[setting.mode]

    def _service(self, svc: Service) -> address_pb2.Service:
        ns = svc.metadata.namespace or ""
        out = address_pb2.Service(
            name=svc.metadata.name,
            namespace=ns,
            hostname=self._hostname(svc.metadata.name, ns),
            labels=svc.metadata.labels,
        )
        if svc.spec.cluster_ip and svc.spec.cluster_ip != "None":
            out.addresses.add(address=_ip_bytes(svc.spec.cluster_ip))
        for sp in svc.spec.ports:
            target = sp.target_port if sp.target_port is not None else sp.port
            out.ports.append(
                address_pb2.ServicePort(
                    name=sp.name or "",
                    service_port=sp.port,
                    target_port=target if isinstance(target, int) else 0,
                    target_port_name=target if isinstance(target, str) else "",
                    app_protocol=sp.app_protocol or "",
                )
            )
        waypoint = self._waypoint(ns, svc.metadata.labels, "service")
        if waypoint is not None:
            out.waypoint.CopyFrom(waypoint)
        return out

    @staticmethod
    def _route(route: Resource) -> route_pb2.Route:
        """The route as canonical JSON (sorted keys), so that equal routes are equal bytes.

        The status and the resource version are left out: the waypoint reads neither, and a
        status write alone must not push the route to every waypoint.
        """
        data = route.to_dict()
        data.pop("status", None)
        data["metadata"].pop("resourceVersion", None)
        return route_pb2.Route(
            kind=route.KIND,
            namespace=route.metadata.namespace or "",
            name=route.metadata.name,
            creation_timestamp=route.metadata.creation_timestamp or "",
            resource_json=json.dumps(data, sort_keys=True, separators=(",", ":")),
        )

    def _authorization(self, policy: AuthorizationPolicy) -> authorization_pb2.Authorization:
        ns = policy.metadata.namespace or ""
        spec = policy.spec
        target_refs = list(spec.target_refs or [])
        if spec.target_ref is not None:
            target_refs.append(spec.target_ref)
        if target_refs:
            scope = authorization_pb2.TARGET_REF
        elif spec.selector and spec.selector.match_labels:
            scope = authorization_pb2.WORKLOAD_SELECTOR
        elif ns == self.settings.root_namespace:
            scope = authorization_pb2.GLOBAL
        else:
            scope = authorization_pb2.NAMESPACE
        out = authorization_pb2.Authorization(
            name=policy.metadata.name,
            namespace=ns,
            scope=scope,
            action=_ACTIONS[spec.action],
            provider=spec.provider.name if spec.provider else "",
        )
        for ref in target_refs:
            out.target_refs.add(
                group=ref.group or "", kind=ref.kind, name=ref.name, namespace=ref.namespace or ns
            )
        for rule in spec.rules or []:
            pr = out.rules.add()
            for frm in rule.from_ or []:
                src = frm.source
                if src is None:
                    continue
                pr.__getattribute__("from").add(
                    principals=src.principals or [],
                    not_principals=src.not_principals or [],
                    request_principals=src.request_principals or [],
                    not_request_principals=src.not_request_principals or [],
                    namespaces=src.namespaces or [],
                    not_namespaces=src.not_namespaces or [],
                    service_accounts=src.service_accounts or [],
                    not_service_accounts=src.not_service_accounts or [],
                    ip_blocks=src.ip_blocks or [],
                    not_ip_blocks=src.not_ip_blocks or [],
                    remote_ip_blocks=src.remote_ip_blocks or [],
                    not_remote_ip_blocks=src.not_remote_ip_blocks or [],
                    trust_domains=src.trust_domains,
                    not_trust_domains=src.not_trust_domains,
                )
            for to in rule.to or []:
                op = to.operation
                if op is None:
                    continue
                pr.to.add(
                    hosts=op.hosts or [],
                    not_hosts=op.not_hosts or [],
                    ports=[int(p) for p in op.ports or []],
                    not_ports=[int(p) for p in op.not_ports or []],
                    methods=op.methods or [],
                    not_methods=op.not_methods or [],
                    paths=op.paths or [],
                    not_paths=op.not_paths or [],
                )
            for cond in rule.when or []:
                pr.when.add(
                    key=cond.key, values=cond.values or [], not_values=cond.not_values or []
                )
        return out
