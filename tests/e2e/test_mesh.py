"""The L4 secure overlay, end to end: unmodified programs in pods, node proxies capturing them.

One cluster for the module (two nodes); node proxies ask for 10-second certificates, so
certificates rotate every few seconds under every test here. Each test removes the policies
it applied. All traffic stays inside the namespaces the cluster creates.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from .meshcluster import ECHO_SERVER, Cluster, running_cluster

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]


ECHO_COMMAND = "\n    - python3\n    - -c\n    - |\n" + textwrap.indent(ECHO_SERVER, "      ")

MANIFEST = f"""\
apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: plain}}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {{name: node-1}}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {{name: node-2}}
---
apiVersion: v1
kind: List
items:
- {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: web, namespace: demo}}}}
- {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: echo, namespace: demo}}}}
- {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: client, namespace: demo}}}}
- {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: other, namespace: demo}}}}
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {{name: web, namespace: demo, labels: {{app: web}}}}
spec:
  serviceAccountName: web
  nodeName: node-2
  command: [python3, -u, -m, http.server, "8080"]
  ports: [{{name: http, containerPort: 8080}}]
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {{name: echo, namespace: demo, labels: {{app: echo}}}}
spec:
  serviceAccountName: echo
  nodeName: node-2
  command: {ECHO_COMMAND}
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {{name: client, namespace: demo, labels: {{app: client}}}}
spec: {{serviceAccountName: client, nodeName: node-1, command: [sleep, infinity]}}
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {{name: other, namespace: demo, labels: {{app: other}}}}
spec:
  serviceAccountName: other
  nodeName: node-1
  command: [python3, -u, -m, http.server, "8080"]
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {{name: outsider, namespace: plain, labels: {{app: outsider}}}}
spec: {{nodeName: node-1, command: [python3, -u, -m, http.server, "8080"]}}
---
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {{name: plainserver, namespace: plain, labels: {{app: plainserver}}}}
spec:
  nodeName: node-2
  command: {ECHO_COMMAND}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  selector: {{app: echo}}
  ports: [{{port: 9000}}]
