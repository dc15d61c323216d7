"""DestinationRule traffic policy at the waypoint (`waypoint.traffic`): which rule applies,
each load balancer's choices, ring-hash stability, subsets and their route references."""

from __future__ import annotations

import collections
import random
from typing import Any

import pytest

from meshway.api.v1 import address_pb2
from meshway.config.model import KINDS
from meshway.waypoint.messages import Request
from meshway.waypoint.routing import RouteTable
from meshway.waypoint.traffic import (
    HashKey,
    LeastRequest,
    RingHash,
    TrafficPolicies,
)
from meshway.waypoint.upstream import Endpoint

pytestmark = pytest.mark.unit


def rule(name: str, spec: dict[str, Any], namespace: str = "shop", created: str = "") -> Any:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if created:
        metadata["creationTimestamp"] = created
    return KINDS["DestinationRule"].model_validate(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": metadata,
            "spec": spec,
        }
    )


def endpoints(n: int, **labels: str) -> list[Endpoint]:
    out = []
    for i in range(n):
        wl = address_pb2.Workload(name=f"web-{i}", namespace="shop")
        wl.labels.update(labels or {"version": "v1" if i % 2 == 0 else "v2"})
        out.append(Endpoint(wl, f"10.244.1.{i + 1}", 8080))
    return out


def key(
    headers: list[tuple[str, str]] | None = None, path: str = "/", ip: str = "10.0.0.1"
) -> HashKey:
    return HashKey(Request("GET", path, "web", headers or []), ip)


def test_which_rule_applies() -> None:
    rules = [
        rule("wild", {"host": "*.shop.svc.cluster.local"}, created="2026-01-01T00:00:00Z"),
        rule("short", {"host": "web"}, created="2026-02-01T00:00:00Z"),
        rule("fqdn-other-ns", {"host": "web.shop.svc.cluster.local"}, namespace="other"),
        rule("root", {"host": "db.shop.svc.cluster.local"}, namespace="istio-system"),
        rule(
            "selected",
            {"host": "api", "workloadSelector": {"matchLabels": {"app": "x"}}},
        ),
        rule("two-part", {"host": "cart.shop"}),
    ]
    policies = TrafficPolicies.build(rules)
    found = {
        name: (p.rule_name if (p := policies.for_service("shop", name)) else None)
        for name in ("web", "db", "api", "cart", "pay")
    }
    assert found == {
        "web": "shop/short",  # exact beats the older wildcard
        "db": "shop/wild",  # the Service's namespace before the root namespace
        "api": "shop/wild",  # a rule with a workloadSelector is for client sidecars
        "cart": "shop/two-part",
        "pay": "shop/wild",
    }
    assert TrafficPolicies.build(rules[3:4]).for_service("shop", "db").rule_name == (  # type: ignore[union-attr]
        "istio-system/root"
    )
    assert TrafficPolicies.build(rules[2:3]).for_service("shop", "web") is None


def test_round_robin_random_and_least_request() -> None:
    eps = endpoints(4)
    policies = TrafficPolicies.build(
        [
            rule(
                "rr", {"host": "rr", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}
            ),
            rule("rand", {"host": "rand", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}),
        ]
    )
    rr = policies.for_service("shop", "rr").cluster(80, None).balancer  # type: ignore[union-attr]
    assert [rr.pick(eps, key()).ip for _ in range(8)] == [e.ip for e in eps] * 2

    random.seed(7)
    rand = policies.for_service("shop", "rand").cluster(80, None).balancer  # type: ignore[union-attr]
    counts = collections.Counter(rand.pick(eps, key()).ip for _ in range(8000))
    # 2000 expected each; binomial sd ~39: 6 sd either way.
    assert all(abs(c - 2000) < 240 for c in counts.values()), counts

    # Power of two choices: the busiest endpoint is never picked while another is idle...
    active = {eps[0].key: 5, eps[1].key: 1, eps[2].key: 1, eps[3].key: 0}
    least = LeastRequest(active, random.Random(3).randrange)
    picks = collections.Counter(least.pick(eps, key()).ip for _ in range(6000))
    assert eps[0].ip not in picks
    # ...and the idle one wins every draw it takes part in: 3 of the 6 pairs, half the picks.
    assert 0.45 < picks[eps[3].ip] / 6000 < 0.55, picks


