"""RateLimitPolicy end to end in the local runtime, with real traffic: a client pod sends
faster than the limit for a few seconds, and what the waypoint admits is compared with
burst + rate x duration (within 10 %), for a Local limit, per-key limits, a Global limit in the
runtime's Redis shared by two waypoint replicas, a limit on one route, and the failure mode
when that Redis is gone.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from meshway.runtime.ratelimitstore import RedisServer, ping, stop_pid

from .meshcluster import Cluster, running_cluster
from .waypointkit import (
    APP,
    PY,
    access_log,
    apply_temporarily,
    curl,
    http_service,
    shop_with_waypoint,
    waypoint_gateway,
    waypoint_log,
    workload,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
    pytest.mark.skipif(not RedisServer.installed(), reason="redis-server is not installed"),
    pytest.mark.timeout(300),
]


MANIFEST = (
    shop_with_waypoint("client", "other", "web")
    + http_service("web", "app: web")
    + workload("client-0", "node-1", ["sleep", "infinity"])
    + workload("other-0", "node-1", ["sleep", "infinity"])
    + workload("web-0", "node-2", [PY, APP, "http", "8080", "web-0"])
    # A route on web: /api goes through it (and its limit), the rest does not match it.
    + textwrap.dedent("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: api, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
          rules:
          - matches: [{path: {type: PathPrefix, value: /api}}]
            backendRefs: [{name: web, port: 80}]
          - backendRefs: [{name: web, port: 80}]
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: rest, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
          rules:
          - matches: [{path: {type: PathPrefix, value: /rest}}]
            backendRefs: [{name: web, port: 80}]
        ---
        """)
)
WEB = "http://web.shop.svc.cluster.local"
SECONDS = 4.0
PODS = ("client-0", "other-0")
REPLICAS = ("waypoint", "waypoint-1")
CONCURRENCY = 8


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("ratelimit")
    with running_cluster(state, MANIFEST) as cluster:
        cluster.eventually(lambda: curl(cluster, f"{WEB}/ready")["code"] == 200, seconds=60)
        yield cluster


def rate_limit_policy(
    name: str, limits: str, failure_mode: str = "Open", target: str = "{kind: Service, name: web}"
) -> str:
    return textwrap.dedent(f"""\
        apiVersion: meshway.io/v1alpha1
        kind: RateLimitPolicy
        metadata: {{name: {name}, namespace: shop}}
        spec:
          targetRefs: [{target}]
          failureMode: {failure_mode}
          limits:
        """) + textwrap.indent(textwrap.dedent(limits), "  ")


def load(cluster: Cluster, pod: str, url: str, seconds: float, *headers: str) -> dict[str, Any]:
    """Requests from `pod` as fast as it can for `seconds` (bounded in count too)."""
    out = cluster.exec(
        f"shop/{pod}", PY, APP, "load", url, str(seconds), str(CONCURRENCY), *headers
    )
    result: dict[str, Any] = json.loads(out)
    return result


def within(admitted: int, burst: int, rate: float, seconds: float) -> tuple[bool, float]:
    expected = burst + rate * seconds
    return abs(admitted - expected) <= 0.10 * expected, expected


def test_a_local_limit_admits_burst_plus_rate_and_answers_429_with_retry_after(
    mesh: Cluster,
) -> None:
    policy = rate_limit_policy("local", "- {name: all, requests: 40, per: 1s, burst: 10}\n")
    with apply_temporarily(mesh, policy):
        before = len(access_log(mesh))
        result = load(mesh, "client-0", f"{WEB}/local", SECONDS)
    codes = result["codes"]
    admitted, limited = codes.get("200", 0), codes.get("429", 0)
    ok, expected = within(admitted, 10, 40, result["seconds"])
    print(f"local: admitted {admitted}, limited {limited}, expected {expected:.0f}: {result}")
    assert set(codes) <= {"200", "429"}
    assert limited > admitted  # the client did send faster than the limit
    assert ok, f"admitted {admitted}, expected {expected:.0f} within 10%"
    # 429 with retry-after in whole seconds (a token every 25 ms: 1 s, rounded up), Envoy's body.
    assert set(result["retry_after"]) == {"1"}
    assert set(result["bodies"]) == {"local_rate_limited"}
    entries = mesh.eventually(
        lambda: [e for e in access_log(mesh)[before:] if e.get("response_flags") == "RL"]
    )
    assert entries[0]["response_code"] == 429
    assert "shop/local/all" in entries[0]["details"]


def test_per_header_keys_have_their_own_buckets(mesh: Cluster) -> None:
    policy = rate_limit_policy(
        "per-user",
        "- {name: user, requests: 15, per: 1s, burst: 5, key: {type: Header, name: x-user}}\n",
    )
    with apply_temporarily(mesh, policy):
        # Two users taking turns: each gets its own burst + rate (with one shared bucket, each
        # would get half of that).
        result = load(mesh, "client-0", f"{WEB}/users", SECONDS, "x-user: u{k}")
    print(f"per header: {result}")
    for user in ("u0", "u1"):
        admitted = result["by_key"].get(f"{user} 200", 0)
        ok, expected = within(admitted, 5, 15, result["seconds"])
        assert ok, f"{user}: admitted {admitted}, expected {expected:.0f} within 10%"


