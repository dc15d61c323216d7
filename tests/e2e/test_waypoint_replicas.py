"""Waypoint replicas in the local runtime: `meshway waypoint apply --replicas 2` runs two
waypoint processes on two nodes; node proxies spread new tunnels over both (each replica's
access log counts its share); a replica that dies is routed around; scaling back to one
removes `<gw>-1` while requests keep succeeding through the other.

One cluster for the module; the tests run in order (the last one scales down).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from .meshcluster import Cluster, running_cluster
from .waypointkit import (
    APP,
    PY,
    access_log,
    http_service,
    shop_with_waypoint,
    waypoint_log,
    workload,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]

# The namespace names the waypoint before it exists; traffic goes direct until it does.
MANIFEST = (
    shop_with_waypoint("client", "web", gateway=False)
    + http_service("web", "app: web")
    + workload("client-0", "node-1", ["sleep", "infinity"])
    + workload("client-1", "node-2", ["sleep", "infinity"])
    + workload("web-0", "node-2", [PY, APP, "http", "8080", "web-0"])
)
WEB = "http://web.shop.svc.cluster.local"
REPLICAS = ("waypoint", "waypoint-1")


def hits(cluster: Cluster, pod: str, tag: str, count: int) -> list[int]:
    """`count` GETs of /<tag>/<i> from `pod`, each on a connection of its own (so each is a
    new tunnel for the node proxy); their status codes (0: no answer)."""
    out = cluster.exec(
        pod, "curl", "-s", "-H", "Connection: close", "--max-time", "10",
        "-w", "\\nCODE %{http_code}\\n", f"{WEB}/{tag}/[1-{count}]", check=False,
    )  # fmt: skip
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("CODE ")]


def served_by(cluster: Cluster, tag: str) -> dict[str, int]:
    """How many requests of `tag` each replica's access log has."""
    return {
        pod: sum(1 for e in access_log(cluster, pod) if e.get("path", "").startswith(f"/{tag}/"))
        for pod in REPLICAS
    }


def all_logged(cluster: Cluster, tag: str, total: int) -> dict[str, int]:
    """`served_by`, once the replicas have logged `total` requests of `tag` (the access log is
    written in batches)."""

    def check() -> dict[str, int] | None:
        counts = served_by(cluster, tag)
        return counts if sum(counts.values()) >= total else None

    found: dict[str, int] = cluster.eventually(check, seconds=10)
    return found


def waypoints(cluster: Cluster) -> dict[str, Any]:
    out = cluster.meshway("waypoint", "list", "-n", "shop", "-o", "json").stdout
    (row,) = json.loads(out)["items"]
    return dict(row)


