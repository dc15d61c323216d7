"""The waypoint's data path: HBONE in, L7 policy and routing, HBONE out.

A source node proxy sends a destination's traffic here when the destination uses this
waypoint (`istio.io/use-waypoint`), as an HBONE tunnel whose `:authority` is the original
destination (a Service VIP and port, or a workload's IP and port) and whose peer certificate
is the *client's* identity. For each tunnel the waypoint:

1. checks that the destination uses this waypoint (anything else is refused: a waypoint is
   not an open relay);
2. picks the protocol from the Service port's `appProtocol`, or by sniffing the first bytes
   (the HTTP/2 preface, an HTTP/1.1 request line, else opaque TCP);
3. for HTTP, per request: L7 authorization (targetRefs policies, with the client's identity),
   route matching (HTTPRoute/GRPCRoute), filters, a weighted backend, an endpoint, timeouts and
   retries, then a pooled upstream connection to the endpoint's node proxy over HBONE with the
   waypoint's own identity; for TCP, one tunnel to an endpoint and bytes both ways;
4. reports each request (Istio's metrics with `reporter="waypoint"`, one JSON access-log line).

Response flags follow Envoy's: NR no route, UH no healthy upstream, UF upstream connection
failure, UC upstream connection termination, UT upstream request timeout, URX retries
exhausted, DC downstream connection termination, DI delay injected, FI fault (abort)
injected, RL rate limited, RLSE rate limit store unavailable (a RateLimitPolicy failing
closed), and "-" for none.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from meshway.api.v1 import address_pb2
from meshway.hbone.errors import HboneError
from meshway.hbone.server import HboneRequest
from meshway.identity.spiffe import SpiffeId
from meshway.node.state import ProxyState, ip_text, workload_identity
from meshway.policy.authorization import Decision
from meshway.policy.requestauth import (
    Authenticator,
    AuthnResult,
    RequestAuth,
    RequestAuthIndex,
    www_authenticate,
)
from meshway.policy.waypoint import (
    DENIED_BODY,
    L7PolicySet,
    RequestContext,
    WaypointPolicyIndex,
    normalize_target,
)
from meshway.telemetry.metrics import WaypointMetrics
from meshway.waypoint.faults import Fault, inject, merge_flags
from meshway.waypoint.http1 import copy_both_ways, serve_h1
from meshway.waypoint.http2 import serve_h2
from meshway.waypoint.messages import (
    STREAM_ERRORS,
    Body,
    BodyError,
    ByteStream,
    Request,
    Response,
    UpstreamError,
    simple_response,
)
from meshway.waypoint.protocols import sniff
from meshway.waypoint.ratelimit import (
    AppliedLimit,
    Denial,
    RateLimiter,
    RateLimitIndex,
    StoreFailure,
)
from meshway.waypoint.routing import (
    FilterChain,
    Mirror,
    RetryPolicy,
    RouteTable,
    ServiceRoutes,
    Timeouts,
)
from meshway.waypoint.traffic import (
    Cluster,
    HashKey,
    Limiter,
    Overflow,
    ServicePolicy,
    TrafficPolicies,
)
from meshway.waypoint.upstream import DEFAULT_CONNECTION, Endpoint, UpstreamPool

if TYPE_CHECKING:
    from meshway.waypoint.tracing import RequestSpan, TracedDestination, WaypointTracer

log = logging.getLogger(__name__)
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SNIFF_TIMEOUT = 1.0
# Request bodies up to this size are kept so that a retry can send them again.
RETRY_BUFFER = 64 * 1024
# RequestMirror: the largest body copied, the longest a copy may take, and how many copies may
# be on their way at once (beyond, a copy is dropped rather than queued).
MIRROR_BODY = 64 * 1024
MIRROR_TIMEOUT = 10.0
MAX_MIRRORS_IN_FLIGHT = 1024
_MIRROR_ERRORS: tuple[type[Exception], ...] = (
    TimeoutError,
    UpstreamError,
    BodyError,
    *STREAM_ERRORS,
)
_HTTP2_PROTOCOLS = frozenset({"http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c"})
_HTTP1_PROTOCOLS = frozenset({"http", "http1", "http/1.1", "kubernetes.io/ws"})
_TCP_PROTOCOLS = frozenset({"tcp", "mongo", "mysql", "redis", "tls", "https", "kubernetes.io/wss"})


@dataclass(slots=True)
class Destination:
    """The original destination of a tunnel: a Service port, or a workload's port."""

    port: int
    service: address_pb2.Service | None = None
    workload: address_pb2.Workload | None = None
    app_protocol: str = ""

    @property
    def hostname(self) -> str:
        return self.service.hostname if self.service is not None else "unknown"

    @property
    def workload_namespace(self) -> str:
        return self.workload.namespace if self.workload is not None else ""

    # `ip`, worked out on first use (once per tunnel, not per request).
    _ip: IpAddress | None = field(default=None, init=False, repr=False)

    @property
    def ip(self) -> IpAddress:
        if self._ip is None:
            if self.service is not None and self.service.addresses:
                self._ip = ipaddress.ip_address(self.service.addresses[0].address)
            elif self.workload is not None and self.workload.addresses:
                self._ip = ipaddress.ip_address(self.workload.addresses[0])
            else:
                self._ip = ipaddress.IPv4Address(0)
        return self._ip