def test_ring_hash_is_stable_and_moves_few_keys_when_an_endpoint_is_added() -> None:
    lb = RingHash(
        KINDS["DestinationRule"]
        .model_validate(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {"name": "h", "namespace": "shop"},
                "spec": {
                    "host": "h",
                    "trafficPolicy": {
                        "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}
                    },
                },
            }
        )
        .spec.traffic_policy.load_balancer.consistent_hash
    )
    four, five = endpoints(4), endpoints(5)
    users = [f"user-{i}" for i in range(10_000)]
    before = {u: lb.pick(four, key([("x-user", u)])).ip for u in users}
    again = {u: lb.pick(four, key([("x-user", u)])).ip for u in users}
    assert before == again  # the same key, the same endpoint
    spread = collections.Counter(before.values())
    assert all(1500 < c < 3500 for c in spread.values()), spread
    after = {u: lb.pick(five, key([("x-user", u)])).ip for u in users}
    moved = [u for u in users if after[u] != before[u]]
    # About 1/5 of the keys move, all of them to the new endpoint (modulo hashing: ~4/5).
    assert 0.12 < len(moved) / len(users) < 0.28, len(moved)
    assert {after[u] for u in moved} == {five[4].ip}


def test_hash_keys_cookie_query_and_source_ip() -> None:
    def ring(spec: dict[str, Any]) -> RingHash:
        dr = rule("h", {"host": "h", "trafficPolicy": {"loadBalancer": {"consistentHash": spec}}})
        return RingHash(dr.spec.traffic_policy.load_balancer.consistent_hash)

    eps = endpoints(8)
    by_ip = ring({"useSourceIp": True})
    assert len({by_ip.pick(eps, key(ip="10.0.0.7")).ip for _ in range(20)}) == 1
    by_query = ring({"httpQueryParameterName": "user"})
    assert len({by_query.pick(eps, key(path=f"/x?a={i}&user=bob")).ip for i in range(20)}) == 1
    by_cookie = ring({"httpCookie": {"name": "lb", "path": "/", "ttl": "60s"}})
    fixed = {by_cookie.pick(eps, key([("cookie", f"a={i}; lb=abc")])).ip for i in range(20)}
    assert len(fixed) == 1
    fresh = key()
    by_cookie.pick(eps, fresh)
    assert fresh.set_cookie is not None
    value = fresh.set_cookie.split(";")[0].split("=")[1]
    assert fresh.set_cookie == f"lb={value}; Path=/; Max-Age=60; HttpOnly"
    # The new cookie sends the client to the same endpoint next time.
    first = by_cookie.pick(eps, fresh)
    assert by_cookie.pick(eps, key([("cookie", f"lb={value}")])).ip == first.ip


def test_subsets_and_their_load_balancer_overrides() -> None:
    dr = rule(
        "web",
        {
            "host": "web",
            "trafficPolicy": {
                "loadBalancer": {"simple": "RANDOM"},
                "portLevelSettings": [
                    {"port": {"number": 9090}, "loadBalancer": {"simple": "ROUND_ROBIN"}}
                ],
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {"loadBalancer": {"consistentHash": {"useSourceIp": True}}},
                },
            ],
        },
    )
    policy = TrafficPolicies.build([dr]).for_service("shop", "web")
    assert policy is not None
    assert type(policy.cluster(80, None).balancer).__name__ == "RandomChoice"
    assert type(policy.cluster(9090, None).balancer).__name__ == "RoundRobin"
    assert (
        type(policy.cluster(9090, "v1").balancer).__name__ == "RoundRobin"
    )  # the rule's port level
    assert type(policy.cluster(80, "v2").balancer).__name__ == "RingHash"
    eps = endpoints(4)
    assert [e.workload.name for e in eps if policy.subsets["v2"].selects(e.workload.labels)] == [
        "web-1",
        "web-3",
    ]