def test_per_identity_keys_have_their_own_buckets(mesh: Cluster) -> None:
    policy = rate_limit_policy(
        "per-client",
        "- {name: client, requests: 15, per: 1s, burst: 5, key: {type: SourceIdentity}}\n",
    )
    with apply_temporarily(mesh, policy), ThreadPoolExecutor(2) as pool:
        # Two pods with two service accounts at the same time: each gets its own share.
        runs = [pool.submit(load, mesh, pod, f"{WEB}/{pod}", SECONDS) for pod in PODS]
        results = [run.result() for run in runs]
    print(f"per identity: {results}")
    for pod, result in zip(PODS, results, strict=True):
        admitted = result["codes"].get("200", 0)
        ok, expected = within(admitted, 5, 15, result["seconds"])
        assert ok, f"{pod}: admitted {admitted}, expected {expected:.0f} within 10%"


def test_a_limit_on_a_route_applies_only_to_the_requests_it_matched(mesh: Cluster) -> None:
    policy = rate_limit_policy(
        "on-route",
        "- {name: rest, requests: 20, per: 1s, burst: 5}\n",
        target="{group: gateway.networking.k8s.io, kind: HTTPRoute, name: rest}",
    )
    with apply_temporarily(mesh, policy), ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(load, mesh, "client-0", f"{WEB}/{p}", 3.0) for p in ("rest", "api")]
        limited, free = (run.result() for run in runs)
    print(f"on route: rest {limited}, api {free}")
    admitted = limited["codes"].get("200", 0)
    ok, expected = within(admitted, 5, 20, limited["seconds"])
    assert ok, f"admitted {admitted}, expected {expected:.0f} within 10%"
    assert set(free["codes"]) == {"200"}  # the other route's requests are not limited
    assert free["codes"]["200"] > 2 * admitted


def runtime_store(cluster: Cluster) -> tuple[str, int]:
    settings = json.loads((cluster.directory / "cluster.json").read_text())
    return settings["ratelimit_store"], settings["ratelimit_store_pid"]


def test_a_global_limit_is_shared_by_two_waypoint_replicas(mesh: Cluster) -> None:
    """The waypoint scaled to two replicas on two nodes; two client pods load it at once
    (their node proxy spreads the tunnels over the replicas): both replicas admit requests,
    and together they admit burst + rate x duration, the one limit in the runtime's Redis."""
    url, pid = runtime_store(mesh)
    assert url.startswith("redis://127.0.0.1:") and pid > 0
    assert mesh.status()["ratelimitStore"] == {"url": url, "pid": pid, "alive": True}
    policy = rate_limit_policy(
        "global", "- {name: all, requests: 40, per: 1s, burst: 20, scope: Global}\n"
    )
    mesh.apply(waypoint_gateway(2))
    try:
        mesh.eventually(
            lambda: mesh.status()["pods"].get("shop/waypoint-1", {}).get("phase") == "Running",
            seconds=60,
        )
        mesh.eventually(lambda: "serving" in waypoint_log(mesh, "waypoint-1"), seconds=30)
        logged = {pod: len(access_log(mesh, pod)) for pod in REPLICAS}
        with apply_temporarily(mesh, policy), ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(load, mesh, pod, f"{WEB}/global", SECONDS) for pod in PODS]
            results = [run.result() for run in runs]
        admitted = sum(r["codes"].get("200", 0) for r in results)
        limited = sum(r["codes"].get("429", 0) for r in results)
        seconds = max(r["seconds"] for r in results)
        # A burst of half a second's tokens: a client stalled that long by a busy machine
        # loses none (the bucket is full after 0.5 s), so what is measured is the limiter.
        ok, expected = within(admitted, 20, 40, seconds)
        by_replica = {
            pod: sum(
                1
                for e in access_log(mesh, pod)[logged[pod] :]
                if e.get("path") == "/global" and e.get("response_code") == 200
            )
            for pod in REPLICAS
        }
        print(f"global, two replicas: admitted {admitted} {by_replica}, expected {expected:.0f}")
        assert all(set(r["codes"]) <= {"200", "429"} for r in results) and limited > admitted
        assert all(n > 0 for n in by_replica.values()), by_replica  # both replicas served
        assert ok, f"admitted {admitted}, expected {expected:.0f} within 10%"
        assert {b for r in results for b in r["bodies"]} == {"rate_limited"}
    finally:
        mesh.apply(waypoint_gateway())
        mesh.eventually(lambda: "shop/waypoint-1" not in mesh.status()["pods"], seconds=60)


def test_without_its_redis_a_global_limit_takes_its_failure_mode(mesh: Cluster) -> None:
    url, pid = runtime_store(mesh)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    limits = "- {name: all, requests: 5, per: 1s, burst: 5, scope: Global}\n"
    closed = rate_limit_policy("store-down", limits, "Closed")
    opened = rate_limit_policy("store-down", limits, "Open")
    replacement = RedisServer(mesh.directory / "ratelimit-store", port)
    try:
        stop_pid(pid)
        assert not ping(port)
        with apply_temporarily(mesh, closed):
            before = len(access_log(mesh))
            down = load(mesh, "client-0", f"{WEB}/closed", 1.0)
            mesh.apply(opened)
            mesh.eventually(lambda: curl(mesh, f"{WEB}/opened")["code"] == 200)
            through = load(mesh, "client-0", f"{WEB}/opened", 1.0)
            # Back: limiting again, after the waypoint's short back-off.
            replacement.start()
            mesh.eventually(
                lambda: "429" in load(mesh, "client-0", f"{WEB}/back", 1.0)["codes"], seconds=20
            )
        print(f"store down: closed {down}, open {through}")
        # Closed: every request 503 with the RLSE flag; Open: every request through.
        assert set(down["codes"]) == {"503"} and down["codes"]["503"] > 10
        assert set(through["codes"]) == {"200"} and through["codes"]["200"] > 10
        flagged = [e for e in access_log(mesh)[before:] if e.get("response_flags") == "RLSE"]
        assert flagged and flagged[0]["response_code"] == 503
    finally:
        replacement.stop()
