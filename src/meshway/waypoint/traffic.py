"""DestinationRule traffic policy at the waypoint: which endpoint of a Service (or of one of
its subsets) gets a request.

Which rule applies to a Service: a DestinationRule whose `host` names it (a short name is
resolved in the rule's own namespace; a full name or a `*.` wildcard is compared with the
Service's `<name>.<namespace>.svc.<domain>`), looked for in the Service's namespace first and
then in the root namespace. Among several, an exact host wins over a wildcard, then the oldest
rule, then `<namespace>/<name>`. Istio also looks in the client's namespace; a waypoint acts
for the destination, so it reads the destination's rules. Rules with a `workloadSelector`
configure client-side proxies in Istio and are ignored here.

Load balancing (`trafficPolicy.loadBalancer`, overridable per port and per subset; the most
specific setting wins: subset port, subset, rule port, rule):

- LEAST_REQUEST (also the default, as in Istio): two endpoints drawn at random, the one with
  fewer requests in flight gets the request (Envoy's power of two choices);
- ROUND_ROBIN; RANDOM;
- `consistentHash` on a header, a cookie, the client's IP or a query parameter: a ring of
  points hashed with BLAKE2b, so that every waypoint replica maps a key to the same endpoint.
  Each endpoint has 256 points however many there are (at least `minimumRingSize` in all
  when it is set), so adding an endpoint to n moves about 1/(n+1) of the keys, all of them to
  the new one. A request without the key gets a random endpoint, except for a cookie with a
  `ttl`, which the waypoint then creates and sets on the response (Envoy's behaviour).
  `maglev` is served by the same ring: the same stability, not Maglev's table.

Subsets: the endpoints whose labels include the subset's `labels`. A route names one with a
backendRef of group `meshway.io`, kind `ServiceSubset`, name `<service>.<subset>` (see
`routing.py`); Istio's waypoints cannot route to subsets at all.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import hashlib
import itertools
import random
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl

from meshway.config.model import duration_seconds
from meshway.waypoint.upstream import (
    CONNECT_TIMEOUT,
    DEFAULT_CONNECTION,
    IDLE_TIMEOUT,
    ConnectionSettings,
)

if TYPE_CHECKING:
    from meshway.config.model import (
        ConnectionPoolSettings,
        ConsistentHashLB,
        DestinationRule,
        LoadBalancerSettings,
        TrafficPolicy,
    )
    from meshway.config.model import OutlierDetection as OutlierDetectionSettings
    from meshway.waypoint.messages import Request
    from meshway.waypoint.upstream import Endpoint

# Points per endpoint on the hash ring. A number that does not depend on how many endpoints
# there are is what keeps keys in place when one is added (Envoy divides a ring size by the
# endpoint count, so its existing points move too).
POINTS_PER_ENDPOINT = 256
MAX_RING_SIZE = 8 * 1024 * 1024


class Balancer(Protocol):
    def pick(self, endpoints: Sequence[Endpoint], key: HashKey) -> Endpoint: ...


@dataclass(slots=True)
class HashKey:
    """What a consistent-hash balancer may read from a request, and a cookie it asks the
    response to set."""

    request: Request | None
    source_ip: str
    set_cookie: str | None = None
    # The key, once read (a retry must hash the same one, and create no second cookie).
    value: str | None = None
    read: bool = False


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, endpoints: Sequence[Endpoint], key: HashKey) -> Endpoint:
        return endpoints[next(self._counter) % len(endpoints)]


class RandomChoice:
    def __init__(self, rand: Callable[[int], int] = random.randrange) -> None:
        self._randrange = rand

    def pick(self, endpoints: Sequence[Endpoint], key: HashKey) -> Endpoint:
        return endpoints[self._randrange(len(endpoints))]


class LeastRequest:
    """Power of two choices over the requests in flight, as counted by `active`."""

    def __init__(
        self,
        active: Mapping[tuple[str, int], int],
        rand: Callable[[int], int] = random.randrange,
    ) -> None:
        self._active = active
        self._randrange = rand

    def pick(self, endpoints: Sequence[Endpoint], key: HashKey) -> Endpoint:
        n = len(endpoints)
        if n == 1:
            return endpoints[0]
        i = self._randrange(n)
        j = self._randrange(n - 1)
        if j >= i:
            j += 1
        a, b = endpoints[i], endpoints[j]
        return b if self._active.get(b.key, 0) < self._active.get(a.key, 0) else a


def ring_hash(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class RingHash:
    """Consistent hashing on a ring of virtual nodes (ketama-style)."""

    def __init__(self, settings: ConsistentHashLB) -> None:
        self.header = settings.http_header_name.lower() if settings.http_header_name else None
        cookie = settings.http_cookie
        self.cookie = cookie.name if cookie is not None else None
        self.cookie_path = (cookie.path or "/") if cookie is not None else "/"
        ttl = cookie.ttl if cookie is not None else None
        self.cookie_ttl = int(duration_seconds(ttl)) if ttl is not None else None
        self.source_ip = bool(settings.use_source_ip)
        self.query = settings.http_query_parameter_name
        size = settings.minimum_ring_size
        if settings.ring_hash is not None and settings.ring_hash.minimum_ring_size:
            size = settings.ring_hash.minimum_ring_size
        # Unset: a fixed number of points per endpoint. Set: at least that many points in
        # all, as in Istio (more points, a finer spread; fewer keys stay put on a change).
        self.ring_size = min(size, MAX_RING_SIZE) if size else None
        self._rings: dict[tuple[tuple[str, int], ...], tuple[list[int], list[int]]] = {}

    def pick(self, endpoints: Sequence[Endpoint], key: HashKey) -> Endpoint:
        if not key.read:
            key.value = self.key_of(key)
            key.read = True
        value = key.value
        if value is None:
            return endpoints[random.randrange(len(endpoints))]
        points, owners = self._ring(endpoints)
        i = bisect.bisect_left(points, ring_hash(value))
        return endpoints[owners[i % len(owners)]]

    def key_of(self, key: HashKey) -> str | None:
        request = key.request
        if self.source_ip:
            return key.source_ip
        if request is None:
            return None
        if self.header is not None:
            return request.header(self.header)
        if self.query is not None:
            _, _, query = request.path.partition("?")
            for name, value in parse_qsl(query, keep_blank_values=True):
                if name == self.query:
                    return value
            return None
        if self.cookie is not None:
            cookie = _cookie(request, self.cookie)
            if cookie is None and self.cookie_ttl is not None:
                cookie = secrets.token_hex(8)
                # A ttl of 0 makes a session cookie, as in Envoy.
                max_age = f"; Max-Age={self.cookie_ttl}" if self.cookie_ttl else ""
                key.set_cookie = (
                    f"{self.cookie}={cookie}; Path={self.cookie_path}{max_age}; HttpOnly"
                )
            return cookie
        return None

    def _ring(self, endpoints: Sequence[Endpoint]) -> tuple[list[int], list[int]]:
        ident = tuple(e.key for e in endpoints)
        ring = self._rings.get(ident)
        if ring is None:
            if len(self._rings) > 64:  # endpoint sets change over time: keep a few
                self._rings.clear()
            replicas = POINTS_PER_ENDPOINT
            if self.ring_size is not None:
                replicas = max(replicas, -(-self.ring_size // len(endpoints)))
            entries = sorted(
                (ring_hash(f"{ip}:{port}_{r}"), index)
                for index, (ip, port) in enumerate(ident)
                for r in range(replicas)
            )
            ring = self._rings[ident] = ([p for p, _ in entries], [i for _, i in entries])
        return ring


def _cookie(request: Request, name: str) -> str | None:
    for header, value in request.headers:
        if header != "cookie":
            continue
        try:
            jar = SimpleCookie(value)
        except CookieError:
            continue
        if name in jar:
            return jar[name].value
    return None


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str]

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels.items())


class Overflow(Exception):
    """A connection pool's limits are reached: the request fails at once (503, `UO`)."""


