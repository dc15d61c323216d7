"""The waypoint process: xDS state in, certificate from the CA, HBONE on 15008, metrics on 15020.

It authenticates to the control plane with its node's credential (the runtime passes the file
in `MESHWAY_CREDENTIALS`), and asks the CA for the identity of its Gateway's service account:
`spiffe://<trust domain>/ns/<namespace>/sa/<gateway name>`, the identity source node proxies
expect of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydantic

from meshway.api.v1 import address_pb2, route_pb2
from meshway.hbone.pool import HboneConnectionPool
from meshway.hbone.server import HboneServer
from meshway.hbone.tls import WorkloadCredentials
from meshway.identity.caclient import CaClient
from meshway.identity.spiffe import SpiffeId
from meshway.node.admin import ADMIN_PORT, METRICS_PORT, READINESS_PORT, NodeAdmin
from meshway.node.certificates import CertificateManager
from meshway.node.inpod import PodNetns, listen_in
from meshway.node.main import run_until_signalled
from meshway.node.state import ProxyState, workload_identity
from meshway.policy.requestauth import RequestAuthIndex
from meshway.telemetry.metrics import WaypointMetrics
from meshway.waypoint.jwks import JwksCache, JwksFetcher, mesh_resolver
from meshway.waypoint.messages import ByteStream, TcpStream
from meshway.waypoint.proxy import WaypointDataPath
from meshway.waypoint.ratelimit import RateLimiter, RateLimitIndex
from meshway.waypoint.ratelimit_store import RedisStore
from meshway.waypoint.routing import RouteTable
from meshway.waypoint.tracing import TracingProviders, build_tracer, service_vip
from meshway.waypoint.traffic import TrafficPolicies
from meshway.waypoint.upstream import Endpoint, UpstreamPool
from meshway.xds.client import Update, XdsClient
from meshway.xds.types import ROUTE_TYPE, TRACING_CONFIG_KINDS, waypoint_types

log = logging.getLogger(__name__)

HBONE_PORT = 15008
DEFAULT_TRUST_DOMAIN = "cluster.local"


@dataclass
class WaypointConfig:
    namespace: str
    name: str
    xds_address: str
    token: str
    trust_bundle: bytes
    node: str
    cluster_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    cert_lifetime: timedelta | None = None
    access_log: bool = True
    listen_host: str = "0.0.0.0"
    # The pod network namespace the waypoint's sockets live in (None: the process's own).
    netns: Path | None = None
    # The Global rate limits' Redis (`redis://host:port/db`); None: they take their failure mode.
    ratelimit_store: str | None = None


class Waypoint:
    def __init__(self, config: WaypointConfig) -> None:
        self.config = config
        self.metrics = WaypointMetrics()
        self.state = ProxyState(config.node)
        self.routes: dict[str, Any] = {}
        self.xds = XdsClient(
            config.xds_address,
            f"waypoint~{config.namespace}/{config.name}",
            waypoint_types(),
            token=config.token,
            root_certificates=config.trust_bundle,
        )
        self.ca = CaClient(config.xds_address, config.token, config.trust_bundle)
        self.certs = CertificateManager(self.ca, self.metrics, config.cert_lifetime)  # type: ignore[arg-type]
        self.identity = SpiffeId(DEFAULT_TRUST_DOMAIN, config.namespace, config.name)
        self.hbone_pool = HboneConnectionPool()
        self.upstream = UpstreamPool(self._open)
        # JWK sets of RequestAuthentications' jwksUri, fetched from the waypoint's pod netns.
        self.jwks = JwksCache(
            JwksFetcher(
                mesh_resolver(lambda: self.state.services, config.cluster_domain), self._connect
            )
        )
        service = f"{config.namespace}/{config.name}.{config.namespace}.svc.{config.cluster_domain}"
        self.datapath = WaypointDataPath(
            (config.namespace, config.name),
            service,
            self.state,
            self.metrics,
            self.upstream,
            root_namespace=config.root_namespace,
            access_log_enabled=config.access_log,
        )
        self.ratelimit_store = (
            RedisStore(config.ratelimit_store) if config.ratelimit_store else None
        )
        self.datapath.ratelimiter = RateLimiter(self.ratelimit_store)
        self.server: HboneServer | None = None
        self.netns = PodNetns(config.netns) if config.netns is not None else None
        # Spans leave from the SDK's thread, moved into the pod's namespace like the sockets.
        self.tracing = TracingProviders(
            f"{config.name}.{config.namespace}",
            {"k8s.namespace.name": config.namespace},
            thread_init=self.netns.enter_this_thread if self.netns is not None else None,
        )
        self.ready = asyncio.Event()
        self._routes_changed = False
        self._warned_no_store = False
        self.xds.subscribe(self._on_update)

    # -- NodeAdmin's view ------------------------------------------------------------------

    def refresh_gauges(self) -> None:
        if self.server is not None:
            for reason, count in self.server.errors.items():
                self.metrics.hbone_errors.labels(reason=reason).set(count)

    def dump(self) -> dict[str, Any]:
        return {
            "gateway": f"{self.config.namespace}/{self.config.name}",
            "identity": self.identity.uri,
            "certificates": self.certs.dump(),
            "routes": sorted(self.routes),
            "policies": sorted(self.state.policies),
            "jwks": self.jwks.dump(),
            "services": sorted(self.state.services),
            "connections": {
                "downstream": self.server.active_connections if self.server else 0,
            },
        }

    # -- state -----------------------------------------------------------------------------

    def _on_update(self, update: Update) -> None:
        if update.type_url == ROUTE_TYPE:
            for name in update.removed:
                self.routes.pop(name, None)
            for name, message in update.updated.items():
                try:
                    self.routes[name] = _route_model(message)
                except (ValueError, pydantic.ValidationError) as exc:
                    log.warning("route %s ignored: %s", name, exc)
            self._routes_changed = True
        else:
            self.state.apply(update)
        if self._routes_changed:
            self._routes_changed = False
            self.datapath.update(**self._compile())
        else:
            self.datapath.update()
        own = self.state.workloads.get(f"{self.config.namespace}/{self.config.name}")
        if own is not None and own.trust_domain and own.trust_domain != self.identity.trust_domain:
            self.identity = SpiffeId(own.trust_domain, self.config.namespace, self.config.name)
        served = self._served_namespaces()
        self._update_tracing(served)
        self._prepare_ratelimit_store(served)

    def _prepare_ratelimit_store(self, served: set[str]) -> None:
        """Make the store's client (importing redis-py) as soon as a Global limit applies to
        a namespace this waypoint serves, so that the first request it checks does not wait
        for the import; and only then: every waypoint receives every namespace's policies,
        and redis-py costs a waypoint ~7 MB."""
        if not self.datapath.ratelimits.global_namespaces & served:
            return
        if self.ratelimit_store is not None:
            self.ratelimit_store.prepare()
        elif not self._warned_no_store:
            self._warned_no_store = True
            log.warning(
                "Global rate limits apply but no store is configured (--ratelimit-store or "
                "MESHWAY_RATELIMIT_STORE): they take their policies' failureMode"
            )

    def _served_namespaces(self) -> set[str]:
        """The namespaces of the Services and workloads that use this waypoint."""
        mine = self.datapath.service_name
        served = {s.namespace for s in self.state.services.values() if s.waypoint.service == mine}
        served |= {w.namespace for w in self.state.workloads.values() if w.waypoint.service == mine}
        return served

    def _update_tracing(self, served: set[str]) -> None:
        """Tracing from the Telemetry and MeshConfig resources; again after every update,
        since a provider's Service (and so its address) arrives as state too."""
        try:
            self.datapath.tracer = build_tracer(
                [r for r in self.routes.values() if r.KIND in TRACING_CONFIG_KINDS],
                (self.config.namespace, self.config.name),
                self.config.root_namespace,
                lambda host: service_vip(self.state.services.values(), host),
                self.tracing,
                node_id=f"waypoint~{self.config.namespace}/{self.config.name}",
                mesh_id=self.identity.trust_domain,
                served=served,
            )
        except Exception:  # telemetry must not stop the xDS stream or the data path
            log.exception("tracing configuration not applied")

    def _compile(self) -> dict[str, Any]:
        """What the data path is built from, out of the Route resources: the route table
        (HTTPRoutes, GRPCRoutes, and the FaultInjections and VirtualServices it compiles in),
        the traffic policies (DestinationRules: requests in flight keep being counted), the
        rate limits (unchanged limits keep their buckets) and the RequestAuthentications (JWK
        sets still named are kept); keyword arguments of `update`."""
        by_kind: dict[str, list[Any]] = {}
        for r in self.routes.values():
            by_kind.setdefault(r.KIND, []).append(r)
        ratelimits = RateLimitIndex.build(
            by_kind.get("RateLimitPolicy", []), self.datapath.ratelimits
        )
        self.jwks.begin()
        authn = RequestAuthIndex(
            by_kind.get("RequestAuthentication", []),
            (self.config.namespace, self.config.name),
            self.jwks,
            self.config.root_namespace,
        )
        self.jwks.end()
        return {
            "routes": RouteTable.build(
                [*by_kind.get("HTTPRoute", []), *by_kind.get("GRPCRoute", [])],
                self.config.cluster_domain,
                faults=by_kind.get("FaultInjection", []),
                virtual_services=by_kind.get("VirtualService", []),
            ),
            "traffic": TrafficPolicies.build(
                by_kind.get("DestinationRule", []),
                self.config.cluster_domain,
                self.config.root_namespace,
                active=self.datapath.traffic.active,
            ),
            "ratelimits": ratelimits,
            "authn": authn,
        }

    def _creds(self) -> WorkloadCredentials:
        creds = self.certs.current(self.identity)
        if creds is None:
            raise RuntimeError("no certificate yet")
        return creds

    async def _connect(self, address: tuple[str, int]) -> socket.socket:
        if self.netns is not None:
            return await self.netns.connect(address)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _open(self, endpoint: Endpoint) -> ByteStream:
        wl = endpoint.workload
        address = (endpoint.ip, endpoint.port)
        if wl.tunnel_protocol != address_pb2.HBONE:  # not in the mesh: plain TCP
            reader, writer = await asyncio.open_connection(sock=await self._connect(address))
            return TcpStream(reader, writer)

        async def dial() -> socket.socket:
            return await self._connect((endpoint.ip, HBONE_PORT))

        return await self.hbone_pool.open_stream(
            self._creds(),
            workload_identity(wl),
            endpoint.ip,
            HBONE_PORT,
            f"{endpoint.ip}:{endpoint.port}",
            dial=dial,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, listener: socket.socket) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.xds.run())
            await self.xds.wait_synced(None)
            self.datapath.update(**self._compile())
            await self.certs.get(self.identity)
            self.certs.retain({self.identity})
            tg.create_task(self.certs.run())
            self.server = HboneServer(listener, self._creds, self.datapath.handle_tunnel)
            settle_heap()
            self.ready.set()
            log.info(
                "waypoint %s/%s serving HBONE on %s as %s",
                self.config.namespace,
                self.config.name,
                self.server.address,
                self.identity.uri,
            )
            tg.create_task(self.server.serve())

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        self.datapath.access_log.flush()
        self.jwks.close()
        self.datapath.tracer = None
        await asyncio.to_thread(self.tracing.close)  # flushes the spans still queued
        await self.upstream.close()
        if self.ratelimit_store is not None:
            await self.ratelimit_store.close()
        await self.hbone_pool.close()
        await self.xds.close()
        await self.ca.close()
        if self.netns is not None:
            self.netns.close()