def get_json(cluster: Cluster, *args: str) -> Any:
    result = cluster.meshway("get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("replicas"), MANIFEST) as cluster:
        cluster.eventually(lambda: hits(cluster, "shop/client-0", "direct", 1) == [200], 40)
        yield cluster


def test_two_replicas_run_on_two_nodes(mesh: Cluster) -> None:
    out = mesh.meshway("waypoint", "apply", "-n", "shop", "--replicas", "2", "--wait").stdout
    assert "waypoint shop/waypoint applied" in out and "is ready" in out
    nodes = {}
    for name in REPLICAS:
        wl = get_json(mesh, "wl", name, "-n", "shop")
        assert wl["metadata"]["annotations"] == {"meshway.io/managed-by": "Gateway/waypoint"}
        assert wl["spec"]["serviceAccountName"] == "waypoint"
        nodes[name] = wl["spec"]["nodeName"]
    # node-1 runs one pod, node-2 two: the first replica goes to node-1, the second to the
    # node without a replica.
    assert nodes == {"waypoint": "node-1", "waypoint-1": "node-2"}
    row = mesh.eventually(lambda: (r := waypoints(mesh))["ready"] == "2/2" and r, seconds=60)
    assert row["programmed"] == "True" and row["node"] == "node-1,node-2"
    gateway = get_json(mesh, "gateway", "waypoint", "-n", "shop")
    programmed = next(c for c in gateway["status"]["conditions"] if c["type"] == "Programmed")
    assert programmed["message"].startswith("2 of 2 waypoint replicas run: ")
    for name in REPLICAS:
        mesh.eventually(lambda n=name: "serving HBONE" in waypoint_log(mesh, n), seconds=40)


def test_tunnels_reach_both_replicas(mesh: Cluster) -> None:
    # Every node proxy knows both replicas once a request from each client has gone through.
    for pod in ("shop/client-0", "shop/client-1"):
        mesh.eventually(lambda p=pod: hits(mesh, p, "warm", 4) == [200] * 4, seconds=30)
    per_client = 60
    codes = hits(mesh, "shop/client-0", "spread", per_client)
    codes += hits(mesh, "shop/client-1", "spread", per_client)
    assert codes == [200] * 2 * per_client
    counts = all_logged(mesh, "spread", 2 * per_client)
    assert sum(counts.values()) == 2 * per_client
    # Round robin per node proxy gives each replica half of each client's tunnels; ±15 % of
    # the total allows for tunnels that retried elsewhere.
    print(f"requests per replica: {counts}")
    for name in REPLICAS:
        assert 0.35 <= counts[name] / (2 * per_client) <= 0.65, counts


def test_a_dead_replica_is_routed_around(mesh: Cluster) -> None:
    pid = mesh.status()["pods"]["shop/waypoint-1"]["pid"]
    os.kill(pid, signal.SIGKILL)  # a crash: the runtime restarts it after a back-off
    codes = hits(mesh, "shop/client-0", "crash", 30) + hits(mesh, "shop/client-1", "crash", 30)
    counts = all_logged(mesh, "crash", codes.count(200))
    print(f"after the crash of waypoint-1: codes {sorted(set(codes))}, per replica {counts}")
    assert codes == [200] * 60
    assert counts["waypoint"] >= 30  # at least the tunnels that found waypoint-1 down

    # Restarted by the runtime, it gets its share again once its ejection has run out.
    def back() -> bool:
        assert hits(mesh, "shop/client-0", "recover", 10) == [200] * 10
        return served_by(mesh, "recover")["waypoint-1"] > 0

    mesh.eventually(back, seconds=60, interval=1.0)


def test_scaling_down_keeps_traffic_on_the_other_replica(mesh: Cluster) -> None:
    # Traffic runs before, while and after the second replica is scaled away.
    codes: list[int] = []
    scaled = threading.Event()

    def load() -> None:
        batches_after = 0
        for _ in range(40):  # bounded: at most 40 x 10 requests
            codes.extend(hits(mesh, "shop/client-1", "scale", 10))
            batches_after += scaled.is_set()
            if batches_after == 3:
                return

    loader = threading.Thread(target=load)
    loader.start()
    try:
        mesh.eventually(lambda: len(codes) >= 20, seconds=60)
        out = mesh.meshway("waypoint", "apply", "-n", "shop", "--replicas", "1").stdout
        assert "waypoint shop/waypoint applied" in out
        assert get_json(mesh, "wl", "waypoint-1", "-n", "shop") is None
        mesh.wait(lambda s: "shop/waypoint-1" not in s["pods"])
    finally:
        scaled.set()
        loader.join(timeout=120)
    assert not loader.is_alive()
    counts = all_logged(mesh, "scale", codes.count(200))
    failed = len(codes) - codes.count(200)
    print(f"during the scale-down: {len(codes)} requests, {failed} failed, per replica {counts}")
    assert failed == 0, codes
    assert counts["waypoint-1"] > 0  # it served its share until it was scaled away

    # Afterwards everything goes to the one that is left.
    before = served_by(mesh, "after")
    assert hits(mesh, "shop/client-0", "after", 20) == [200] * 20
    assert hits(mesh, "shop/client-1", "after", 20) == [200] * 20
    counts = all_logged(mesh, "after", 40)
    assert counts == {"waypoint": 40, "waypoint-1": 0} and before == {
        "waypoint": 0,
        "waypoint-1": 0,
    }
    row = mesh.eventually(lambda: (r := waypoints(mesh))["ready"] == "1/1" and r, seconds=30)
    assert row["node"] == "node-1" and row["programmed"] == "True"