class Limiter:
    """`connectionPool` as Envoy's circuit breakers apply it to one cluster: at most
    `max_active` requests at once (`http2MaxRequests`, and `tcp.maxConnections` since an
    HTTP/1.1 request holds a connection), at most `max_pending` waiting for one of them
    (`http1MaxPendingRequests`); beyond that, Overflow."""

    def __init__(self, max_active: int | None, max_pending: int | None) -> None:
        self.max_active = max_active
        self.max_pending = max_pending
        self.active = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_acquire(self) -> bool:
        """A slot at once if one is free and nobody waits (no coroutine per request)."""
        if self.max_active is None or (self.active < self.max_active and not self._waiting):
            self.active += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.max_active is None or (self.active < self.max_active and not self._waiting):
            self.active += 1
            return
        if self.max_pending is not None and len(self._waiting) >= self.max_pending:
            raise Overflow(
                f"{self.active} requests in flight and {len(self._waiting)} pending: "
                "the connection pool is full"
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter  # `release` passed its slot on: `active` already counts us
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot came with the cancellation: hand it on
            else:
                self._waiting.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1


class OutlierDetector:
    """`outlierDetection` for one cluster: an endpoint that answers `consecutive5xxErrors` 5xx
    (or `consecutiveGatewayErrors` 502/503/504; a failed connection counts as both) in a row is
    ejected for `baseEjectionTime` times the number of its ejections (at most 300 s), unless
    `maxEjectionPercent` of the endpoints are ejected already (one may always be, as in Envoy).
    It comes back when that time is over. If every endpoint is ejected, all are used (Envoy's
    panic mode). Ejections end on time rather than on `interval` ticks; `interval` sets how fast
    the multiplier decays: one per interval spent healthy, as in Envoy."""

    MAX_EJECTION = 300.0

    def __init__(self, settings: OutlierDetectionSettings) -> None:
        self.consecutive_5xx = settings.consecutive_5xx_errors
        self.consecutive_gateway = settings.consecutive_gateway_errors
        if self.consecutive_5xx is None and self.consecutive_gateway is None:
            self.consecutive_5xx = 5  # Istio's default
        base = settings.base_ejection_time
        self.base_ejection = duration_seconds(base) if base else 30.0
        interval = settings.interval
        self.interval = duration_seconds(interval) if interval else 10.0  # Istio's default
        percent = settings.max_ejection_percent
        self.max_percent: int = 10 if percent is None else percent  # Envoy's default
        # endpoint key -> [consecutive 5xx, consecutive gateway errors, ejections, until]
        self._state: dict[tuple[str, int], list[float]] = {}
        # When the last ejection ends: until then `healthy` filters, after it costs nothing.
        self._ejections_end = 0.0

    def record(self, endpoint: Endpoint, status: int | None, endpoints: int) -> bool:
        """One response's status (None: no response at all); True if it ejected the endpoint."""
        state = self._state.get(endpoint.key)
        if state is None:
            state = self._state[endpoint.key] = [0, 0, 0, 0.0]
        if status is not None and status < 500:
            state[0] = state[1] = 0
            return False
        state[0] += 1
        if status is None or status in (502, 503, 504):
            state[1] += 1
        else:
            state[1] = 0
        tripped = (self.consecutive_5xx and state[0] >= self.consecutive_5xx) or (
            self.consecutive_gateway and state[1] >= self.consecutive_gateway
        )
        if not tripped or self.is_ejected(endpoint):
            return False
        allowed = max(1 if self.max_percent else 0, endpoints * self.max_percent // 100)
        if self._count_ejected() >= allowed:
            return False
        state[0] = state[1] = 0
        now = time.monotonic()
        if state[2] and state[3] < now:
            # Envoy takes one off the multiplier for each interval the endpoint stayed healthy.
            state[2] = max(0, state[2] - int((now - state[3]) / self.interval))
        state[2] += 1
        state[3] = now + min(self.base_ejection * state[2], self.MAX_EJECTION)
        self._ejections_end = max(self._ejections_end, state[3])
        return True

    def is_ejected(self, endpoint: Endpoint) -> bool:
        state = self._state.get(endpoint.key)
        return state is not None and state[3] > time.monotonic()

    def healthy(self, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if self._ejections_end <= time.monotonic():
            return endpoints
        healthy = [e for e in endpoints if not self.is_ejected(e)]
        return healthy or endpoints

    def _count_ejected(self) -> int:
        now = time.monotonic()
        return sum(1 for state in self._state.values() if state[3] > now)


@dataclass(slots=True)
class Cluster:
    """A Service port, or a subset of it, as the waypoint sends to it."""

    balancer: Balancer
    limiter: Limiter | None = None
    outliers: OutlierDetector | None = None
    connection: ConnectionSettings = DEFAULT_CONNECTION

    def pick(self, endpoints: Sequence[Endpoint], key: HashKey) -> Endpoint:
        if self.outliers is not None:
            endpoints = self.outliers.healthy(endpoints)
        return self.balancer.pick(endpoints, key)


class ServicePolicy:
    """The DestinationRule that applies to one Service, ready for requests."""

    def __init__(self, rule: DestinationRule, active: Mapping[tuple[str, int], int]) -> None:
        self.rule_name = f"{rule.metadata.namespace}/{rule.metadata.name}"
        spec = rule.spec
        self._rule = spec
        self._active = active
        self.subsets = {s.name: Subset(s.name, dict(s.labels)) for s in spec.subsets}
        self._clusters: dict[tuple[int, str | None], Cluster] = {}

    def cluster(self, port: int, subset: str | None) -> Cluster:
        cluster = self._clusters.get((port, subset))
        if cluster is None:
            outliers = self._setting(port, subset, "outlier_detection")
            pool = self._setting(port, subset, "connection_pool")
            cluster = self._clusters[(port, subset)] = Cluster(
                make_balancer(self._setting(port, subset, "load_balancer"), self._active),
                make_limiter(pool),
                OutlierDetector(outliers) if outliers is not None else None,
                make_connection_settings(pool),
            )
        return cluster

    def _setting(self, port: int, subset: str | None, name: str) -> Any:
        """The most specific setting: subset's port, subset's, the rule's port, the rule's."""
        policies: list[TrafficPolicy] = []
        if subset is not None:
            spec_subset = next((s for s in self._rule.subsets if s.name == subset), None)
            if spec_subset is not None and spec_subset.traffic_policy is not None:
                policies.append(spec_subset.traffic_policy)
        if self._rule.traffic_policy is not None:
            policies.append(self._rule.traffic_policy)
        for policy in policies:
            for level in policy.port_level_settings:
                if level.port.number == port and getattr(level, name) is not None:
                    return getattr(level, name)
            if getattr(policy, name) is not None:
                return getattr(policy, name)
        return None


def make_balancer(
    settings: LoadBalancerSettings | None, active: Mapping[tuple[str, int], int]
) -> Balancer:
    if settings is not None and settings.consistent_hash is not None:
        return RingHash(settings.consistent_hash)
    simple = settings.simple if settings is not None else None
    if simple == "ROUND_ROBIN":
        return RoundRobin()
    if simple == "RANDOM":
        return RandomChoice()
    return LeastRequest(active)  # LEAST_REQUEST, UNSPECIFIED, PASSTHROUGH, or nothing set


def make_connection_settings(settings: ConnectionPoolSettings | None) -> ConnectionSettings:
    """`tcp.connectTimeout`, `http.idleTimeout` and `http.maxRequestsPerConnection`; what is
    not set keeps the waypoint's default."""
    if settings is None:
        return DEFAULT_CONNECTION
    tcp, http = settings.tcp, settings.http
    connect = tcp.connect_timeout if tcp is not None else None
    idle = http.idle_timeout if http is not None else None
    per_connection = http.max_requests_per_connection if http is not None else None
    return ConnectionSettings(
        duration_seconds(connect) if connect else CONNECT_TIMEOUT,
        duration_seconds(idle) if idle else IDLE_TIMEOUT,
        per_connection or 0,
    )


def make_limiter(settings: ConnectionPoolSettings | None) -> Limiter | None:
    if settings is None:
        return None
    limits = [
        n
        for n in (
            settings.tcp.max_connections if settings.tcp else None,
            settings.http.http2_max_requests if settings.http else None,
        )
        if n
    ]
    pending = settings.http.http1_max_pending_requests if settings.http else None
    if not limits and not pending:
        return None
    return Limiter(min(limits) if limits else None, pending or None)


class TrafficPolicies:
    """DestinationRules by the Service they apply to, and the endpoints' requests in flight
    (which outlive a rebuild: they count requests, not configuration)."""

    def __init__(self, active: dict[tuple[str, int], int] | None = None) -> None:
        self.active: dict[tuple[str, int], int] = active if active is not None else {}
        self._rules: list[DestinationRule] = []
        self._cluster_domain = "cluster.local"
        self._root_namespace = "istio-system"
        self._by_service: dict[tuple[str, str], ServicePolicy | None] = {}
        self._defaults: dict[tuple[str, str, int], Cluster] = {}

    @classmethod
    def build(
        cls,
        rules: Iterable[DestinationRule],
        cluster_domain: str = "cluster.local",
        root_namespace: str = "istio-system",
        active: dict[tuple[str, int], int] | None = None,
    ) -> TrafficPolicies:
        policies = cls(active)
        policies._rules = [r for r in rules if r.spec.workload_selector is None]
        policies._cluster_domain = cluster_domain
        policies._root_namespace = root_namespace
        return policies

    def for_service(self, namespace: str, name: str) -> ServicePolicy | None:
        key = (namespace, name)
        if key not in self._by_service:
            rule = self._find(namespace, name)
            self._by_service[key] = ServicePolicy(rule, self.active) if rule else None
        return self._by_service[key]

    def default_cluster(self, namespace: str, name: str, port: int) -> Cluster:
        """For a Service without a rule: LEAST_REQUEST (Istio's default), no limits."""
        key = (namespace, name, port)
        cluster = self._defaults.get(key)
        if cluster is None:
            cluster = self._defaults[key] = Cluster(LeastRequest(self.active))
        return cluster

    def _find(self, namespace: str, name: str) -> DestinationRule | None:
        fqdn = f"{name}.{namespace}.svc.{self._cluster_domain}"
        for scope in dict.fromkeys((namespace, self._root_namespace)):
            found = [
                (0 if exact else 1, r.metadata.creation_timestamp or "", r.metadata.name, r)
                for r in self._rules
                if r.metadata.namespace == scope
                for exact in [self._host_matches(r, fqdn)]
                if exact is not None
            ]
            if found:
                return min(found, key=lambda f: f[:3])[3]
        return None

    def _host_matches(self, rule: DestinationRule, fqdn: str) -> bool | None:
        """True for an exact match, False for a wildcard match, None for no match."""
        host = rule.spec.host.lower().rstrip(".")
        if host.startswith("*"):
            suffix = host[1:]
            return False if (not suffix or fqdn.endswith(suffix)) else None
        if "." not in host:
            host = f"{host}.{rule.metadata.namespace}.svc.{self._cluster_domain}"
        elif host.count(".") == 1:  # "<name>.<namespace>"
            host = f"{host}.svc.{self._cluster_domain}"
        return True if host == fqdn else None
