"""Which replica of a waypoint a node proxy sends a new tunnel to.

Dialling the waypoint Service's VIP would let nftables DNAT spread *connections*; but the HBONE
pool keeps one connection per address and multiplexes every tunnel over it, so one node proxy
would send all its tunnels to one replica. Like ztunnel, the node proxy picks one of the
waypoint's endpoints (the Workloads of its Service that have an address, from the xDS state)
for each new tunnel and dials the pod IP; the pool then holds one connection per replica.

Order: round robin over the replicas, per waypoint. A replica whose dial failed is tried last
for `EJECT_SECONDS`, so that a replica that is starting or going away costs one failed dial, not
one per tunnel. A tunnel tries at most `MAX_ATTEMPTS` replicas. With no endpoint known (an
older control plane, or a Service whose replicas are not in this proxy's state yet) it dials
the VIP as before.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from meshway.api.v1 import address_pb2
from meshway.node.state import ProxyState, ip_text

MAX_ATTEMPTS = 3
EJECT_SECONDS = 5.0
DEFAULT_HBONE_PORT = 15008


class WaypointEndpoints:
    """Dial order for tunnels to waypoints; the data path reports failed dials back."""

    def __init__(self, state: ProxyState, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.clock = clock
        self._next: dict[str, itertools.count[int]] = {}
        self._ejected: dict[tuple[str, int], float] = {}

    def endpoints(self, waypoint: address_pb2.GatewayAddress) -> list[tuple[str, int]]:
        """The replicas' pod addresses for the waypoint's HBONE port, sorted."""
        port = waypoint.hbone_mtls_port or DEFAULT_HBONE_PORT
        found = {
            (ip_text(wl.addresses[0]), target)
            for wl, service_port, target in self.state.indexes.endpoints.get(waypoint.service, ())
            if service_port == port and wl.addresses
        }
        return sorted(found)

    def dial_order(self, waypoint: address_pb2.GatewayAddress) -> list[tuple[str, int]]:
        """Where a new tunnel to `waypoint` tries to go, first choice first (at most
        MAX_ATTEMPTS); the VIP alone when no replica is known, nothing without a VIP."""
        endpoints = self.endpoints(waypoint)
        if not endpoints:
            port = waypoint.hbone_mtls_port or DEFAULT_HBONE_PORT
            vip = ip_text(waypoint.address.address) if waypoint.address.address else ""
            return [(vip, port)] if vip else []
        counter = self._next.setdefault(waypoint.service, itertools.count())
        start = next(counter) % len(endpoints)
        rotated = endpoints[start:] + endpoints[:start]
        now = self.clock()
        healthy = [e for e in rotated if self._ejected.get(e, 0.0) <= now]
        ejected = [e for e in rotated if self._ejected.get(e, 0.0) > now]
        return (healthy + ejected)[:MAX_ATTEMPTS]

    def failed(self, endpoint: tuple[str, int]) -> None:
        """A dial to `endpoint` failed: try it last for a while."""
        now = self.clock()
        self._ejected = {e: t for e, t in self._ejected.items() if t > now}
        self._ejected[endpoint] = now + EJECT_SECONDS

    def succeeded(self, endpoint: tuple[str, int]) -> None:
        self._ejected.pop(endpoint, None)
