"""DestinationRule traffic policy at the waypoint, end to end with real traffic: how each load
balancer spreads requests over four pods, how consistent hashing keeps clients in place (also
when a pod is added), and routes to subsets."""

from __future__ import annotations

import collections
import json
import os
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .meshcluster import Cluster, running_cluster
from .waypointkit import (
    APP,
    PY,
    access_log,
    apply_temporarily,
    curl,
    http_service,
    logged,
    shop_with_waypoint,
    workload,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]

# web-0 and web-2 are version v1, web-1 and web-3 v2; each answers with its own name.
WEB_PODS = [f"web-{i}" for i in range(4)]
SLOW_PODS = [f"slow-{i}" for i in range(4)]

MANIFEST = (
    shop_with_waypoint("client", "web", "slow", "flaky", "shadow")
    + http_service("web", "app: web")
    + http_service("slow", "app: slow")
    + http_service("lagging", "app: slow, role: lagging")
    + http_service("flaky", "app: flaky")
    + http_service("shadow", "app: shadow")
    + workload("client-0", "node-1", ["sleep", "infinity"])
    + "".join(
        workload(pod, "node-2", [PY, APP, "http", "8080", pod], f", version: v{i % 2 + 1}")
        for i, pod in enumerate(WEB_PODS)
    )
    # slow-0 (also the Service "lagging") takes 150 ms per request, the others answer at once.
    + "".join(
        workload(
            pod,
            "node-2",
            [PY, APP, "http", "8080", pod, "0.15" if i == 0 else "0"],
            ", role: lagging" if i == 0 else "",
        )
        for i, pod in enumerate(SLOW_PODS)
    )
    # flaky-1 answers every request with 500.
    + workload("flaky-0", "node-2", [PY, APP, "http", "8080", "flaky-0"])
    + workload("flaky-1", "node-2", [PY, APP, "http", "8080", "flaky-1", "0", "500"])
    # shadow-0 takes a second per request: mirrors go there.
    + workload("shadow-0", "node-2", [PY, APP, "http", "8080", "shadow-0", "1"])
)
WEB = "http://web.shop.svc.cluster.local"
SHADOW = "http://shadow.shop.svc.cluster.local"
SLOW = "http://slow.shop.svc.cluster.local"
LAGGING = "http://lagging.shop.svc.cluster.local"
FLAKY = "http://flaky.shop.svc.cluster.local"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("traffic")
    with running_cluster(state, MANIFEST) as cluster:
        for url, pods in ((WEB, WEB_PODS), (SLOW, SLOW_PODS)):
            # Every pod answers through the waypoint before the tests measure anything.
            cluster.eventually(
                lambda url=url, pods=pods: set(versions(hits(cluster, url, 40, 8))) == set(pods),
                seconds=60,
            )
        cluster.eventually(
            lambda: {r["version"] for r in hits(cluster, FLAKY, 20, 4)} == {"flaky-0", "flaky-1"},
            seconds=60,
        )
        yield cluster


def hits(cluster: Cluster, url: str, total: int, concurrency: int, *headers: str) -> list[Any]:
    """`total` requests from the client pod; what each got, in order."""
    out = cluster.exec(
        "shop/client-0", PY, APP, "hits", url, str(total), str(concurrency), *headers
    )
    results: list[Any] = json.loads(out)
    return results


def versions(results: list[Any]) -> list[str]:
    return [r["version"] for r in results if r["code"] == 200]