def _route_model(message: route_pb2.Route) -> Any:
    """The HTTPRoute or GRPCRoute a Route resource carries, validated by the same model the
    control plane validated it with (the xDS validator has checked it already)."""
    from meshway.config.model import KINDS

    return KINDS[message.kind].model_validate(json.loads(message.resource_json))


# Net allocations of tracked objects between two young collections (CPython: 700).
YOUNG_GC_THRESHOLD = 10_000


def settle_heap() -> None:
    """Tune the garbage collector for a proxy, once its configuration is loaded and before it
    serves.

    A request's objects are in flight across many collections at 50 concurrent requests, so
    with CPython's defaults a young collection ran every few dozen requests and promoted the
    requests in flight, and a full collection walked the whole heap (70-80 thousand objects,
    30-50 ms) every few thousand requests: 7-14 µs of every request's CPU. What was loaded at
    start is frozen (never walked again; still freed by reference counting), and young
    collections run after 10,000 net allocations instead of 700. The request path leaves no
    cyclic garbage (tests/unit/test_waypoint_http1.py), so little waits for the collector.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)


async def run_waypoint(config: WaypointConfig) -> None:
    waypoint = Waypoint(config)
    admin = NodeAdmin(waypoint)  # type: ignore[arg-type]
    netns = waypoint.netns
    sockets = {
        METRICS_PORT: await listen_in(netns, "0.0.0.0", METRICS_PORT),
        READINESS_PORT: await listen_in(netns, "0.0.0.0", READINESS_PORT),
        ADMIN_PORT: await listen_in(netns, "127.0.0.1", ADMIN_PORT),
    }
    await admin.start(sockets)
    listener = await listen_in(netns, config.listen_host, HBONE_PORT)
    try:
        await run_until_signalled(waypoint.run(listener))
    finally:
        await waypoint.close()
        await admin.stop()
        log.info("waypoint %s/%s stopped", config.namespace, config.name)