"""

CLIENT = "spiffe://cluster.local/ns/demo/sa/client"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("mesh")
    with running_cluster(state, MANIFEST, "--cert-lifetime-seconds", "10") as cluster:
        # Every enrolled pod captured before the tests start.
        cluster.eventually(lambda: "capturing pod demo/web" in cluster.node_log("node-2"))
        cluster.eventually(lambda: "capturing pod demo/client" in cluster.node_log("node-1"))
        yield cluster


def echo(cluster: Cluster, pod: str, target: str, payload: str) -> str:
    """Send one line to an echo server from inside `pod`; what came back, or the error."""
    script = (
        "import socket, sys\n"
        f"s = socket.create_connection(({target!r}, 9000), timeout=5)\n"
        f"s.sendall({payload!r}.encode() + b'\\n')\n"
        "data = b''\n"
        "while not data.endswith(b'\\n'):\n"
        "    chunk = s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "print(data.decode().strip() or 'EMPTY')\n"
    )
    proc = cluster.meshway("exec", pod, "--", "python3", "-c", script, check=False)
    return proc.stdout.strip() or f"ERROR {proc.stderr.strip()[-200:]}"


def status(cluster: Cluster, pod: str, url: str) -> str:
    """The HTTP status curl saw from inside `pod` ("000": no HTTP answer at all)."""
    answer = cluster.curl(pod, url).split()
    return answer[0] if answer else "000"


def policy(name: str, action: str, app: str, source: str) -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: demo}}\n"
        f"spec:\n  action: {action}\n  selector: {{matchLabels: {{app: {app}}}}}\n"
        f"  rules:\n  - from:\n    - source: {source}\n"
    )


def test_mesh_call_is_hbone_and_the_server_sees_the_client(mesh: Cluster) -> None:
    pods = mesh.status()["pods"]
    client_ip = pods["demo/client"]["ip"]
    assert mesh.curl("demo/client", "http://web/").startswith("200")
    assert f"{client_ip} - - " in mesh.meshway("logs", "demo/web").stdout
    inbound = [c for c in mesh.connection_logs("node-2") if c["direction"] == "inbound"]
    assert inbound and inbound[-1]["source_identity"] == CLIENT
    assert inbound[-1]["source"].startswith(f"{client_ip}:")
    outbound = [c for c in mesh.connection_logs("node-1") if c["direction"] == "outbound"]
    assert outbound[-1]["destination_identity"] == "spiffe://cluster.local/ns/demo/sa/web"
    assert echo(mesh, "demo/client", "echo", "hello") == "hello"


def test_what_crosses_the_nodes_is_tls_only(mesh: Cluster) -> None:
    capture = mesh.state / "link.pcap"
    # On every port of the cluster's bridge: the link between the nodes.
    # --immediate-mode: without it packets wait in the kernel ring up to a second, and the
    # ones still there when tcpdump is stopped are lost.
    tcpdump = ["tcpdump", "-i", "any", "--immediate-mode", "-U", "-n", "-w", str(capture), "tcp"]
    dump = subprocess.Popen(
        ["ip", "netns", "exec", f"mw.{mesh.name}", *tcpdump],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert dump.stderr is not None
        assert "listening on" in "".join(dump.stderr.readline() for _ in range(2))
        time.sleep(1.0)  # tcpdump says "listening" a moment before it captures
        secret = "MESHWAY-SECRET-" + "x" * 20
        control = "PLAINTEXT-CONTROL-" + "y" * 20
        assert echo(mesh, "demo/client", "echo", secret) == secret  # mesh to mesh, cross-node
        plain_ip = mesh.status()["pods"]["plain/plainserver"]["ip"]
        assert echo(mesh, "plain/outsider", plain_ip, control) == control  # outside the mesh
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(10)
    data = capture.read_bytes()
    assert control.encode() in data, "the capture must see plaintext that is not in the mesh"
    assert secret.encode() not in data, "mesh traffic crossed the link in plaintext"
    assert struct.pack("!H", 15008) in data  # HBONE's port is in the TCP headers


def test_allow_policy_by_principal(mesh: Cluster) -> None:
    allow = policy(
        "web-allow-client", "ALLOW", "web", f"{{principals: [{CLIENT.removeprefix('spiffe://')}]}}"
    )
    mesh.apply(allow)
    try:
        mesh.eventually(lambda: status(mesh, "demo/other", "http://web/") == "000")
        assert status(mesh, "demo/client", "http://web/") == "200"
        web_ip = mesh.status()["pods"]["demo/web"]["ip"]
        # Plaintext from outside the mesh has no identity: not allowed either.
        assert status(mesh, "plain/outsider", f"http://{web_ip}:8080/") == "000"
        decisions = [c["decision"] for c in mesh.connection_logs("node-2")]
        assert any(d.startswith("deny") and "no ALLOW policy matched" in d for d in decisions)
    finally:
        mesh.delete(allow)
    mesh.eventually(lambda: status(mesh, "demo/other", "http://web/") == "200")


def test_deny_policy_is_evaluated_first(mesh: Cluster) -> None:
    deny = policy(
        "web-deny-client", "DENY", "web", f"{{principals: [{CLIENT.removeprefix('spiffe://')}]}}"
    )
    allow_all = policy("web-allow-all", "ALLOW", "web", "{namespaces: [demo]}")
    mesh.apply(deny + "---\n" + allow_all)
    try:
        mesh.eventually(lambda: status(mesh, "demo/client", "http://web/") == "000")
        assert status(mesh, "demo/other", "http://web/") == "200"
    finally:
        mesh.delete(deny + "---\n" + allow_all)
    mesh.eventually(lambda: status(mesh, "demo/client", "http://web/") == "200")


def test_strict_refuses_plaintext_and_permissive_accepts_it(mesh: Cluster) -> None:
    web_ip = mesh.status()["pods"]["demo/web"]["ip"]
    assert status(mesh, "plain/outsider", f"http://{web_ip}:8080/") == "200"  # PERMISSIVE default
    strict = (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n"
    )
    mesh.apply(strict)
    try:
        mesh.eventually(lambda: status(mesh, "plain/outsider", f"http://{web_ip}:8080/") == "000")
        assert status(mesh, "demo/client", "http://web/") == "200"  # mTLS still fine
    finally:
        mesh.delete(strict)
    mesh.eventually(lambda: status(mesh, "plain/outsider", f"http://{web_ip}:8080/") == "200")


def test_enroll_and_unenroll_a_namespace_at_runtime(mesh: Cluster) -> None:
    outsider = "spiffe://cluster.local/ns/plain/sa/default"

    def last_inbound_identity() -> str | None:
        found = [c for c in mesh.connection_logs("node-2") if c["direction"].startswith("inbound")]
        return found[-1]["source_identity"] if found else None

    ambient = (
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: plain, labels: {istio.io/dataplane-mode: ambient}}\n"
    )
    mesh.apply(ambient)
    try:

        def enrolled() -> bool:
            return (
                status(mesh, "plain/outsider", "http://web.demo/") == "200"
                and last_inbound_identity() == outsider
            )

        mesh.eventually(enrolled)
    finally:
        mesh.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n")

    def released() -> bool:
        web_ip = mesh.status()["pods"]["demo/web"]["ip"]
        return (
            status(mesh, "plain/outsider", f"http://{web_ip}:8080/") == "200"
            and last_inbound_identity() is None
        )

    mesh.eventually(released)


def test_a_policy_change_closes_an_open_connection(mesh: Cluster) -> None:
    script = (
        "import socket, time, sys\n"
        "s = socket.create_connection(('echo', 9000), timeout=30)\n"
        "for i in range(300):\n"
        "    try:\n"
        "        s.sendall(b'ping\\n'); data = s.recv(100)\n"
        "    except OSError as e:\n"
        "        data = b''\n"
        "    if not data:\n"
        "        print('closed', time.time(), flush=True); sys.exit(0)\n"
        "    print('ok', i, flush=True); time.sleep(0.1)\n"
        "print('still open', flush=True)\n"
    )
    proc = subprocess.Popen(
        [*mesh_cli(mesh), "exec", "demo/client", "--", "python3", "-u", "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env=mesh.env,
    )
    deny = policy(
        "echo-deny-client", "DENY", "echo", f"{{principals: [{CLIENT.removeprefix('spiffe://')}]}}"
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ok")
        applied = time.time()
        mesh.apply(deny)
        out, _ = proc.communicate(timeout=30)
        closed = [line for line in out.splitlines() if line.startswith("closed")]
        assert closed, out[-300:]
        assert float(closed[0].split()[1]) - applied < 5.0  # a second in practice; bound loosely
        assert "policy_changed" in mesh.in_node("node-2", "curl", "-s", "127.0.0.1:15020/metrics")
    finally:
        proc.kill()
        mesh.delete(deny)


def mesh_cli(mesh: Cluster) -> list[str]:
    return [sys.executable, "-m", "meshway"]


def test_certificate_rotation_keeps_a_long_transfer_alive(mesh: Cluster) -> None:
    script = (
        "import socket, time, hashlib\n"
        "s = socket.create_connection(('echo', 9000), timeout=30)\n"
        "block = bytes(range(256)) * 512\n"
        "sent = got = 0; deadline = time.time() + 12\n"
        "while time.time() < deadline:\n"
        "    s.sendall(block); sent += len(block)\n"
        "    while got < sent:\n"
        "        chunk = s.recv(1 << 20)\n"
        "        assert chunk, 'connection closed'\n"
        "        got += len(chunk)\n"
        "    time.sleep(0.05)\n"
        "print('transferred', sent, got)\n"
    )
    before = mesh.node_log("node-1").count("certificate for " + CLIENT)
    out = mesh.meshway("exec", "demo/client", "--", "python3", "-c", script, timeout=60).stdout
    sent, got = (int(x) for x in out.split()[1:3])
    assert sent == got > 1_000_000
    # The client's certificate (10 s, renewed at half-life) was replaced during the transfer.
    assert mesh.node_log("node-1").count("certificate for " + CLIENT) - before >= 2


def test_malformed_input_hurts_only_its_own_connection(mesh: Cluster) -> None:
    web_ip = mesh.status()["pods"]["demo/web"]["ip"]
    garbage = (
        "import socket\n"
        "payloads = (b'GET / HTTP/1.1\\r\\n\\r\\n', b'\\x16\\x03\\x01' + b'\\xff' * 5000,\n"
        "            bytes(range(256)) * 40)\n"
        "for payload in payloads:\n"
        f"    s = socket.create_connection(({web_ip!r}, 15008), timeout=5)\n"
        "    s.sendall(payload)\n"
        "    try:\n"
        "        s.recv(100)\n"
        "    except OSError:\n"
        "        pass\n"
        "    s.close()\n"
        "print('sent')\n"
    )
    assert "sent" in mesh.meshway("exec", "plain/outsider", "--", "python3", "-c", garbage).stdout
    assert status(mesh, "demo/client", "http://web/") == "200"
    metrics = mesh.in_node("node-2", "curl", "-s", "127.0.0.1:15020/metrics")
    counts = re.findall(
        r'meshway_node_hbone_rejected_connections\{reason="([a-z_0-9]+)"\} ([0-9.]+)', metrics
    )
    assert sum(float(n) for _, n in counts) >= 3, metrics[-1000:]


def test_tcp_metrics_and_admin(mesh: Cluster) -> None:
    assert status(mesh, "demo/client", "http://web/") == "200"
    dst = mesh.in_node("node-2", "curl", "-s", "127.0.0.1:15020/metrics")
    src = mesh.in_node("node-1", "curl", "-s", "127.0.0.1:15020/metrics")
    line = re.compile(r"istio_tcp_connections_opened_total\{(.*)\} ([0-9.]+)")
    dst_labels = [m.group(1) for m in line.finditer(dst)]
    assert any(
        'reporter="destination"' in labels
        and f'source_principal="{CLIENT}"' in labels
        and 'connection_security_policy="mutual_tls"' in labels
        and 'destination_workload="web"' in labels
        for labels in dst_labels
    ), dst_labels
    assert any('reporter="source"' in m.group(1) for m in line.finditer(src))
    for name in (
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_connections_closed_total",
        "process_resident_memory_bytes",
    ):
        assert name in dst
    assert mesh.in_node("node-2", "curl", "-s", "127.0.0.1:15021/healthz/ready").strip() == "ready"
    dump = mesh.in_node("node-2", "curl", "-s", "127.0.0.1:15000/config_dump")
    assert '"demo/web"' in dump and "notAfter" in dump
    # The admin port is local only: not reachable on the node's address.
    node_ip = mesh.status()["nodes"]["node-2"]["ip"]
    remote = mesh.in_node(
        "node-1", "curl", "-s", "--max-time", "3", f"http://{node_ip}:15000/config_dump"
    )
    assert remote == ""


def test_node_proxy_restart_fails_closed_and_recovers(mesh: Cluster) -> None:
    pods = mesh.status()["pods"]
    outsider_ip, other_ip = pods["plain/outsider"]["ip"], pods["demo/other"]["ip"]
    assert status(mesh, "demo/client", f"http://{outsider_ip}:8080/") == "200"
    assert status(mesh, "plain/outsider", f"http://{other_ip}:8080/") == "200"
    proxy = mesh.status()["nodeProxies"]["node-1"]
    os.kill(proxy["pid"], signal.SIGKILL)
    time.sleep(0.3)
    # While it is down the captured pods cannot send or receive plaintext around it.
    assert status(mesh, "demo/client", f"http://{outsider_ip}:8080/") == "000"
    assert status(mesh, "demo/client", "http://web/") == "000"
    assert status(mesh, "plain/outsider", f"http://{other_ip}:8080/") == "000"
    mesh.eventually(lambda: mesh.status()["nodeProxies"]["node-1"]["restarts"] >= 1, seconds=20)
    mesh.eventually(lambda: status(mesh, "demo/client", "http://web/") == "200", seconds=30)
    assert status(mesh, "demo/client", f"http://{outsider_ip}:8080/") == "200"
    assert status(mesh, "plain/outsider", f"http://{other_ip}:8080/") == "200"


def test_sidecar_mode_for_one_pod(mesh: Cluster) -> None:
    """A pod labelled meshway.io/proxy: sidecar gets its own proxy; the node proxy lets go."""
    doc = (
        "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
        "metadata: {name: hybrid, namespace: demo,\n"
        "  labels: {app: hybrid, meshway.io/proxy: sidecar}}\n"
        "spec: {serviceAccountName: client, nodeName: node-1, command: [sleep, infinity]}\n"
    )
    mesh.apply(doc)
    try:
        log = mesh.directory / "logs" / "sidecar.demo.hybrid.log"
        mesh.eventually(
            lambda: log.exists() and "capturing pod demo/hybrid" in log.read_text(), seconds=30
        )
        assert "capturing pod demo/hybrid" not in mesh.node_log("node-1")
        mesh.eventually(lambda: status(mesh, "demo/hybrid", "http://web/") == "200")
        outbound = [
            json.loads(line.split("meshway.connections: ", 1)[1])
            for line in log.read_text().splitlines()
            if "meshway.connections: " in line
        ]
        assert (
            outbound
            and outbound[-1]["destination_identity"] == "spiffe://cluster.local/ns/demo/sa/web"
        )
        assert "hybrid" not in json.dumps(mesh.status().get("nodeProxies", {}))
        # A node proxy that restarts finds the pod captured, by its sidecar: not a leftover.
        captures = mesh.node_log("node-1").count("capturing pod demo/client")
        old = mesh.eventually(lambda: mesh.status()["nodeProxies"]["node-1"].get("pid"))
        os.kill(old, signal.SIGTERM)
        mesh.eventually(
            lambda: mesh.node_log("node-1").count("capturing pod demo/client") > captures,
            seconds=30,
        )
        assert "released pod demo/hybrid" not in mesh.node_log("node-1")
        calls = len(log.read_text().splitlines())
        assert status(mesh, "demo/hybrid", "http://web/") == "200"
        assert len(log.read_text().splitlines()) > calls  # still through its sidecar
    finally:
        mesh.delete(doc)
    mesh.eventually(lambda: "demo/hybrid" not in mesh.status().get("sidecars", {}))