def destination_rule(name: str, spec: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: {name}, namespace: shop}}
        spec:
        """) + textwrap.indent(textwrap.dedent(spec), "  ")


def test_round_robin_and_random_spread_requests_evenly(mesh: Cluster) -> None:
    rr = destination_rule(
        "web", "host: web\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n"
    )
    with apply_temporarily(mesh, rr):
        counts = collections.Counter(versions(hits(mesh, f"{WEB}/rr", 400, 4)))
    assert sum(counts.values()) == 400
    # Round robin: 100 each, give or take a request that crossed the configuration change.
    assert all(abs(counts[pod] - 100) <= 2 for pod in WEB_PODS), counts

    rand = destination_rule("web", "host: web\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}\n")
    with apply_temporarily(mesh, rand):
        counts = collections.Counter(versions(hits(mesh, f"{WEB}/random", 800, 4)))
    assert sum(counts.values()) == 800
    # 200 expected each; the binomial sd is 12.2: ±50 is four of them.
    assert all(abs(counts[pod] - 200) <= 50 for pod in WEB_PODS), counts
    assert len({counts[pod] for pod in WEB_PODS}) > 1  # not round robin in disguise


def test_least_request_sends_less_to_a_slow_endpoint(mesh: Cluster) -> None:
    # No DestinationRule: LEAST_REQUEST, Istio's default. slow-0 holds each request 150 ms,
    # so it has requests in flight while the others have none, and loses most draws.
    least = collections.Counter(versions(hits(mesh, f"{SLOW}/least", 400, 16)))
    assert sum(least.values()) == 400
    rr = destination_rule(
        "slow", "host: slow\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n"
    )
    with apply_temporarily(mesh, rr):
        spread = collections.Counter(versions(hits(mesh, f"{SLOW}/rr", 200, 16)))
    assert abs(spread["slow-0"] - 50) <= 2, spread  # round robin: its quarter
    assert least["slow-0"] / 400 < 0.12, least  # least request: far less than a quarter


def test_consistent_hash_keeps_each_user_on_one_pod_when_a_pod_is_added(mesh: Cluster) -> None:
    dr = destination_rule(
        "web",
        "host: web\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n",
    )
    extra = workload("web-4", "node-2", [PY, APP, "http", "8080", "web-4"], ", version: v1")
    users = 200
    with apply_temporarily(mesh, dr):
        first = versions(hits(mesh, f"{WEB}/hash", users, 8, "x-user: user-{i}"))
        second = versions(hits(mesh, f"{WEB}/hash", users, 8, "x-user: user-{i}"))
        assert len(first) == users and first == second  # every user, the same pod each time
        assert len(set(first)) == 4
        with apply_temporarily(mesh, extra):
            mesh.eventually(
                lambda: (
                    "web-4" in versions(hits(mesh, f"{WEB}/hash", users, 8, "x-user: user-{i}"))
                ),
                seconds=30,
            )
            after = versions(hits(mesh, f"{WEB}/hash", users, 8, "x-user: user-{i}"))
    assert len(after) == users
    moved = [i for i in range(users) if after[i] != first[i]]
    # A fifth pod takes about a fifth of the users, and only users move to it.
    assert 0.08 <= len(moved) / users <= 0.35, len(moved)
    assert {after[i] for i in moved} == {"web-4"}


def test_cookie_hash_sets_a_cookie_that_sticks(mesh: Cluster) -> None:
    dr = destination_rule(
        "web",
        "host: web\ntrafficPolicy:\n  loadBalancer:\n"
        "    consistentHash: {httpCookie: {name: lb, path: /, ttl: 3600s}}\n",
    )
    with apply_temporarily(mesh, dr):
        reply = curl(mesh, f"{WEB}/cookie")
        cookie = reply["headers"].get("set-cookie", "")
        assert cookie.startswith("lb=") and "Max-Age=3600" in cookie, reply["headers"]
        value = cookie.split(";")[0]
        pods = versions(hits(mesh, f"{WEB}/cookie", 40, 4, f"cookie: {value}"))
        again = [r["set_cookie"] for r in hits(mesh, f"{WEB}/cookie", 5, 1, f"cookie: {value}")]
    assert len(pods) == 40 and len(set(pods)) == 1
    assert again == [None] * 5  # the client has its cookie: no new one


def test_routes_to_subsets(mesh: Cluster) -> None:
    config = destination_rule(
        "web",
        """\
        host: web
        subsets:
        - {name: v1, labels: {version: v1}}
        - name: v2
          labels: {version: v2}
          trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
        """,
    ) + textwrap.dedent("""\
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: web-subsets, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
          rules:
          - matches: [{path: {type: PathPrefix, value: /missing}}]
            backendRefs: [{group: meshway.io, kind: ServiceSubset, name: web.v9, port: 80}]
          - backendRefs: [{group: meshway.io, kind: ServiceSubset, name: web.v2, port: 80}]
        """)
    with apply_temporarily(mesh, config):
        counts = collections.Counter(versions(hits(mesh, f"{WEB}/subset", 100, 4)))
        before = len(access_log(mesh))
        missing = curl(mesh, f"{WEB}/missing")
        entry = logged(mesh, lambda e: e.get("path") == "/missing", before)
    assert counts == {"web-1": 50, "web-3": 50}, counts  # v2 only, round robin within it
    assert missing["code"] == 503 and "no subset 'v9'" in missing["body"]
    assert entry["response_flags"] == "NC"


def test_connection_pool_overflow_fails_fast_with_uo_and_recovers(mesh: Cluster) -> None:
    dr = destination_rule(
        "lagging",
        "host: lagging\ntrafficPolicy:\n  connectionPool:\n"
        "    tcp: {maxConnections: 2}\n    http: {http1MaxPendingRequests: 2}\n",
    )
    with apply_temporarily(mesh, dr):
        before = len(access_log(mesh))
        burst = hits(mesh, f"{LAGGING}/burst", 20, 20)  # 20 at once; each takes 150 ms
        codes = collections.Counter(r["code"] for r in burst)
        overflowed = [e for e in access_log(mesh)[before:] if e.get("response_flags") == "UO"]
        calm = hits(mesh, f"{LAGGING}/calm", 6, 1)  # one at a time: all fit
    # 2 in flight and 2 waiting get through; the rest are refused at once.
    assert 4 <= codes[200] <= 8 and codes[503] == 20 - codes[200], codes
    assert all("overflow" in r["body"] for r in burst if r["code"] == 503)
    assert overflowed or logged(mesh, lambda e: e.get("response_flags") == "UO", before)
    assert [r["code"] for r in calm] == [200] * 6


def test_outlier_detection_ejects_a_failing_endpoint_and_lets_it_back(mesh: Cluster) -> None:
    dr = destination_rule(
        "flaky",
        """\
        host: flaky
        trafficPolicy:
          loadBalancer: {simple: ROUND_ROBIN}
          outlierDetection:
            consecutive5xxErrors: 2
            interval: 1s
            baseEjectionTime: 3s
            maxEjectionPercent: 50
        """,
    )
    with apply_temporarily(mesh, dr):
        first = hits(mesh, f"{FLAKY}/a", 40, 1)
        failed = [i for i, r in enumerate(first) if r["code"] == 500]
        # flaky-1 fails twice (round robin: the 2nd and 4th requests), then is ejected.
        assert len(failed) == 2 and failed[-1] <= 4, [r["code"] for r in first]
        assert all(r["version"] == "flaky-0" for r in first[failed[-1] + 1 :])
        mesh.eventually(lambda: any(r["code"] == 500 for r in hits(mesh, f"{FLAKY}/b", 4, 1)), 10)


def test_request_mirror_copies_its_share_and_never_slows_the_primary(mesh: Cluster) -> None:
    route = textwrap.dedent("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: web-mirror, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
          rules:
          - backendRefs: [{name: web, port: 80}]
            filters:
            - type: RequestMirror
              requestMirror: {backendRef: {name: shadow, port: 80}, percent: 50}
        """)

    def mirrored() -> dict[str, Any]:
        reply = curl(mesh, f"{SHADOW}/_count")
        assert reply["code"] == 200, reply
        counts: dict[str, Any] = json.loads(reply["body"])
        return counts

    with apply_temporarily(mesh, route):
        before = mirrored()["count"]
        sent_before = mirror_metric(mesh, "sent")
        started = time.monotonic()
        primary = hits(mesh, f"{WEB}/mirrored", 200, 4)
        elapsed = time.monotonic() - started
        # The copies take a second each at the mirror; they all arrive within a few.
        sent = mesh.eventually(
            lambda: (n := mirror_metric(mesh, "sent") - sent_before) >= 40 and n, seconds=15
        )
        mesh.eventually(lambda: mirrored()["count"] - before >= sent, seconds=15)
        after = mirrored()
    assert [r["code"] for r in primary] == [200] * 200
    # Had the primary waited for its copy, 100 of its requests would have taken a second each.
    assert elapsed < 15, elapsed
    share = (after["count"] - before) / 200
    assert 0.3 <= share <= 0.7, share  # 50 %; the binomial sd is 3.5 %
    assert set(after["hosts"]) == {"web.shop.svc.cluster.local-shadow"}


def mirror_metric(cluster: Cluster, outcome: str) -> float:
    """meshway_waypoint_mirrored_requests_total{outcome} from the waypoint's /metrics."""
    pods = cluster.status().get("pods") or {}
    ip = pods["shop/waypoint"]["ip"]
    text = cluster.exec("shop/client-0", "curl", "-s", f"http://{ip}:15020/metrics")
    prefix = f'meshway_waypoint_mirrored_requests_total{{outcome="{outcome}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))
