"""The local runtime: nodes and pods as network namespaces, run by the real CLI as root.

All traffic stays inside the namespaces the test creates; the fixture tears the cluster down
even when a test fails, and the last test checks that `cluster down` leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshway.runtime import host
from meshway.runtime.network import ClusterNames

from .meshcluster import Cluster, running_cluster

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]

MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {name: node-1}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {name: node-2}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: demo}
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {name: web, namespace: demo, labels: {app: web}}
spec:
  serviceAccountName: web
  nodeName: node-2
  command: [python3, -u, -m, http.server, "8080"]
  ports: [{name: http, containerPort: 8080}]
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {name: echo, namespace: demo, labels: {app: echo}}
spec:
  nodeName: node-2
  command:
    - python3
    - -c
    - |
      import socketserver
      class Echo(socketserver.StreamRequestHandler):
          def handle(self):
              for line in self.rfile:
                  self.wfile.write(line)
      socketserver.ThreadingTCPServer(("0.0.0.0", 9000), Echo).serve_forever()
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {name: client, namespace: demo, labels: {app: client}}
spec:
  nodeName: node-1
  command: [sleep, infinity]
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {name: resolver, namespace: demo}
spec:
  nodeName: node-1
  command: [sh, -c, "getent hosts web web.demo.svc.cluster.local; exec sleep infinity"]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{port: 9000}]
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("runtime"), MANIFEST) as c:
        yield c


def test_pods_run_on_their_nodes(cluster: Cluster) -> None:
    state = cluster.status()
    pods = state["pods"]
    assert {k: p["node"] for k, p in pods.items()} == {
        "demo/web": "node-2",
        "demo/echo": "node-2",
        "demo/client": "node-1",
        "demo/resolver": "node-1",
    }
    assert all(p["phase"] == "Running" for p in pods.values())
    names = ClusterNames(cluster.name)
    assert host.netns_exists(names.pod_ns("demo", "web"))
    assert host.netns_exists(names.node_ns("node-1"))
    # The pod's address is on its own eth0.
    assert pods["demo/client"]["ip"] in cluster.exec(
        "demo/client", "ip", "-4", "addr", "show", "eth0"
    )


def test_cross_node_pod_to_pod_and_the_server_sees_the_client_ip(cluster: Cluster) -> None:
    pods = cluster.status()["pods"]
    web_ip, client_ip = pods["demo/web"]["ip"], pods["demo/client"]["ip"]
    assert cluster.curl("demo/client", f"http://{web_ip}:8080/") == f"200 {web_ip}"
    log = cluster.meshway("logs", "web", "-n", "demo").stdout
    assert f"{client_ip} - - " in log and '"GET / HTTP/1.1" 200' in log


def test_service_vip_and_names(cluster: Cluster) -> None:
    vip = json.loads(cluster.meshway("get", "svc", "web", "-n", "demo", "-o", "json").stdout)[
        "spec"
    ]["clusterIP"]
    assert cluster.curl("demo/client", f"http://{vip}/") == f"200 {vip}"
    # A program resolving names as it starts sees them too (the hosts file exists before it).
    assert f"{vip}" in cluster.meshway("logs", "demo/resolver").stdout
    for name in ("web", "web.demo", "web.demo.svc.cluster.local"):
        assert cluster.curl("demo/client", f"http://{name}/") == f"200 {vip}", name
    echoed = cluster.exec(
        "demo/client", "python3", "-c",
        "import socket; s = socket.create_connection(('echo', 9000), timeout=5); "
        "s.sendall(b'hello mesh\\n'); print(s.recv(100).decode().strip())",
    )  # fmt: skip
    assert echoed.strip() == "hello mesh"


def test_pods_follow_applies_and_deletes(cluster: Cluster) -> None:
    doc = (
        "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
        "metadata: {name: web-2, namespace: demo, labels: {app: web}}\n"
        "spec: {nodeName: node-1, command: [python3, -m, http.server, '8080'],"
        " ports: [{name: http, containerPort: 8080}]}\n"
    )
    path = cluster.state / "web-2.yaml"
    path.write_text(doc)
    cluster.meshway("apply", "-f", str(path))
    state = cluster.wait(lambda s: s["pods"].get("demo/web-2", {}).get("phase") == "Running")
    ip = state["pods"]["demo/web-2"]["ip"]
    assert cluster.curl("demo/client", f"http://{ip}:8080/").startswith("200")

    # The VIP now spreads over both endpoints (round robin): 4 requests reach both servers.
    def served_by_web_2() -> int:
        return cluster.meshway("logs", "demo/web-2").stdout.count("GET / HTTP/1.1")

    before = served_by_web_2()
    for _ in range(4):
        assert cluster.curl("demo/client", "http://web/").startswith("200")
    assert served_by_web_2() - before == 2

    cluster.meshway("delete", "-f", str(path))
    cluster.wait(lambda s: "demo/web-2" not in s["pods"])
    assert not host.netns_exists(ClusterNames(cluster.name).pod_ns("demo", "web-2"))


def test_a_crashing_workload_is_restarted(cluster: Cluster) -> None:
    path = cluster.state / "crash.yaml"
    path.write_text(
        "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
        "metadata: {name: crash, namespace: demo}\n"
        "spec: {nodeName: node-1, command: [sh, -c, 'echo started; exit 3']}\n"
    )
    cluster.meshway("apply", "-f", str(path))
    state = cluster.wait(lambda s: s["pods"].get("demo/crash", {}).get("restarts", 0) >= 2)
    assert state["pods"]["demo/crash"]["last_exit"] == 3
    assert cluster.meshway("logs", "demo/crash").stdout.count("started") >= 2
    cluster.meshway("delete", "-f", str(path))
    cluster.wait(lambda s: "demo/crash" not in s["pods"])


def test_cli_errors(cluster: Cluster) -> None:
    missing = cluster.meshway("exec", "demo/nope", "--", "true", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    again = cluster.meshway(
        "cluster",
        "up",
        "-f",
        str(cluster.state / "cluster.yaml"),
        "--name",
        cluster.name,
        check=False,
    )
    assert again.returncode == 1 and "already up" in again.stderr


def test_down_leaves_nothing_behind(cluster: Cluster) -> None:
    pids = [p["pid"] for p in cluster.status()["pods"].values() if p["pid"]]
    settings = json.loads((cluster.state / "clusters" / cluster.name / "cluster.json").read_text())
    cluster.meshway("cluster", "down", "--name", cluster.name)
    names = ClusterNames(cluster.name)
    assert names.all_namespaces() == []
    etc = host.NETNS_ETC
    assert not etc.exists() or not [p for p in etc.iterdir() if p.name.startswith(names.cluster_ns)]
    # The cluster's rate limit store (a redis-server, when installed) goes with it too.
    assert settings["ratelimit_store_pid"] > 0 or shutil.which("redis-server") is None
    for pid in [
        *pids,
        settings["agent_pid"],
        settings["controlplane_pid"],
        settings["ratelimit_store_pid"],
    ]:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
        )
    assert not (cluster.state / "clusters" / cluster.name).exists()
    assert not (cluster.state / "context.json").exists()
    # Down twice is fine (nothing to do).
    assert cluster.meshway("cluster", "down", "--name", cluster.name).returncode == 0


def test_up_with_a_taken_port_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    import socket

    from meshway.controlplane.launcher import free_port

    from .meshcluster import Cluster

    cluster = Cluster("tclash", tmp_path)
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(MANIFEST)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cluster.meshway(
            "cluster", "up", "-f", str(manifest), "--name", "tclash",
            "--admin-port", str(port), "--grpc-port", str(free_port()), check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert (
        "control plane did not start" in result.stderr and "address already in use" in result.stderr
    )
    assert not (tmp_path / "clusters" / "tclash").exists()
    assert ClusterNames("tclash").all_namespaces() == []
