"""RateLimitPolicy without processes: the model's errors, token buckets on a fake clock, keys,
which policies apply to a request, and the data path's answers."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from meshway.config.errors import ConfigError
from meshway.config.loader import parse_documents
from meshway.config.model import RateLimitPolicy
from meshway.identity.spiffe import SpiffeId
from meshway.waypoint.messages import Request, simple_response
from meshway.waypoint.proxy import Downstream
from meshway.waypoint.ratelimit import (
    Denial,
    LocalBuckets,
    RateLimiter,
    RateLimitIndex,
    StoreFailure,
    StoreUnavailable,
)

from .test_waypoint_proxy import datapath

pytestmark = pytest.mark.unit

HEAD = """\
apiVersion: meshway.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: limits, namespace: shop}
spec:
"""


def policy(spec: str, name: str = "limits", namespace: str = "shop") -> RateLimitPolicy:
    head = HEAD.replace("name: limits", f"name: {name}").replace("shop", namespace)
    (obj,) = parse_documents(head + textwrap.indent(textwrap.dedent(spec), "  "), "t.yaml")
    assert isinstance(obj, RateLimitPolicy)
    return obj


def problems(spec: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_documents(HEAD + textwrap.indent(textwrap.dedent(spec), "  "), "t.yaml")
    return [str(i) for i in caught.value.issues]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(path: str = "/", **headers: str) -> Request:
    return Request("GET", path, "web.shop", [(k.replace("_", "-"), v) for k, v in headers.items()])


# --------------------------------------------------------------------------- the model


def test_a_policy_reads_with_its_defaults() -> None:
    p = policy("""\
        targetRefs: [{kind: Service, name: web}]
        limits: [{name: all, requests: 10}]
        """)
    limit = p.spec.limits[0]
    assert (limit.per, limit.capacity, limit.key.type, limit.scope) == ("1s", 10, "Target", "Local")
    assert limit.rate == 10.0 and p.spec.failure_mode == "Open"
    slow = policy("""\
        targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}]
        limits: [{name: h, requests: 30, per: 1m, burst: 5, key: {type: Header, name: X-User}}]
        failureMode: Closed
        """).spec.limits[0]
    assert slow.rate == 0.5 and slow.capacity == 5


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "targetRefs: [{kind: Service, name: web}]\nlimits: [{name: a, requests: 0}]\n",
            "spec.limits[0].requests: must be at least 1, got 0",
        ),
        (
            "targetRefs: [{kind: Service, name: web}]\nlimits: [{name: a, requests: 1, per: 1x}]\n",
            "spec.limits[0].per: invalid duration '1x'",
        ),
        (
            "targetRefs: [{kind: Service, name: web}]\nlimits: [{name: a, requests: 1, per: 0s}]\n",
            "spec.limits[0].per: must be between 1ms and 24h",
        ),
        (
            "targetRefs: [{kind: Service, name: web}]\n"
            "limits: [{name: a, requests: 1, burst: 0}]\n",
            "spec.limits[0].burst: must be at least 1",
        ),
        (
            "targetRefs: [{kind: Service, name: web}]\n"
            "limits: [{name: a, requests: 1, key: {type: Cookie}}]\n",
            "spec.limits[0].key.type: must be one of 'Target', 'SourceIdentity' or 'Header'",
        ),
        (
            "targetRefs: [{kind: Service, name: web}]\n"
            "limits: [{name: a, requests: 1, key: {type: Header}}]\n",
            "spec.limits[0].key.name: a Header key needs the header's name",
        ),
        (
            "targetRefs: [{kind: Service, name: web}]\n"
            "limits: [{name: a, requests: 1, scope: Cluster}]\n",
            "spec.limits[0].scope: must be one of 'Local' or 'Global'",
        ),
        (
            "targetRefs: [{kind: Pod, name: web}]\nlimits: [{name: a, requests: 1}]\n",
            "spec.targetRefs[0].kind: unsupported kind 'Pod'",
        ),
        (
            "targetRefs: [{kind: HTTPRoute, name: r}]\nlimits: [{name: a, requests: 1}]\n",
            "spec.targetRefs[0].group: kind HTTPRoute needs group 'gateway.networking.k8s.io'",
        ),
        (
            "targetRefs: [{kind: Service, name: web, namespace: other}]\n"
            "limits: [{name: a, requests: 1}]\n",
            "spec.targetRefs[0].namespace: cross-namespace targetRefs are not supported",
        ),
        (
            "targetRefs: []\nlimits: [{name: a, requests: 1}]\n",
            "spec.targetRefs",
        ),
        (
            "targetRefs: [{kind: Service, name: web}]\n"
            "limits: [{name: a, requests: 1}, {name: a, requests: 2}]\n",
            "spec.limits[1].name: duplicate limit 'a'",
        ),
        (
            "targetRefs: [{kind: Service, name: web}]\nlimits: [{name: a, requests: '5'}]\n",
            "spec.limits[0].requests",
        ),
        (
            "targetRefs: [{kind: Service, name: web}]\n"
            "limits: [{name: a, requests: 1}]\nfailureMode: Maybe\n",
            "spec.failureMode: must be one of 'Open' or 'Closed'",
        ),
    ],
)
def test_bad_policies_are_refused_with_the_field_path(spec: str, expected: str) -> None:
    found = problems(spec)
    assert any(expected in p for p in found), found


def test_the_example_file_is_valid_and_says_what_it_shows() -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "ratelimit.yaml"
    found = parse_documents(path.read_text(), str(path))
    assert [type(o).__name__ for o in found] == ["RateLimitPolicy", "RateLimitPolicy"]
    web, checkout = found
    assert isinstance(web, RateLimitPolicy) and isinstance(checkout, RateLimitPolicy)
    assert [lim.scope for lim in web.spec.limits] == ["Local", "Global"]
    assert checkout.spec.target_refs[0].kind == "HTTPRoute"
    assert checkout.spec.failure_mode == "Closed"


# --------------------------------------------------------------------------- buckets


def test_a_bucket_gives_its_burst_then_its_rate() -> None:
    buckets = LocalBuckets(rate=10.0, capacity=5)
    t = 100.0
    assert [buckets.take("k", t) for _ in range(5)] == [0.0] * 5
    wait = buckets.take("k", t)
    assert wait == pytest.approx(0.1)  # one token every 100 ms
    # Over 2 s, 20 more requests pass, and not 21.
    admitted = 0
    for i in range(1, 401):
        if buckets.take("k", t + i * 0.005) == 0.0:
            admitted += 1
    assert admitted == 20
    # Idle long enough, it is full again, but never more than its capacity.
    assert sum(buckets.take("k", t + 60) == 0.0 for _ in range(10)) == 5


def test_keys_have_their_own_buckets_and_a_token_can_be_given_back() -> None:
    buckets = LocalBuckets(rate=1.0, capacity=1)
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) == pytest.approx(1.0)
    assert buckets.take("b", 0.0) == 0.0
    buckets.give_back("a")
    assert buckets.take("a", 0.0) == 0.0


def test_buckets_are_bounded_full_ones_go_first_then_the_least_recently_used() -> None:
    buckets = LocalBuckets(rate=1.0, capacity=2, max_keys=16)
    for i in range(16):
        buckets.take(f"k{i}", 0.0)  # each keeps 1 of 2 tokens
    buckets.take("k0", 0.5)  # k0 is now the most recently used
    buckets.take("new", 0.5)
    assert len(buckets) <= 16
    assert buckets.take("k0", 0.5) > 0  # kept: its half-empty bucket still denies
    # k1, the least recently used, was dropped: it starts again with a full bucket of 2.
    assert buckets.take("k1", 0.5) == 0.0 and buckets.take("k1", 0.5) == 0.0
    # After 2 s every bucket is full again: all of them can go, nothing is lost.
    for i in range(40):
        buckets.take(f"x{i}", 10.0)
    assert len(buckets) <= 16


# --------------------------------------------------------------------------- index and keys


def test_policies_apply_to_their_service_and_to_requests_their_route_matched() -> None:
    on_service = policy(
        "targetRefs: [{kind: Service, name: web}]\nlimits: [{name: svc, requests: 5}]\n",
        name="svc",
    )
    on_route = policy(
        "targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}]\n"
        "limits: [{name: rt, requests: 5}]\n",
        name="route",
    )
    elsewhere = policy(
        "targetRefs: [{kind: Service, name: web}]\nlimits: [{name: other, requests: 5}]\n",
        name="other",
        namespace="other",
    )
    index = RateLimitIndex.build([on_service, on_route, elsewhere])

    def names(found: Sequence[object]) -> list[str]:
        return [getattr(limit, "name", "") for limit in found]

    assert names(index.lookup("shop", "web", None, None)) == ["svc"]
    assert names(index.lookup("shop", "web", "HTTPRoute", "shop/r")) == ["svc", "rt"]
    assert names(index.lookup("shop", "api", "HTTPRoute", "shop/r")) == ["rt"]
    assert names(index.lookup("shop", "api", "GRPCRoute", "shop/r")) == []  # another kind
    assert names(index.lookup("other", "web", None, None)) == ["other"]
    assert index.lookup("shop", "db", None, None) == ()
    assert RateLimitIndex().empty and not index.empty


def test_an_unchanged_limit_keeps_its_buckets_through_a_rebuild() -> None:
    spec = "targetRefs: [{kind: Service, name: web}]\nlimits: [{name: a, requests: 1}]\n"
    first = RateLimitIndex.build([policy(spec)])
    (limit,) = first.lookup("shop", "web", None, None)
    assert limit.buckets is not None and limit.buckets.take("", 0.0) == 0.0
    (kept,) = RateLimitIndex.build([policy(spec)], first).lookup("shop", "web", None, None)
    assert kept.buckets is limit.buckets
    changed = policy(spec.replace("requests: 1", "requests: 2"))
    (fresh,) = RateLimitIndex.build([changed], first).lookup("shop", "web", None, None)
    assert fresh.buckets is not limit.buckets


def test_keys_come_from_the_identity_a_header_or_nothing() -> None:
    p = policy("""\
        targetRefs: [{kind: Service, name: web}]
        limits:
        - {name: t, requests: 1}
        - {name: id, requests: 1, key: {type: SourceIdentity}}
        - {name: h, requests: 1, key: {type: Header, name: X-User}}
        """)
    target, ident, header = RateLimitIndex.build([p]).lookup("shop", "web", None, None)
    req = request(x_user="alice")
    assert target.key("spiffe://a", req) == ""
    assert ident.key("spiffe://a", req) == "spiffe://a"
    assert header.key("spiffe://a", req) == "alice"
    assert header.key("spiffe://a", request()) == ""  # no header: the shared "missing" bucket
    long = header.key("x", request(x_user="u" * 500))
    assert long.startswith("#") and len(long) < 64
    assert header.store_key("alice") == "meshway:rl:shop/limits/h|Service shop/web|alice"


# --------------------------------------------------------------------------- decisions


def limits_of(spec: str) -> tuple:  # type: ignore[type-arg]
    return RateLimitIndex.build([policy(spec)]).lookup("shop", "web", None, None)


async def test_every_limit_must_allow_and_a_denied_request_takes_no_token() -> None:
    clock = FakeClock()
    limiter = RateLimiter(None, clock)
    both = limits_of("""\
        targetRefs: [{kind: Service, name: web}]
        limits:
        - {name: wide, requests: 3, per: 10s}
        - {name: per-user, requests: 1, per: 2s, key: {type: Header, name: x-user}}
        """)
    alice, bob = request(x_user="alice"), request(x_user="bob")
    assert await limiter.check(both, "id", alice) is None
    denied = await limiter.check(both, "id", alice)
    assert isinstance(denied, Denial)
    assert (denied.status, denied.flags, denied.body) == (429, "RL", "local_rate_limited")
    assert denied.retry_after == 2 and denied.limit is not None
    assert denied.limit.name == "per-user"
    # Alice's denial took nothing from "wide": Bob and a third user still fit in its 3.
    assert await limiter.check(both, "id", bob) is None
    assert await limiter.check(both, "id", request(x_user="carol")) is None
    wide = await limiter.check(both, "id", request(x_user="dave"))
    assert isinstance(wide, Denial) and wide.limit is not None and wide.limit.name == "wide"
    # retry-after rounds up to whole seconds: the next token of 3 per 10 s is 3.33 s away.
    assert wide.retry_after == 4


class FakeStore:
    def __init__(self) -> None:
        self.wait = 0.0
        self.down = False
        self.calls: list[list[tuple[str, float, int]]] = []

    async def take(self, buckets: Sequence[tuple[str, float, int]]) -> float:
        self.calls.append(list(buckets))
        if self.down:
            raise StoreUnavailable("connection refused")
        return self.wait


async def test_global_limits_go_to_the_store_and_a_denial_there_gives_local_tokens_back() -> None:
    store = FakeStore()
    limiter = RateLimiter(store, FakeClock())
    mixed = limits_of("""\
        targetRefs: [{kind: Service, name: web}]
        limits:
        - {name: local, requests: 2, per: 1h}
        - {name: global, requests: 5, scope: Global, key: {type: SourceIdentity}}
        """)
    assert await limiter.check(mixed, "spiffe://c", request()) is None
    assert store.calls == [[("meshway:rl:shop/limits/global|Service shop/web|spiffe://c", 5.0, 5)]]
    store.wait = 0.25
    denied = await limiter.check(mixed, "spiffe://c", request())
    assert isinstance(denied, Denial)
    assert (denied.status, denied.body, denied.retry_after) == (429, "rate_limited", 1)
    store.wait = 0.0
    # The denied request's local token came back: one more passes, then the local limit.
    assert await limiter.check(mixed, "spiffe://c", request()) is None
    local = await limiter.check(mixed, "spiffe://c", request())
    assert isinstance(local, Denial) and local.body == "local_rate_limited"


async def test_the_failure_mode_decides_when_the_store_is_down_or_missing() -> None:
    spec = """\
        targetRefs: [{kind: Service, name: web}]
        limits: [{name: g, requests: 5, scope: Global}]
        failureMode: MODE
        """
    store = FakeStore()
    store.down = True
    limiter = RateLimiter(store, FakeClock())
    opened = await limiter.check(limits_of(spec.replace("MODE", "Open")), "id", request())
    assert isinstance(opened, StoreFailure) and "connection refused" in opened.reason
    closed = await limiter.check(limits_of(spec.replace("MODE", "Closed")), "id", request())
    assert isinstance(closed, Denial)
    assert (closed.status, closed.flags, closed.retry_after) == (503, "RLSE", 1)
    # A waypoint without a store: the same, for every Global limit.
    nostore = RateLimiter(None, FakeClock())
    closed_too = await nostore.check(limits_of(spec.replace("MODE", "Closed")), "id", request())
    assert isinstance(closed_too, Denial) and "no rate limit store" in closed_too.details


# --------------------------------------------------------------------------- the data path


async def test_the_data_path_answers_429_with_retry_after_and_counts_it() -> None:
    dp = datapath()
    sent: list[str] = []

    async def upstream(endpoint: object, req: Request, http2: bool, *_: object) -> object:
        sent.append(req.path)
        return simple_response(200, "ok")

    dp.upstream.request = upstream  # type: ignore[method-assign,assignment]
    clock = FakeClock()
    dp.ratelimiter = RateLimiter(None, clock)
    dp.update(
        ratelimits=RateLimitIndex.build(
            [
                policy(
                    "targetRefs: [{kind: Service, name: web}]\n"
                    "limits: [{name: two, requests: 2, per: 3s}]\n"
                )
            ]
        )
    )
    dest = dp.destination("10.96.0.10", 80)
    assert dest is not None
    down = Downstream(SpiffeId("cluster.local", "shop", "client"), "10.244.0.9", None, dest)
    codes = []
    for i in range(4):
        response = await dp.serve(down, request(f"/{i}"))
        await response.body.read_all()  # the request is reported once its response is sent
        codes.append(response.status)
    assert codes == [200, 200, 429, 429]
    assert sent == ["/0", "/1"]  # the denied ones went nowhere
    limited = await dp.serve(down, request("/x"))
    assert limited.header("retry-after") == "2"  # 1.5 s to the next token, rounded up
    assert await limited.body.read_all() == b"local_rate_limited"
    exposition = dp.metrics.exposition().decode()
    assert (
        'meshway_waypoint_rate_limited_total{limit="two",policy="shop/limits",scope="Local",'
        'target="Service shop/web"} 3.0' in exposition
    )
    assert 'response_flags="RL"' in exposition
    clock.now += 1.5
    assert (await dp.serve(down, request("/later"))).status == 200
    # gRPC clients get a gRPC status (UNAVAILABLE, as for Envoy's rate limit).
    grpc = Request("POST", "/demo.Echo/Say", "web.shop", [("content-type", "application/grpc")])
    answer = await dp.serve(down, grpc)
    assert answer.status == 200 and answer.header("grpc-status") == "14"


def test_the_store_client_is_made_when_a_global_limit_is_configured_not_on_a_request() -> None:
    from meshway.waypoint.ratelimit_store import RedisStore, store_url_error

    store = RedisStore("redis://127.0.0.1:1/0")
    assert store._redis is None  # constructing it imports nothing and connects nowhere
    store.prepare()
    assert store._redis is not None and store.available  # ready; still no connection made
    assert store_url_error("http://x") is not None and store_url_error("redis://") is not None
    assert store_url_error("unix:///run/redis.sock") is None
    with pytest.raises(ValueError, match="scheme"):
        RedisStore("memcached://127.0.0.1:11211")


async def test_only_a_global_limit_of_a_served_namespace_makes_the_store_client() -> None:
    """Every waypoint receives every namespace's RateLimitPolicies; another namespace's Global
    limit must not load redis-py into this one (it cost every waypoint of the benchmark ~7 MB
    of RSS), while one of its own makes the client before any request needs it."""
    from meshway.waypoint.server import Waypoint, WaypointConfig

    config = WaypointConfig("shop", "waypoint", "127.0.0.1:1", "t", b"", "node-1")
    config.ratelimit_store = "redis://127.0.0.1:1/0"
    waypoint = Waypoint(config)
    try:
        spec = "targetRefs: [{kind: Service, name: web}]\n"
        spec += "limits: [{name: all, requests: 10, per: 1s, scope: Global}]\n"
        billing = policy(spec, namespace="billing")
        waypoint.datapath.update(ratelimits=RateLimitIndex.build([billing]))
        assert waypoint.datapath.ratelimits.global_namespaces == {"billing"}
        store = waypoint.ratelimit_store
        assert store is not None
        waypoint._prepare_ratelimit_store({"shop"})
        assert store._redis is None  # billing's limit: nothing made, nothing imported
        waypoint._prepare_ratelimit_store({"shop", "billing"})
        assert store._redis is not None
    finally:
        await waypoint.xds.close()
        await waypoint.ca.close()
