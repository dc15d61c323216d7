"""Admission: what happens between a validated batch and the store.

Cross-object checks (references, immutable fields, deletions that would orphan objects) and the
assignments a cluster makes: a pod CIDR per Node, a stable IP per Workload from its node's CIDR,
a virtual IP per Service from the service CIDR. The batch is admitted whole or not at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from meshway.config.errors import ConfigError, ConfigIssue
from meshway.config.model import Node, ObjectKey, Resource, Service, Workload
from meshway.config.references import check_deletions, check_references, check_update
from meshway.config.store import ApplyResult, SqliteStore

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
        self, batch: Sequence[Resource], sources: Sources | None = None, *, dry_run: bool = False
    ) -> list[ApplyResult]:
        sources = sources or {}
        issues = check_references(batch, self.store.get, sources)
        for obj in batch:
            old = self.store.get(obj.key)
            if old is not None:
                issues.extend(check_update(old, obj))
        if issues:
            raise ConfigError(issues)
        admitted = self._assign(batch, sources)
        return self.store.apply(admitted, dry_run=dry_run)

    def delete(self, keys: Sequence[ObjectKey]) -> list[Resource]:
        doomed = set(keys)
        remaining = (obj for key, obj in self._items() if key not in doomed)
        issues = check_deletions(list(keys), remaining)
        if issues:
            raise ConfigError(issues)
        return self.store.delete(keys)

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
        phase = workload.status.phase or "Pending"
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


class _AssignError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