def test_a_route_backend_can_name_a_subset() -> None:
    route = KINDS["HTTPRoute"].model_validate(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [
                    {
                        "backendRefs": [
                            {"group": "meshway.io", "kind": "ServiceSubset", "name": "web.v2",
                             "port": 80, "weight": 1},
                            {"group": "meshway.io", "kind": "ServiceSubset", "name": "web",
                             "port": 80, "weight": 1},
                        ]
                    }
                ],
            },
        }
    )  # fmt: skip
    table = RouteTable.build([route])
    routes = table.for_service("shop", "web", 80, client_namespace="shop")
    assert routes is not None
    match = routes.match(Request("GET", "/", "web"))
    assert match is not None
    [backend] = match.rule.backends  # "web" alone names no subset: invalid, keeps its weight
    assert (backend.name, backend.subset, backend.port) == ("web", "v2", 80)
    assert any("ServiceSubset is named <service>.<subset>" in p for p in table.problems)


async def test_connection_pool_limits_overflow_at_once_and_recover() -> None:
    import asyncio

    from meshway.waypoint.traffic import Limiter, Overflow

    limiter = Limiter(max_active=2, max_pending=1)
    await limiter.acquire()
    await limiter.acquire()
    waiting = asyncio.ensure_future(limiter.acquire())  # the one pending slot
    await asyncio.sleep(0)
    assert not waiting.done()
    with pytest.raises(Overflow):
        await limiter.acquire()  # nothing left: fails at once
    limiter.release()  # a slot frees up: the pending request gets it, in order
    await asyncio.wait_for(waiting, 1)
    assert limiter.active == 2
    # A pending request that gives up leaves its place (and no slot is lost).
    gave_up = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    gave_up.cancel()
    await asyncio.sleep(0)
    limiter.release()
    limiter.release()
    assert limiter.active == 0
    await limiter.acquire()  # recovered


def test_outlier_detection_ejects_and_returns_never_more_than_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from meshway.waypoint import traffic

    now = [1000.0]
    monkeypatch.setattr(traffic.time, "monotonic", lambda: now[0])
    dr = rule(
        "web",
        {
            "host": "web",
            "trafficPolicy": {
                "outlierDetection": {
                    "consecutive5xxErrors": 3,
                    "consecutiveGatewayErrors": 2,
                    "interval": "1s",
                    "baseEjectionTime": "10s",
                    "maxEjectionPercent": 50,
                }
            },
        },
    )
    cluster = TrafficPolicies.build([dr]).for_service("shop", "web").cluster(80, None)  # type: ignore[union-attr]
    detector = cluster.outliers
    assert detector is not None
    eps = endpoints(4)
    a, b, c = eps[0], eps[1], eps[2]
    # 500, 500, 200: the success resets the count; three 500s in a row eject.
    for status in (500, 500, 200, 500, 500):
        assert not detector.record(a, status, 4)
    assert detector.record(a, 500, 4)
    assert [e.ip for e in detector.healthy(eps)] == [e.ip for e in eps[1:]]
    picks = {cluster.pick(eps, key()).ip for _ in range(100)}
    assert a.ip not in picks
    # Two gateway errors (a failed connection counts as one) eject b: 2 of 4 is 50 %.
    assert not detector.record(b, 503, 4)
    assert detector.record(b, None, 4)
    # c would be a third: more than 50 % of the endpoints, so it stays.
    for _ in range(5):
        assert not detector.record(c, 502, 4)
    assert len(detector.healthy(eps)) == 2
    # After baseEjectionTime they are back; a second ejection lasts twice as long.
    now[0] += 10.5
    assert len(detector.healthy(eps)) == 4
    for _ in range(3):
        detector.record(a, 500, 4)
    now[0] += 15
    assert detector.is_ejected(a)
    now[0] += 6
    assert not detector.is_ejected(a)
    # Healthy for 100 intervals: the multiplier has decayed back, the next ejection is 10 s.
    now[0] += 100
    for _ in range(3):
        detector.record(a, 500, 4)
    now[0] += 9.5
    assert detector.is_ejected(a)
    now[0] += 1
    assert not detector.is_ejected(a)
    # Everything ejected: all are used anyway (Envoy's panic mode).
    lone = endpoints(1)
    solo = traffic.OutlierDetector(dr.spec.traffic_policy.outlier_detection)
    for _ in range(3):
        solo.record(lone[0], 500, 1)
    assert solo.is_ejected(lone[0]) and list(solo.healthy(lone)) == lone