@dataclass(slots=True)
class Downstream:
    """What the waypoint knows about the client of one tunnel."""

    identity: SpiffeId
    ip: str
    workload: address_pb2.Workload | None
    destination: Destination
    source_ip: IpAddress = field(init=False)
    # The source half of the request metrics' labels, the same for every request of a tunnel.
    source_labels: tuple[str, str, str, str] = field(init=False)
    # `_report`'s work for each endpoint this tunnel's requests went to.
    report_cache: dict[tuple[str, int] | None, tuple[Endpoint | None, tuple[str, ...], str]] = (
        field(init=False, default_factory=dict)
    )
    # What applies to this tunnel's requests (`WaypointDataPath._plan`).
    plan: Plan | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.source_ip = ipaddress.ip_address(self.ip)
        src = self.workload
        self.source_labels = (
            "waypoint",
            src.canonical_name if src is not None else "unknown",
            src.namespace if src is not None else "unknown",
            self.identity.uri,
        )


@dataclass(slots=True)
class Plan:
    """What the configuration applies to one tunnel's requests (its destination, its client's
    namespace), looked up once per configuration generation rather than once per request."""

    generation: int
    authenticator: Authenticator | None
    policies: L7PolicySet
    routes: ServiceRoutes | None
    tracing: TracedDestination | None
    # The RateLimitPolicy limits, by the route a request matched (None: no route).
    limits: dict[str | None, tuple[AppliedLimit, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: a Service port (or a subset of it), or a workload's port."""

    service: address_pb2.Service | None
    workload: address_pb2.Workload | None
    port: int
    subset: str | None = None


@dataclass(slots=True)
class InFlight:
    """A request sent to an endpoint and not finished yet, with its connection-pool slot."""

    endpoint: Endpoint
    limiter: Limiter | None


@dataclass(slots=True)
class Outcome:
    """How one request went, for telemetry."""

    flags: str = "-"
    endpoint: Endpoint | None = None
    route: str = ""
    attempts: int = 0
    upstream_ms: float | None = None
    details: str = ""
    # The request whose response is still being relayed (in flight to its endpoint).
    in_flight: InFlight | None = None
    # DI and/or FI when a fault was injected (`faults.py`), added to `flags` when reported.
    fault_flags: str = ""
    # Its `x-request-id`, once the waypoint made sure it has one.
    request_id: str | None = None
    # The request's span, when it is sampled (`tracing.py`).
    span: RequestSpan | None = None


class WaypointDataPath:
    """Everything per tunnel and per request; the process around it lives in `server.py`."""

    def __init__(
        self,
        gateway: tuple[str, str],
        service_name: str,
        state: ProxyState,
        metrics: WaypointMetrics,
        upstream: UpstreamPool,
        *,
        root_namespace: str = "istio-system",
        access_log_enabled: bool = True,
    ) -> None:
        self.gateway = gateway
        self.service_name = service_name
        self.state = state
        self.metrics = metrics
        self.upstream = upstream
        self.routes = RouteTable.build([])
        self.policies = WaypointPolicyIndex([], gateway, root_namespace)
        self.authn = RequestAuthIndex([], gateway, root_namespace=root_namespace)
        self.root_namespace = root_namespace
        self.access_log_enabled = access_log_enabled
        self.access_log = AccessLog(sys.stderr)
        self.traffic = TrafficPolicies.build([])
        self.ratelimits = RateLimitIndex()
        self.ratelimiter = RateLimiter(None)
        self._services_by_name: dict[tuple[str, str], address_pb2.Service] | None = None
        # `resolve`'s answers by (id(service), port, subset), with the Service they are for.
        self._resolved: dict[
            tuple[int, int, str | None],
            tuple[address_pb2.Service, Cluster | None, list[Endpoint]],
        ] = {}
        self._rand = random.random
        self._mirroring: set[asyncio.Future[None]] = set()
        # Request tracing (Telemetry), None when nothing is traced.
        self._tracer: WaypointTracer | None = None
        # Bumped by every change of configuration: tunnels' `Plan`s of older ones are stale.
        self.generation = 0

    @property
    def tracer(self) -> WaypointTracer | None:
        return self._tracer

    @tracer.setter
    def tracer(self, tracer: WaypointTracer | None) -> None:
        self._tracer = tracer
        self.generation += 1

    def update(
        self,
        routes: RouteTable | None = None,
        traffic: TrafficPolicies | None = None,
        ratelimits: RateLimitIndex | None = None,
        authn: RequestAuthIndex | None = None,
    ) -> None:
        """New mesh state: rebuild the policy index, and the routes, traffic policies, rate
        limits and RequestAuthentications when they changed."""
        if routes is not None:
            self.routes = routes
        if traffic is not None:
            self.traffic = traffic
        if ratelimits is not None:
            self.ratelimits = ratelimits
        if authn is not None:
            self.authn = authn
        self._services_by_name = None
        self._resolved = {}
        self.policies = WaypointPolicyIndex(
            self.state.policies.values(), self.gateway, self.root_namespace
        )
        self.generation += 1

    def _plan(self, down: Downstream) -> Plan:
        """What applies to the requests of `down`'s tunnel under the current configuration."""
        dest = down.destination
        svc = dest.service
        namespace, name = (
            (svc.namespace, svc.name) if svc is not None else (dest.workload_namespace, "")
        )
        routes = (
            self.routes.for_service(
                namespace, name, dest.port, client_namespace=down.identity.namespace
            )
            if svc is not None
            else None
        )
        plan = Plan(
            self.generation,
            None if self.authn.empty else self.authn.for_target(namespace, name),
            self.policies.policy_set(namespace, name),
            routes,
            self._tracer.destination(dest) if self._tracer is not None else None,
        )
        down.plan = plan
        return plan

    def _limits(self, plan: Plan, dest: Destination, route: str | None) -> tuple[AppliedLimit, ...]:
        """The rate limits for a request to `dest` that matched `route`, once per plan."""
        try:
            return plan.limits[route]
        except KeyError:
            svc = dest.service
            assert svc is not None
            routes = plan.routes
            found = plan.limits[route] = self.ratelimits.lookup(
                svc.namespace, svc.name, routes.kind if routes is not None else None, route
            )
            return found

    # -- tunnels ---------------------------------------------------------------------------

    def destination(self, ip: str, port: int) -> Destination | None:
        """The tunnel's destination if it uses this waypoint, else None."""
        idx = self.state.indexes
        svc = idx.services_by_vip.get((ip, port))
        if svc is not None:
            if svc.waypoint.service != self.service_name:
                return None
            app = next((p.app_protocol for p in svc.ports if p.service_port == port), "")
            return Destination(port, service=svc, app_protocol=app.lower())
        wl = idx.workloads_by_ip.get(ip)
        if wl is None or wl.waypoint.service != self.service_name:
            return None
        return Destination(port, workload=wl)

    async def handle_tunnel(self, request: HboneRequest) -> None:
        ip = str(request.target_ip)
        dest = self.destination(ip, request.target_port)
        if dest is None:
            self.metrics.tunnels.labels(outcome="refused", protocol="-").inc()
            request.refuse(403, f"{request.authority} does not use waypoint {self.service_name}")
            return
        request.accept()
        source_ip = _forwarded_for(request.headers) or request.peer_address[0]
        down = Downstream(
            request.peer_identity,
            source_ip,
            self.state.workload_by_ip(source_ip),
            dest,
        )
        stream = request.stream
        protocol, first = await self._protocol(stream, dest)
        self.metrics.tunnels.labels(outcome="accepted", protocol=protocol).inc()
        try:
            if protocol == "http1":
                await serve_h1(stream, lambda req: self.serve(down, req), initial=first)
            elif protocol == "http2":
                await serve_h2(stream, lambda req: self.serve(down, req), initial=first)
            else:
                await self._tcp(down, stream, first)
        except (HboneError, ConnectionError, OSError) as exc:
            log.debug("tunnel from %s ended: %s", request.peer_identity, exc)

    async def _protocol(self, stream: ByteStream, dest: Destination) -> tuple[str, bytes]:
        """The tunnel's protocol, from the port's appProtocol or its first bytes.

        A port declared `http` may still receive HTTP/2 with prior knowledge (Envoy's codec
        is "auto" there too), so HTTP ports are sniffed between the two; what is neither goes
        to the HTTP/1.1 server, which answers 400.
        """
        app = dest.app_protocol
        if app in _HTTP2_PROTOCOLS:
            return "http2", b""
        if app in _TCP_PROTOCOLS:
            return "tcp", b""
        first = b""
        try:
            async with asyncio.timeout(SNIFF_TIMEOUT):
                while True:
                    data = await stream.read(65536)
                    if not data:
                        return "tcp", first
                    first += data
                    kind = sniff(first)
                    if kind:
                        break
        except TimeoutError:  # a server-first protocol, or a slow client: opaque TCP
            kind = "tcp"
        if kind == "tcp" and app in _HTTP1_PROTOCOLS:
            kind = "http1"
        return kind, first

    async def _tcp(self, down: Downstream, stream: ByteStream, first: bytes) -> None:
        started = time.monotonic()
        dest = down.destination
        target = Target(dest.service, dest.workload, dest.port)
        endpoint, cluster, _ = self.choose(target, HashKey(None, down.ip))
        outcome = Outcome()
        sent = received = 0
        if endpoint is None:
            outcome.flags = "UH"
            stream.abort()
        else:
            outcome.endpoint = endpoint
            flight = self._started(endpoint)
            try:
                upstream = await self.upstream.open(
                    endpoint, cluster.connection if cluster is not None else DEFAULT_CONNECTION
                )
            except UpstreamError as exc:
                outcome.flags = "UF"
                outcome.details = str(exc)
                stream.abort()
            else:
                sent, received = await copy_both_ways(stream, upstream, first)
            finally:
                self._finished(flight)
        self._report(down, "tcp", None, 0, outcome, started, sent, received)

    # -- requests --------------------------------------------------------------------------

    async def serve(self, down: Downstream, request: Request) -> Response:
        """One HTTP request, start to finish (the response body may still be streaming)."""
        started = time.monotonic()
        outcome = Outcome()
        try:
            plan = down.plan
            if plan is None or plan.generation != self.generation:
                plan = self._plan(down)
            if plan.tracing is not None and self._tracer is not None:
                outcome.span = self._tracer.start(down, request, plan.tracing)
            response = await self._serve(down, request, outcome, plan)
        except Exception as exc:
            log.exception("waypoint request failed")
            outcome.flags = "-"
            outcome.details = f"internal error: {exc}"
            response = simple_response(500, "internal error\n")
        if (request.header("content-type") or "").startswith("application/grpc") and not (
            response.header("content-type") or ""
        ).startswith("application/grpc"):
            # A gRPC client needs a gRPC status, whoever answered (gRPC's HTTP mapping).
            text = response.body.copy()
            message = text.read_nowait().decode(errors="replace").strip() if text else ""
            response.body.cancel()
            response = grpc_error(_GRPC_STATUS.get(response.status, 2), message)
        self._track(down, request, response, outcome, started)
        return response

    async def _serve(
        self, down: Downstream, request: Request, outcome: Outcome, plan: Plan
    ) -> Response:
        dest = down.destination
        # Policy, routes and the backend all see the same, normalized path.
        request.path = normalize_target(request.path)
        # RequestAuthentication (JWT), then authorization with its request principal.
        auth: RequestAuth | None = None
        authenticator = plan.authenticator
        if authenticator is not None and (found := authenticator.tokens(request)):
            result = await authenticator.authenticate(request, time.time(), found)
            if result.error is not None:
                outcome.details = result.details
                return _unauthenticated(request, result)
            auth = result.auth
        policies = plan.policies
        if not policies.empty:
            decision = (auth is None and policies.unauthenticated) or self._authorize(
                down, request, policies, auth
            )
            if not decision.allowed:
                outcome.details = f"rbac_access_denied: {decision.reason}"
                return simple_response(403, DENIED_BODY)
        rid = request.header("x-request-id")
        if rid is None:
            rid = request_id()
            request.headers.append(("x-request-id", rid))
        outcome.request_id = rid
        timeouts: Timeouts | None = None
        retry: RetryPolicy | None = None
        target = Target(dest.service, dest.workload, dest.port)
        match = None
        passive = True  # the route's and backend's filter chains cannot act
        if dest.service is not None:
            routes = plan.routes
            if routes is not None:
                match = routes.match(request)
                if match is None:
                    outcome.flags = "NR"
                    return simple_response(404, "no route matched\n")
                outcome.route = match.route
            # RateLimitPolicy (ratelimit.py): after the route match, which a route's limits
            # need, and before anything is sent anywhere.
            limits = self._limits(plan, dest, outcome.route or None)
            if limits:
                limiter = self.ratelimiter
                denial, taken, remote = limiter.take_local(limits, down.identity.uri, request)
                verdict: Denial | StoreFailure | None = denial
                if denial is None and remote:  # only Global limits need to wait for anything
                    verdict = await limiter.take_global(taken, remote)
                if verdict is not None:
                    limited = self._rate_limited(verdict, outcome)
                    if limited is not None:
                        return limited
            if match is not None:
                rule = match.rule
                # Chains that cannot act (no filter, no mirror or fault that can fire) are
                # skipped whole: most routes only route.
                if not rule.filters.passive:
                    answer = await self._apply_chain(rule.filters, request, match.port, outcome)
                    if answer is not None:
                        return answer
                backend = match.pick_backend(self._rand)
                if backend is None:
                    outcome.flags = "NR"
                    if rule.grpc:
                        return grpc_error(14, "no valid backend")
                    return simple_response(500, "no valid backend\n")
                if not backend.filters.passive:  # the picked backend's own filters
                    answer = await self._apply_chain(backend.filters, request, match.port, outcome)
                    if answer is not None:
                        return answer
                service = self._service(backend.namespace, backend.name)
                if service is None:
                    outcome.flags = "UH"
                    return simple_response(500, f"backend {backend.name} not found\n")
                target = Target(service, dest.workload, backend.port, backend.subset)
                timeouts = rule.timeouts
                retry = rule.retry
                passive = rule.filters.passive and backend.filters.passive
                if not passive:
                    rand = self._rand
                    chosen = [m for m in match.mirrors if m.fraction > 0 and rand() < m.fraction]
                    if chosen:
                        await self._mirror(down, request, chosen)
        response = await self._forward(down, request, target, timeouts, retry, outcome)
        if match is not None and not passive:
            match.apply_response_filters(response)
        return response

    async def _apply_chain(
        self, chain: FilterChain, request: Request, port: int, outcome: Outcome
    ) -> Response | None:
        """A route rule's or a backend's filters: its fault first (before the router's work,
        as Envoy's fault filter), then its request filters; an answer ends the request."""
        fault = chain.fault
        if fault is not None and fault.active:
            aborted = await self._inject_fault(fault, outcome)
            if aborted is not None:
                return aborted
        return chain.apply_request(request, port)

    async def _inject_fault(self, fault: Fault, outcome: Outcome) -> Response | None:
        """A route's fault: its delay (not counted in the route's timeout, which starts in
        `_forward`), then its abort answer if drawn (None: the request goes on)."""
        flags, answer = await inject(fault, self._rand)
        if flags:
            outcome.fault_flags = merge_flags(outcome.fault_flags, flags)
        if answer is not None:
            outcome.details = "fault_filter_abort"
        return answer

    async def _mirror(self, down: Downstream, request: Request, chosen: Sequence[Mirror]) -> None:
        """Send copies of `request` to the mirrors its draw picked, without waiting for them.

        A copy needs the whole body: one that has arrived, or one of a known length up to
        MIRROR_BODY (read here and handed to the request again); a request whose body is
        larger or still streaming in is not mirrored. As Envoy does, the copy's authority gets
        "-shadow" appended, and its response is dropped.
        """
        body = request.body
        size = body.length if body.length is not None else (body.buffered if body.ended else None)
        if size is None or size > MIRROR_BODY:
            self.metrics.mirrors.labels(outcome="body_not_copied").inc(len(chosen))
            return
        try:
            data = await body.read_all()
        except BodyError:
            return  # the primary request fails the same way when it is forwarded
        request.body = Body.of(data, body.trailers)
        for mirror in chosen:
            if len(self._mirroring) >= MAX_MIRRORS_IN_FLIGHT:
                self.metrics.mirrors.labels(outcome="too_many_in_flight").inc()
                continue
            copy = Request(
                request.method,
                request.path,
                f"{request.authority}-shadow",
                list(request.headers),
                Body.of(data, body.trailers),
                request.scheme,
                request.protocol,
            )
            task = asyncio.ensure_future(self._send_mirror(down, copy, mirror))
            self._mirroring.add(task)
            task.add_done_callback(self._mirroring.discard)

    async def _send_mirror(self, down: Downstream, request: Request, mirror: Mirror) -> None:
        service = self._service(mirror.namespace, mirror.name)
        target = Target(service, None, mirror.port)
        endpoint = self.pick_endpoint(target, HashKey(request, down.ip)) if service else None
        if endpoint is None:
            self.metrics.mirrors.labels(outcome="no_endpoint").inc()
            return
        try:
            async with asyncio.timeout(MIRROR_TIMEOUT):
                http2 = upstream_http2(down.destination.app_protocol, request)
                response = await self.upstream.request(endpoint, request, http2)
                await response.body.read_all()  # read to the end: the connection stays usable
        except _MIRROR_ERRORS as exc:
            log.debug("mirror to %s failed: %s", mirror.hostname, exc)
            self.metrics.mirrors.labels(outcome="failed").inc()
            return
        self.metrics.mirrors.labels(outcome="sent").inc()

    def _rate_limited(self, verdict: Denial | StoreFailure, outcome: Outcome) -> Response | None:
        """The answer to a request a RateLimitPolicy denied; None when the store failed and
        the failure mode let it through (noted in the access log and the metrics)."""
        if isinstance(verdict, StoreFailure):
            self.metrics.rate_limit_store_failures.labels(failure_mode="Open").inc()
            outcome.details = f"rate_limit_store_unavailable: {verdict.reason}"
            return None
        outcome.flags = verdict.flags
        outcome.details = verdict.details
        if verdict.limit is None:
            self.metrics.rate_limit_store_failures.labels(failure_mode="Closed").inc()
        else:
            limit = verdict.limit
            self.metrics.rate_limited.labels(
                policy=limit.policy, limit=limit.name, target=limit.target, scope=limit.scope
            ).inc()
        return simple_response(
            verdict.status, verdict.body, [("retry-after", str(verdict.retry_after))]
        )

    @staticmethod
    def _authorize(
        down: Downstream, request: Request, policy_set: L7PolicySet, auth: RequestAuth | None
    ) -> Decision:
        dest = down.destination
        ctx = RequestContext(
            down.source_ip,
            down.identity,
            dest.ip,
            dest.port,
            request.method,
            request.path,
            request.authority,
            request.headers,
            auth,
        )
        return policy_set.evaluate(ctx)

    def _service(self, namespace: str, name: str) -> address_pb2.Service | None:
        """A Service by namespace and name, from an index rebuilt after each update (a route's
        backend is looked up for every request; the state is keyed by hostname)."""
        index = self._services_by_name
        if index is None:
            index = {}
            for svc in self.state.services.values():
                index.setdefault((svc.namespace, svc.name), svc)
            self._services_by_name = index
        return index.get((namespace, name))

    def pick_endpoint(self, target: Target, key: HashKey) -> Endpoint | None:
        """The endpoint for `target` by its cluster's load balancer, past ejected endpoints
        (or the workload itself); None when there is none."""
        return self.choose(target, key)[0]

    def choose(
        self, target: Target, key: HashKey
    ) -> tuple[Endpoint | None, Cluster | None, list[Endpoint]]:
        """`pick_endpoint`, with the cluster it picked in and that cluster's endpoints (a
        workload target has neither), from one lookup of the DestinationRule."""
        if target.service is None:
            workload = target.workload
            if workload is None or not workload.addresses:
                return None, None, []
            endpoint = Endpoint(
                workload,
                ip_text(workload.addresses[0]),
                target.port,
                workload_identity(workload).uri,
            )
            return endpoint, None, []
        cluster, candidates = self.resolve(target)
        if cluster is None or not candidates:
            return None, cluster, candidates
        return cluster.pick(candidates, key), cluster, candidates

    def resolve(self, target: Target) -> tuple[Cluster | None, list[Endpoint]]:
        """A Service port (or subset) as a cluster (its DestinationRule's load balancer,
        limits and outlier detection) and its endpoints, from one lookup of the rule.
        (None, []) for a workload target, and for a subset no DestinationRule defines."""
        service = target.service
        if service is None:
            return None, []
        key = (id(service), target.port, target.subset)
        found = self._resolved.get(key)
        if found is not None and found[0] is service:
            return found[1], found[2]
        cluster: Cluster | None = None
        candidates: list[Endpoint] = []
        policy = self.traffic.for_service(service.namespace, service.name)
        if policy is not None:
            if target.subset is None or target.subset in policy.subsets:
                cluster = policy.cluster(target.port, target.subset)
        elif target.subset is None:
            cluster = self.traffic.default_cluster(service.namespace, service.name, target.port)
        if cluster is not None:
            candidates = self._candidates(service, target.port, target.subset, policy)
        self._resolved[key] = (service, cluster, candidates)
        return cluster, candidates

    def _candidates(
        self,
        service: address_pb2.Service,
        port: int,
        subset: str | None,
        policy: ServicePolicy | None,
    ) -> list[Endpoint]:
        """The service's endpoints for `port` (of `subset`); `resolve` keeps them until the
        next update."""
        key = f"{service.namespace}/{service.hostname}"
        candidates = [
            Endpoint(wl, ip_text(wl.addresses[0]), target, workload_identity(wl).uri)
            for wl, service_port, target in self.state.indexes.endpoints.get(key, [])
            if service_port == port and wl.addresses
        ]
        if subset is None:
            return candidates
        assert policy is not None  # `resolve` checked that the subset is defined
        chosen = policy.subsets[subset]
        return [e for e in candidates if chosen.selects(e.workload.labels)]

    def _started(self, endpoint: Endpoint, limiter: Limiter | None = None) -> InFlight:
        """A request (or a TCP connection) to `endpoint` begins (for LEAST_REQUEST; its
        connection-pool slot, if any, is held already)."""
        active = self.traffic.active
        active[endpoint.key] = active.get(endpoint.key, 0) + 1
        return InFlight(endpoint, limiter)

    def _finished(self, flight: InFlight) -> None:
        """A request (or a TCP connection) is over: its count and its pool slot go."""
        key = flight.endpoint.key
        active = self.traffic.active
        left = active.get(key, 0) - 1
        if left > 0:
            active[key] = left
        else:
            active.pop(key, None)
        if flight.limiter is not None:
            flight.limiter.release()

    async def _forward(
        self,
        down: Downstream,
        request: Request,
        target: Target,
        timeouts: Timeouts | None,
        retry: RetryPolicy | None,
        outcome: Outcome,
    ) -> Response:
        total = timeouts.request if timeouts is not None else None
        key = HashKey(request, down.ip)
        try:
            async with _deadline(total):
                response = await self._attempts(
                    down, request, target, key, timeouts, retry, outcome
                )
        except TimeoutError:
            outcome.flags = "UT"
            request.body.cancel()
            return simple_response(504, "upstream request timeout")
        if key.set_cookie is not None:  # a consistent-hash cookie the waypoint created
            response.headers.append(("set-cookie", key.set_cookie))
        return response

    async def _attempts(
        self,
        down: Downstream,
        request: Request,
        target: Target,
        key: HashKey,
        timeouts: Timeouts | None,
        retry: RetryPolicy | None,
        outcome: Outcome,
    ) -> Response:
        per_try = timeouts.backend_request if timeouts is not None else None
        http2 = upstream_http2(down.destination.app_protocol, request)
        replay: bytes | None = None
        if retry is not None and retry.attempts > 0:
            body = request.body
            # Only a body known to be small is kept for re-sending: one of unknown length
            # could turn out larger halfway through, and what was read could not be put back.
            small = (
                body.length if body.length is not None else (body.buffered if body.ended else None)
            )
            if small is not None and small <= RETRY_BUFFER:
                try:
                    replay = await body.read_all()
                except BodyError:  # the client went away while sending it
                    request.body.cancel()
                    outcome.flags = "DC"
                    return simple_response(400, "request body incomplete")
            else:
                retry = None  # streamed through: such a request is not retried
        attempt = 0
        while True:
            attempt += 1
            outcome.attempts = attempt
            endpoint, cluster, candidates = self.choose(target, key)
            if endpoint is None:
                request.body.cancel()
                if target.subset is not None and cluster is None:
                    outcome.flags = "NC"
                    return simple_response(503, f"no subset {target.subset!r} defined\n")
                outcome.flags = "UH"
                return simple_response(503, "no healthy upstream")
            outcome.endpoint = endpoint
            limiter = cluster.limiter if cluster is not None else None
            if limiter is not None and not limiter.try_acquire():
                try:
                    await limiter.acquire()
                except Overflow as exc:
                    request.body.cancel()
                    outcome.flags = "UO"
                    outcome.details = str(exc)
                    return simple_response(
                        503,
                        "upstream connect error or disconnect/reset before headers. "
                        "reset reason: overflow",
                    )
            flight = self._started(endpoint, limiter)
            if replay is not None:
                request.body = Body.of(replay, request.body.trailers)
            status: int | None = None
            tried = time.monotonic()
            try:
                async with _deadline(per_try):
                    response = await self.upstream.request(
                        endpoint,
                        request,
                        http2,
                        cluster.connection if cluster is not None else DEFAULT_CONNECTION,
                    )
                status = response.status
                outcome.upstream_ms = (time.monotonic() - tried) * 1000
                if (
                    retry is None
                    or status not in retry.codes
                    or not retry.should_retry(request.method, status, attempt, body_sent=True)
                ):
                    outcome.flags = "-" if attempt == 1 or status < 500 else "URX"
                    outcome.in_flight = flight  # until its body is done (`_track`)
                    return response
                response.body.cancel()
                failure = simple_response(status, "")
                failure_flags = "URX"
            except TimeoutError:
                outcome.flags = "UT"
                failure = simple_response(504, "upstream request timeout")
                failure_flags = "UT"
                if retry is None or not retry.should_retry(
                    request.method, None, attempt, body_sent=True
                ):
                    return failure
            except UpstreamError as exc:
                outcome.details = str(exc)
                failure_flags = "UC" if exc.connected else "UF"
                text = "upstream connect error or disconnect/reset before headers"
                failure = simple_response(503, f"{text}. reset reason: {exc}")
                if retry is None or not retry.should_retry(
                    request.method, None, attempt, body_sent=exc.connected
                ):
                    outcome.flags = failure_flags if attempt == 1 else "URX"
                    return failure
            finally:
                if cluster is not None and cluster.outliers is not None:
                    cluster.outliers.record(endpoint, status, len(candidates))
                if outcome.in_flight is not flight:
                    self._finished(flight)
            if retry is None:
                outcome.flags = failure_flags
                return failure
            await asyncio.sleep(retry.backoff_for(attempt))

    # -- telemetry ---------------------------------------------------------------------------

    def _track(
        self,
        down: Downstream,
        request: Request,
        response: Response,
        outcome: Outcome,
        started: float,
    ) -> None:
        """Report the request once the response body has been sent (or given up)."""
        grpc = (request.header("content-type") or "").startswith("application/grpc")

        def done(response_bytes: int, complete: bool) -> None:
            if outcome.in_flight is not None:
                self._finished(outcome.in_flight)
                outcome.in_flight = None
            if not complete and outcome.flags == "-":
                outcome.flags = "DC"
            self._report(
                down,
                "grpc" if grpc else "http",
                request,
                response.status,
                outcome,
                started,
                request.body.consumed,
                response_bytes,
            )
            if outcome.span is not None:
                outcome.span.end(
                    down, request, response, outcome, request.body.consumed, response_bytes
                )

        if response.upgraded is not None:
            done(0, True)
        elif response.body.finished:
            done(response.body.consumed, True)
        else:
            response.body.on_done = done

    def _report(
        self,
        down: Downstream,
        protocol: str,
        request: Request | None,
        status: int,
        outcome: Outcome,
        started: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        duration_ms = (time.monotonic() - started) * 1000
        endpoint = outcome.endpoint
        cached = down.report_cache.get(endpoint.key if endpoint is not None else None)
        if cached is None or cached[0] is not endpoint:
            cached = self._report_static(down, endpoint)
        _, labels, log_tail = cached
        flags = outcome.flags
        if outcome.fault_flags:
            flags = merge_flags(flags, outcome.fault_flags)
        if request is not None:
            self.metrics.observe(
                (*labels, str(status), flags, protocol),
                duration_ms,
                request_bytes,
                response_bytes,
            )
        if not self.access_log_enabled:
            return
        entry: dict[str, Any] = {
            "start_time": _iso_time(time.time() - duration_ms / 1000),
            "protocol": protocol,
        }
        if request is not None:
            entry.update(
                method=request.method,
                path=request.path,
                authority=request.authority,
                response_code=status,
                request_id=(
                    outcome.request_id
                    if outcome.request_id is not None
                    else request.header("x-request-id")
                ),
                trace_id=_trace_id(request),
            )
        entry.update(
            response_flags=flags,
            duration_ms=round(duration_ms, 3),
            upstream_service_time_ms=(
                round(outcome.upstream_ms, 3) if outcome.upstream_ms is not None else None
            ),
            bytes_received=request_bytes,
            bytes_sent=response_bytes,
            route_name=outcome.route or None,
            attempts=outcome.attempts or None,
            details=outcome.details or None,
        )
        self.access_log.write(orjson.dumps(entry)[:-1].decode() + log_tail)

    def _report_static(
        self, down: Downstream, endpoint: Endpoint | None
    ) -> tuple[Endpoint | None, tuple[str, ...], str]:
        """What `_report` says the same way for every request between this client and this
        endpoint: the first labels of the request metrics and the end of the access-log line,
        worked out once per tunnel and endpoint."""
        dest = down.destination
        dst_wl = endpoint.workload if endpoint is not None else dest.workload
        if endpoint is not None:
            dst_principal = endpoint.principal
        else:
            dst_principal = workload_identity(dst_wl).uri if dst_wl is not None else "unknown"
        labels = (
            *down.source_labels,
            dst_wl.canonical_name if dst_wl is not None else "unknown",
            dst_wl.namespace if dst_wl is not None else "unknown",
            dest.hostname,
            dst_principal,
            "mutual_tls",
        )
        tail = orjson.dumps(
            {
                "upstream_host": f"{endpoint.ip}:{endpoint.port}" if endpoint is not None else None,
                "upstream_cluster": dest.hostname,
                "source_address": down.ip,
                "source_principal": down.source_labels[3],
                "destination_principal": dst_principal,
            }
        )
        cached = (endpoint, labels, "," + tail[1:].decode())
        if len(down.report_cache) < 64:
            down.report_cache[endpoint.key if endpoint is not None else None] = cached
        return cached


# HTTP status to gRPC status, as gRPC's "HTTP to gRPC status code mapping" has it, plus what
# Envoy answers for its own 403 and 504.
_GRPC_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def _unauthenticated(request: Request, result: AuthnResult) -> Response:
    """Envoy's jwt_authn answer: its text, and where to authenticate."""
    challenge = www_authenticate(request)
    return simple_response(result.status, result.error or "", [("www-authenticate", challenge)])


def grpc_error(code: int, message: str) -> Response:
    """A trailers-only gRPC error answer (HTTP 200 with grpc-status), as gRPC clients expect."""
    return Response(
        200,
        [
            ("content-type", "application/grpc"),
            ("grpc-status", str(code)),
            ("grpc-message", message),
        ],
        Body.of(),
    )


def upstream_http2(app_protocol: str, request: Request) -> bool:
    """HTTP/2 to the endpoint when its port says so, HTTP/1.1 when it says `http`, and the
    client's own protocol when the port does not say."""
    if app_protocol in _HTTP2_PROTOCOLS:
        return True
    if app_protocol in _HTTP1_PROTOCOLS:
        return False
    return request.protocol == "HTTP/2"


_second_stamp: list[Any] = [-1, ""]


_NO_DEADLINE = contextlib.nullcontext()


def _deadline(seconds: float | None) -> contextlib.AbstractAsyncContextManager[object]:
    """A timeout scope, or none at all when a route sets no timeout (the common case: a
    scope costs a timer handle per request)."""
    return _NO_DEADLINE if seconds is None else asyncio.timeout(seconds)


def _iso_time(when: float) -> str:
    """RFC 3339 UTC with milliseconds; the formatted second is reused while it lasts."""
    second = int(when)
    if second != _second_stamp[0]:
        _second_stamp[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second_stamp[1]}.{int((when - second) * 1000):03d}Z"


def request_id() -> str:
    """A random UUID (version 4) for `x-request-id`, as Envoy generates; from the PRNG, not
    the kernel: it names a request, it protects nothing."""
    h = f"{random.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


class AccessLog:
    """Access-log lines, written in batches: at most every FLUSH_SECONDS or every 64 KiB,
    instead of a logging record and a system call per request (a system call costs as much
    as a request's whole Python work on a small VM).

    Each line reads `<time> INFO meshway.access: <json>` like the process's other log lines.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._stamp = ""
        self._stamp_second = -1
        self._size = 0

    FLUSH_SECONDS = 0.1
    MAX_BUFFERED = 64 * 1024

    def write(self, entry: str) -> None:
        if not self._lines:
            asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)
            self._size = 0
        now = time.time()
        second = int(now)
        if second != self._stamp_second:
            self._stamp_second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        millis = int((now - second) * 1000)
        line = f"{self._stamp},{millis:03d} INFO meshway.access: {entry}\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size > self.MAX_BUFFERED:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            data = "".join(self._lines)
            self._lines.clear()
            try:
                self._stream.write(data)
                self._stream.flush()
            except (OSError, ValueError):  # a closed or full log must not stop the proxy
                pass


def _forwarded_for(headers: dict[str, str]) -> str | None:
    """The client address from the node proxy's `forwarded: for="ip"` header."""
    value = headers.get("forwarded", "")
    for part in value.split(";"):
        key, _, raw = part.strip().partition("=")
        if key.lower() == "for":
            ip = raw.strip('"').strip("[]")
            with contextlib.suppress(ValueError):
                return str(ipaddress.ip_address(ip))
    return None


def _trace_id(request: Request) -> str | None:
    """The W3C trace id of the request, or its B3 one (one pass over the headers)."""
    b3: str | None = None
    for key, value in request.headers:
        if key == "traceparent":
            parts = value.split("-")
            if len(parts) >= 4 and len(parts[1]) == 32:
                return parts[1]
        elif key == "x-b3-traceid" and b3 is None:
            b3 = value
    return b3
