"""The node proxy's view of the mesh: what the xDS client delivered, indexed for the data path.

Only the xDS client writes it (through `apply`); the data path only reads. Derived indexes
(by IP, by VIP, service endpoints) are rebuilt lazily after a change, so a burst of updates
costs one rebuild.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field

from meshway.api.v1 import address_pb2, authorization_pb2
from meshway.config.labels import LABEL_PROXY_MODE, PROXY_MODE_SIDECAR
from meshway.identity.spiffe import SpiffeId
from meshway.xds.client import Update
from meshway.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE


def ip_text(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def workload_identity(wl: address_pb2.Workload) -> SpiffeId:
    return SpiffeId(wl.trust_domain, wl.namespace, wl.service_account or "default")


@dataclass(frozen=True)
class Upstream:
    """Where an outbound connection goes."""

    address: tuple[str, int]
    # None: plain TCP passthrough (the destination is not in the mesh).
    identity: SpiffeId | None
    workload: address_pb2.Workload | None
    service: address_pb2.Service | None
    # Set when the traffic must go through a waypoint: dial this instead, with the original
    # destination in :authority.
    waypoint: address_pb2.GatewayAddress | None = None


@dataclass
class _Indexes:
    workloads_by_ip: dict[str, address_pb2.Workload] = field(default_factory=dict)
    services_by_vip: dict[tuple[str, int], address_pb2.Service] = field(default_factory=dict)
    endpoints: dict[str, list[tuple[address_pb2.Workload, int, int]]] = field(default_factory=dict)


class ProxyState:
    def __init__(self, node: str) -> None:
        self.node = node
        self.workloads: dict[str, address_pb2.Workload] = {}
        self.services: dict[str, address_pb2.Service] = {}
        self.policies: dict[str, authorization_pb2.Authorization] = {}
        self._indexes: _Indexes | None = None
        self._round_robin: dict[str, itertools.count[int]] = {}

    def apply(self, update: Update) -> None:
        if update.type_url == ADDRESS_TYPE:
            for name in update.removed:
                self.workloads.pop(name, None)
                self.services.pop(name, None)
            for name, address in update.updated.items():
                if address.WhichOneof("type") == "workload":
                    self.services.pop(name, None)
                    self.workloads[name] = address.workload
                else:
                    self.workloads.pop(name, None)
                    self.services[name] = address.service
            self._indexes = None
        elif update.type_url == AUTHORIZATION_TYPE:
            for name in update.removed:
                self.policies.pop(name, None)
            self.policies.update(update.updated)

    @property
    def indexes(self) -> _Indexes:
        if self._indexes is None:
            idx = _Indexes()
            for wl in self.workloads.values():
                for raw in wl.addresses:
                    idx.workloads_by_ip[ip_text(raw)] = wl
                for service, ports in wl.services.items():
                    for mapping in ports.ports:
                        idx.endpoints.setdefault(service, []).append(
                            (wl, mapping.service_port, mapping.target_port)
                        )
            for name, svc in self.services.items():
                for addr in svc.addresses:
                    for port in svc.ports:
                        idx.services_by_vip[(ip_text(addr.address), port.service_port)] = svc
                idx.endpoints.setdefault(name, [])
            self._indexes = idx
        return self._indexes

    def local_workloads(self, only_pod: str | None = None) -> list[address_pb2.Workload]:
        """The pods this proxy captures: enrolled workloads scheduled on this node.

        A node proxy leaves out pods labelled `meshway.io/proxy: sidecar`; a sidecar
        (`only_pod`) takes exactly its own pod.
        """
        return [
            wl
            for wl in self.workloads.values()
            if wl.node == self.node
            and wl.tunnel_protocol == address_pb2.HBONE
            and wl.addresses
            and (
                wl.uid == only_pod
                if only_pod is not None
                else wl.labels.get(LABEL_PROXY_MODE) != PROXY_MODE_SIDECAR
            )
        ]

    def workload_by_ip(self, ip: str) -> address_pb2.Workload | None:
        return self.indexes.workloads_by_ip.get(ip)

    def resolve(self, ip: str, port: int) -> Upstream | None:
        """Where a connection to ip:port goes; None when a Service has no endpoint."""
        idx = self.indexes
        service = idx.services_by_vip.get((ip, port))
        if service is not None:
            key = f"{service.namespace}/{service.hostname}"
            if service.HasField("waypoint"):
                return Upstream((ip, port), None, None, service, service.waypoint)
            candidates = [
                (wl, target)
                for wl, service_port, target in idx.endpoints.get(key, [])
                if service_port == port and wl.addresses
            ]
            if not candidates:
                return None
            counter = self._round_robin.setdefault(key, itertools.count())
            wl, target = candidates[next(counter) % len(candidates)]
            return self._to_workload(wl, target, service)
        target_wl = idx.workloads_by_ip.get(ip)
        if target_wl is None:
            return Upstream((ip, port), None, None, None)
        return self._to_workload(target_wl, port, None)

    def _to_workload(
        self, wl: address_pb2.Workload, port: int, service: address_pb2.Service | None
    ) -> Upstream:
        address = (ip_text(wl.addresses[0]), port)
        if wl.HasField("waypoint") and service is None:
            return Upstream(address, None, wl, None, wl.waypoint)
        if wl.tunnel_protocol != address_pb2.HBONE:
            return Upstream(address, None, wl, service)
        return Upstream(address, workload_identity(wl), wl, service)

    def service_name_for(self, service: address_pb2.Service | None) -> str:
        return service.hostname if service is not None else "unknown"
