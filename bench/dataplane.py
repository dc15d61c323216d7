"""Data-path benchmark: Meshway's node proxies and waypoint against HAProxy sidecars and no mesh.

One local cluster (two nodes) holds every scenario side by side, each a client pod on node-1
and a server pod on node-2 running nginx (a 500-byte answer) and an iperf3 server:

- no-mesh: plain pods, direct;
- ambient: pods in an ambient namespace, through the two node proxies (HBONE, mTLS);
- sidecar: the same proxy code as a per-pod sidecar at both ends (`meshway.io/proxy: sidecar`);
- haproxy: HAProxy 2.6 as an mTLS TCP sidecar in each pod, one thread each (TLS 1.3, mutual
  verification), the classic sidecar mesh built from a fast C proxy;
- waypoint: an ambient namespace that uses a waypoint (`istio.io/use-waypoint`); the client
  calls the server's Service, whose `appProtocol: http` port goes node proxy → waypoint (HTTP
  parsed, routed, counted) → node proxy. The iperf3 port has no appProtocol: it crosses the
  waypoint as TCP;
- haproxy-http: the "haproxy" sidecars in `mode http` at both ends (HTTP parsed at both hops,
  idle server connections reused per HAProxy's default `http-reuse safe`), the L7 peer of the
  waypoint path; its iperf3 port stays `mode tcp`, like the waypoint's.

Workloads are interleaved round by round so that machine noise hits every scenario alike:
wrk closed loop at 1 and 50 connections (requests/s, p50, p99), wrk with a new connection per
request (connections/s), a fixed 1000 requests/s over 4 connections with an open-loop generator
(bench/openloop.py: p50/p90/p99, the proxies' vCPU, and their RSS right after), and iperf3 over
one connection (Gbit/s). CPU seconds per 1000 requests of each scenario's proxies come from
/proc during the 50-connection run. The waypoint scenario's proxies are the two node proxies
and the waypoint process; the waypoint's own CPU and RSS are reported apart too.

Every run is bounded (`--seconds`, and a deadline on each command); a scenario that fails
(no answer, errors, a proxy that exits) stops the benchmark with a message that names it, and
the cluster is torn down whatever happens. Results go to bench/results/dataplane.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshway.identity import CertificateAuthority, SpiffeId, build_csr, generate_key, key_to_pem  # noqa: E402
from tests.e2e.meshcluster import Cluster, running_cluster  # noqa: E402

SCENARIOS = ("no-mesh", "ambient", "sidecar", "haproxy", "waypoint", "haproxy-http")
LABELS = {
    "no-mesh": "no mesh",
    "ambient": "Meshway ambient",
    "sidecar": "Meshway sidecars",
    "haproxy": "HAProxy sidecars",
    "waypoint": "Meshway waypoint",
    "haproxy-http": "HAProxy http sidecars",
}
AMBIENT_NAMESPACES = ("ambient", "sidecar", "waypoint")
HAPROXY_MODES = {"haproxy": "tcp", "haproxy-http": "http"}
BODY = "x" * 499 + "\n"
# Meshway in sidecar mode: the same proxy code, one process per pod (meshway.io/proxy: sidecar).
SIDECAR_LABEL = {ns: (", meshway.io/proxy: sidecar" if ns == "sidecar" else "") for ns in SCENARIOS}
HTTP_PORT, IPERF_PORT = 8080, 5201
HAP_HTTP, HAP_IPERF = 10000, 10001  # client sidecar listeners (in the client pod)
HAP_TLS_HTTP, HAP_TLS_IPERF = 15443, 15444  # server sidecar listeners
# The waypoint scenario's Service: waypoints serve Services, so the client calls this name.
SERVICE_HOST, SERVICE_HTTP_PORT = "server.waypoint.svc.cluster.local", 80
WAYPOINT_POD = "waypoint/waypoint"
WAYPOINT_METRICS = "http://127.0.0.1:15020/metrics"
WAYPOINT_OBJECTS = f"""\
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: waypoint}}
spec:
  selector: {{app: server}}
  ports:
  - {{name: http, port: {SERVICE_HTTP_PORT}, targetPort: {HTTP_PORT}, appProtocol: http}}
  - {{name: iperf, port: {IPERF_PORT}, targetPort: {IPERF_PORT}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: waypoint, labels: {{istio.io/waypoint-for: service}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"""
# Above this share of failed requests a run is not a measurement but a broken scenario.
MAX_ERROR_SHARE = 0.01


class BenchError(Exception):
    """A scenario did not work: the benchmark stops rather than report meaningless figures."""


def nginx_conf(work: Path, name: str) -> Path:
    conf = work / f"nginx-{name}.conf"
    conf.write_text(
        f"""worker_processes 1;
pid {work}/nginx-{name}.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-{name}-body;
  keepalive_requests 1000000;
  server {{
    listen {HTTP_PORT} reuseport;
    location / {{ default_type text/plain; return 200 "{BODY.strip()}\\n"; }}
  }}
}}
"""
    )
    return conf


def haproxy_certs(work: Path) -> None:
    """mTLS both ways with certificates from a throwaway CA."""
    ca = CertificateAuthority.load_or_create(work / "hap-ca", "cluster.local")
    (work / "hap-ca.pem").write_bytes(ca.trust_bundle.to_pem())
    for who in ("client", "server"):
        key = generate_key()
        identity = SpiffeId("cluster.local", "haproxy", who)
        issued = ca.sign_csr(build_csr(key, identity), identity, timedelta(hours=2))
        pem = "".join(issued.cert_chain_pem).encode() + key_to_pem(key)
        (work / f"hap-{who}.pem").write_bytes(pem)


HAPROXY_GLOBAL = """global
  nbthread 1
  maxconn 8000
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
"""
HAPROXY_TIMEOUTS = "  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n"
HAPROXY_TCP = "defaults\n  mode tcp\n" + HAPROXY_TIMEOUTS
# HAProxy's own defaults, spelled out: keep-alive on both sides, and an idle connection to the
# server sidecar serves another client connection's request unless it is that connection's
# first (`safe`), so that a request never races the server closing a reused connection.
HAPROXY_HTTP = (
    "defaults\n  mode http\n  option http-keep-alive\n  http-reuse safe\n" + HAPROXY_TIMEOUTS
)


def write_haproxy_conf(path: Path, text: str) -> Path:
    """Write a configuration and have HAProxy check it, so that a mistake fails here, by name,
    and not as a sidecar that never answers."""
    path.write_text(text)
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise BenchError(f"haproxy -c refuses {path.name}:\n{check.stdout}{check.stderr}")
    return path


def haproxy_server_conf(work: Path, ns: str) -> Path:
    """The server sidecar: one thread, TLS 1.3, client certificates required; in `mode http`
    for haproxy-http except the iperf3 port."""
    tls = f"ssl crt {work}/hap-server.pem ca-file {work}/hap-ca.pem verify required"
    iperf = f"listen in{HAP_TLS_IPERF}\n  bind 0.0.0.0:{HAP_TLS_IPERF} {tls}\n"
    iperf += f"  server app 127.0.0.1:{IPERF_PORT}\n"
    if HAPROXY_MODES[ns] == "tcp":
        text = HAPROXY_GLOBAL + HAPROXY_TCP
        text += f"listen in{HAP_TLS_HTTP}\n  bind 0.0.0.0:{HAP_TLS_HTTP} {tls}\n"
        text += f"  server app 127.0.0.1:{HTTP_PORT}\n" + iperf
    else:
        text = HAPROXY_GLOBAL + HAPROXY_TCP + iperf + HAPROXY_HTTP
        text += f"frontend in{HAP_TLS_HTTP}\n  bind 0.0.0.0:{HAP_TLS_HTTP} {tls}\n"
        text += "  default_backend app\n"
        text += f"backend app\n  server app 127.0.0.1:{HTTP_PORT}\n"
    return write_haproxy_conf(work / f"{ns}-server.cfg", text)


def haproxy_client_conf(work: Path, ns: str, server_ip: str) -> Path:
    """The client sidecar: one thread, presents its certificate, verifies the server's; in
    `mode http` for haproxy-http except the iperf3 port."""
    tls = f"ssl crt {work}/hap-client.pem ca-file {work}/hap-ca.pem verify required"
    iperf = f"listen out{HAP_IPERF}\n  bind 127.0.0.1:{HAP_IPERF}\n"
    iperf += f"  server s {server_ip}:{HAP_TLS_IPERF} {tls}\n"
    if HAPROXY_MODES[ns] == "tcp":
        text = HAPROXY_GLOBAL + HAPROXY_TCP
        text += f"listen out{HAP_HTTP}\n  bind 127.0.0.1:{HAP_HTTP}\n"
        text += f"  server s {server_ip}:{HAP_TLS_HTTP} {tls}\n" + iperf
    else:
        text = HAPROXY_GLOBAL + HAPROXY_TCP + iperf + HAPROXY_HTTP
        text += f"frontend out{HAP_HTTP}\n  bind 127.0.0.1:{HAP_HTTP}\n"
        text += "  default_backend server\n"
        text += f"backend server\n  server s {server_ip}:{HAP_TLS_HTTP} {tls}\n"
    return write_haproxy_conf(work / f"{ns}-client.cfg", text)


def client_workload(ns: str, command: str) -> str:
    return (
        "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
        f"metadata: {{name: client, namespace: {ns}, labels: {{app: client{SIDECAR_LABEL[ns]}}}}}\n"
        f"spec:\n  nodeName: node-1\n  command: [sh, -c, {json.dumps(command)}]"
    )


def namespace_doc(ns: str) -> str:
    labels = []
    if ns in AMBIENT_NAMESPACES:
        labels.append("istio.io/dataplane-mode: ambient")
    if ns == "waypoint":
        labels.append("istio.io/use-waypoint: waypoint")
    meta = f"{{name: {ns}, labels: {{{', '.join(labels)}}}}}" if labels else f"{{name: {ns}}}"
    return f"apiVersion: v1\nkind: Namespace\nmetadata: {meta}"


def manifest(work: Path) -> str:
    """Every scenario's namespace, server and client, except what needs the cluster running:
    the HAProxy clients (they need their server's IP) and the waypoint (applied afterwards, so
    that a waypoint that does not start is reported by name rather than failing `cluster up`)."""
    docs = [namespace_doc(ns) for ns in SCENARIOS]
    docs += [
        "apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {name: node-1}",
        "apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {name: node-2}",
    ]
    for ns in SCENARIOS:
        conf = nginx_conf(work, ns)
        server_cmd = f"nginx -c {conf} -g 'daemon off;' & iperf3 -s -p {IPERF_PORT} & "
        server_cmd += f"exec haproxy -f {work}/{ns}-server.cfg" if ns in HAPROXY_MODES else "wait"
        docs.append(
            "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
            f"metadata: {{name: server, namespace: {ns}, "
            f"labels: {{app: server{SIDECAR_LABEL[ns]}}}}}\n"
            f"spec:\n  nodeName: node-2\n  command: [sh, -c, {json.dumps(server_cmd)}]"
        )
        if ns not in HAPROXY_MODES:
            docs.append(client_workload(ns, "exec sleep infinity"))
    return "\n---\n".join(docs) + "\n"


def netns_of(cluster: Cluster, ns: str, name: str) -> str:
    return f"mw.{cluster.name}.pod.{ns}.{name}"


def in_pod(cluster: Cluster, ns: str, name: str, *cmd: str, timeout: float) -> str:
    """stdout and stderr of `cmd` run in pod `ns/name`; a command over its deadline is killed
    and reported as the scenario's failure."""
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", netns_of(cluster, ns, name), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"scenario {ns}: `{' '.join(cmd)}` in pod {ns}/{name} did not finish in {timeout:.0f} s"
        ) from None
    return proc.stdout + proc.stderr


def http_code(cluster: Cluster, ns: str, url: str) -> str:
    return in_pod(
        cluster, ns, "client", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
        "--max-time", "5", url, timeout=10,
    ).strip()  # fmt: skip


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def parse_wrk(out: str) -> dict[str, float]:
    """requests/s, p50/p99, and the failures wrk counts: responses other than 2xx/3xx and
    socket errors (connect, read, write, timeout)."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    result = {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": float(total.group(1)) if total else 0.0,
    }
    for p, text in re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M):
        m = re.match(r"([\d.]+)(us|ms|s)", text)
        if m:
            result[f"p{p}_ms"] = round(_ms(m.group(1), m.group(2)), 3)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = float(non_2xx.group(1)) if non_2xx else 0.0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    counts = errors.groups() if errors else ("0", "0", "0", "0")
    for kind, count in zip(("connect", "read", "write", "timeout"), counts, strict=True):
        result[f"errors_{kind}"] = float(count)
    return result


def checked_wrk(ns: str, what: str, out: str) -> dict[str, float]:
    """wrk's figures, or BenchError when the run measured failures instead of a data path."""
    result = parse_wrk(out)
    if not result["requests"] or "Requests/sec" not in out:
        raise BenchError(f"scenario {ns}: wrk {what} got no answer:\n{out[-1500:]}")
    kinds = ("non_2xx", "errors_connect", "errors_read", "errors_write", "errors_timeout")
    failed = sum(result[k] for k in kinds)
    if failed > MAX_ERROR_SHARE * result["requests"]:
        raise BenchError(
            f"scenario {ns}: wrk {what}: {failed:.0f} of {result['requests']:.0f} requests "
            f"failed:\n{out[-1500:]}"
        )
    return result


@dataclass(frozen=True)
class ProxyProcess:
    """A proxy whose CPU and memory a scenario is charged for, pinned to one process start so
    that a proxy that exits (or restarts under the same pid) fails the run instead of
    skewing it."""

    scenario: str
    role: str  # "node", "sidecar", "haproxy" or "waypoint"
    pid: int
    started: int  # the process's start time, in clock ticks since boot

    @classmethod
    def of(cls, scenario: str, role: str, pid: int | None) -> ProxyProcess:
        try:
            if pid is None:
                raise FileNotFoundError
            return cls(scenario, role, pid, int(_stat_fields(pid)[19]))
        except OSError:
            raise BenchError(f"scenario {scenario}: the {role} proxy is not running") from None

    def _fields(self) -> list[str]:
        try:
            fields = _stat_fields(self.pid)
        except OSError:
            fields = []
        if not fields or int(fields[19]) != self.started:
            raise BenchError(
                f"scenario {self.scenario}: the {self.role} proxy (pid {self.pid}) exited "
                "during the run"
            )
        return fields

    def cpu_seconds(self) -> float:
        fields = self._fields()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def rss_mb(self) -> float:
        self._fields()
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise BenchError(f"scenario {self.scenario}: no VmRSS for the {self.role} proxy")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: field 3 (state) is index 0."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def netns_pids(netns: str, matches: Callable[[int], bool]) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10
    ).stdout
    found = []
    for pid in map(int, out.split()):
        try:
            if matches(pid):
                found.append(pid)
        except OSError:  # gone since it was listed
            continue
    return found


def waypoint_pid(cluster: Cluster, state: dict[str, Any]) -> int:
    """The waypoint's process: the pod's own process, or one inside the pod's network
    namespace, whose command line runs `meshway.waypoint` (the runtime may start it in the pod
    or beside it, making its sockets in the pod)."""
    pod = state["pods"].get(WAYPOINT_POD) or {}
    candidates = set(netns_pids(netns_of(cluster, "waypoint", "waypoint"), lambda _: True))
    if pod.get("pid"):
        candidates.add(pod["pid"])
    found = []
    for pid in candidates:
        try:
            if b"meshway.waypoint" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    if len(found) != 1:
        raise BenchError(
            f"scenario waypoint: expected one `meshway.waypoint` process for pod {WAYPOINT_POD}, "
            f"found {len(found)} (pod: {json.dumps(pod)})"
        )
    return found[0]


def proxy_processes(cluster: Cluster, state: dict[str, Any], ns: str) -> list[ProxyProcess]:
    """The proxies on scenario `ns`'s path: none without a mesh, the two node proxies (plus the
    waypoint), or the two pods' sidecars (Meshway's or HAProxy)."""
    procs: list[ProxyProcess] = []
    if ns in ("ambient", "waypoint"):
        procs = [ProxyProcess.of(ns, "node", p["pid"]) for p in state["nodeProxies"].values()]
        if ns == "waypoint":
            procs.append(ProxyProcess.of(ns, "waypoint", waypoint_pid(cluster, state)))
    elif ns == "sidecar":
        sidecars = state["sidecars"].items()
        procs = [
            ProxyProcess.of(ns, "sidecar", p["pid"])
            for k, p in sidecars
            if k.startswith("sidecar/")
        ]
    elif ns in HAPROXY_MODES:
        procs = [
            ProxyProcess.of(ns, "haproxy", pid)
            for name in ("client", "server")
            for pid in netns_pids(
                netns_of(cluster, ns, name),
                lambda pid: Path(f"/proc/{pid}/comm").read_text().strip() == "haproxy",
            )
        ]
    expected = {"no-mesh": 0, "waypoint": 3}.get(ns, 2)
    if len(procs) != expected:
        found = ", ".join(f"{p.role} {p.pid}" for p in procs) or "none"
        raise BenchError(f"scenario {ns}: expected {expected} proxy processes, found {found}")
    return procs


def targets(cluster: Cluster) -> dict[str, dict[str, str]]:
    pods = cluster.status()["pods"]
    out = {}
    for ns in SCENARIOS:
        if ns in HAPROXY_MODES:
            out[ns] = {"http": f"http://127.0.0.1:{HAP_HTTP}/", "iperf": f"127.0.0.1:{HAP_IPERF}"}
        elif ns == "waypoint":
            out[ns] = {"http": f"http://{SERVICE_HOST}/", "iperf": f"{SERVICE_HOST}:{IPERF_PORT}"}
        else:
            ip = pods[f"{ns}/server"]["ip"]
            out[ns] = {"http": f"http://{ip}:{HTTP_PORT}/", "iperf": f"{ip}:{IPERF_PORT}"}
    return out


def wait_until(
    what: str, check: Callable[[], bool], seconds: float, explain: Callable[[], str]
) -> None:
    """Poll `check` until it holds; past `seconds`, fail with `what` and `explain()`."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: still not so after {seconds:.0f} s\n{explain()}")
        time.sleep(0.5)


def waypoint_requests(cluster: Cluster) -> float:
    """The requests the waypoint has counted (istio_requests_total over every label set), or
    -1 when its metrics do not answer."""
    out = in_pod(
        cluster, "waypoint", "waypoint", "curl", "-s", "--max-time", "5", WAYPOINT_METRICS,
        timeout=10,
    )  # fmt: skip
    counts = re.findall(r"^istio_requests_total(?:\{[^}]*\})? ([\d.e+]+)$", out, re.M)
    return sum(map(float, counts)) if "istio_requests" in out else -1.0


def waypoint_explanation(cluster: Cluster, last: dict[str, str]) -> str:
    """What an operator needs when the waypoint scenario fails: the pod's phase and the end of
    its log."""
    pod = cluster.status()["pods"].get(WAYPOINT_POD)
    log = cluster.directory / "logs" / "waypoint.waypoint.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log yet)"
    if pod is None:
        where = f"pod {WAYPOINT_POD} does not exist: the control plane did not deploy the Gateway"
    else:
        where = (
            f"pod {WAYPOINT_POD} on {pod.get('node')}: phase {pod.get('phase')}, "
            f"restarts {pod.get('restarts')}, last exit {pod.get('last_exit')}"
        )
    probe = ", ".join(f"{k}: {v}" for k, v in last.items())
    return f"{where}\nlast probe: {probe}\n--- {log.name} (end) ---\n{tail}"


def wait_for_waypoint(cluster: Cluster, url: str) -> None:
    """Until a request to the Service answers 200 *and* the waypoint counted it: a 200 alone
    could come from the direct path, before the node proxy knows about the waypoint."""
    last: dict[str, str] = {}

    def served() -> bool:
        before = waypoint_requests(cluster)
        code = http_code(cluster, "waypoint", url)
        after = waypoint_requests(cluster)
        last.update(
            {"HTTP status": code, "waypoint requests before": f"{before:g}", "after": f"{after:g}"}
        )
        return code == "200" and before >= 0 and after > before

    wait_until(
        f"scenario waypoint: GET {url} through the waypoint",
        served,
        90,
        lambda: waypoint_explanation(cluster, last),
    )


def wait_for_capture(cluster: Cluster, ns: str, node: str, pod: str) -> None:
    wait_until(
        f"scenario {ns}: the node proxy of {node} captures pod {ns}/{pod}",
        lambda: f"capturing pod {ns}/{pod}" in cluster.node_log(node),
        60,
        lambda: cluster.node_log(node)[-2000:],
    )


def wait_for_answer(cluster: Cluster, ns: str, url: str) -> None:
    wait_until(
        f"scenario {ns}: GET {url} answers 200",
        lambda: http_code(cluster, ns, url) == "200",
        60,
        lambda: json.dumps(cluster.status()["pods"].get(f"{ns}/client")),
    )


def apply(cluster: Cluster, ns: str, text: str) -> None:
    try:
        cluster.apply(text)
    except AssertionError as exc:  # how the test harness reports a refused `meshway apply`
        raise BenchError(f"scenario {ns}: the control plane refuses its objects: {exc}") from None


def prepare(cluster: Cluster, work: Path) -> dict[str, dict[str, str]]:
    """Start what needs the running cluster, wait until every scenario answers through the
    path it is meant to take, and return each scenario's targets."""
    pods = cluster.status()["pods"]
    for ns in HAPROXY_MODES:
        conf = haproxy_client_conf(work, ns, pods[f"{ns}/server"]["ip"])
        apply(cluster, ns, client_workload(ns, f"exec haproxy -f {conf}"))
    apply(cluster, "waypoint", WAYPOINT_OBJECTS)
    # Node-proxy captured pods (sidecar pods have their own proxies): nothing may go direct.
    for ns in ("ambient", "waypoint"):
        wait_for_capture(cluster, ns, "node-2", "server")
        wait_for_capture(cluster, ns, "node-1", "client")
    urls = targets(cluster)
    for ns in SCENARIOS:
        if ns != "waypoint":
            wait_for_answer(cluster, ns, urls[ns]["http"])
    wait_for_waypoint(cluster, urls["waypoint"]["http"])
    time.sleep(1.0)
    return urls


def cpu_snapshot(procs: list[ProxyProcess]) -> dict[ProxyProcess, float]:
    return {p: p.cpu_seconds() for p in procs}


def cpu_used(before: dict[ProxyProcess, float]) -> dict[ProxyProcess, float]:
    return {p: p.cpu_seconds() - used for p, used in before.items()}


def wrk(cluster: Cluster, ns: str, url: str, seconds: int, *flags: str) -> str:
    return in_pod(cluster, ns, "client", "wrk", *flags, f"-d{seconds}s", url, timeout=seconds + 30)


def one_round(
    cluster: Cluster, urls: dict[str, dict[str, str]], seconds: int
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {ns: {} for ns in SCENARIOS}
    state = cluster.status()
    procs = {ns: proxy_processes(cluster, state, ns) for ns in SCENARIOS}
    limit = seconds + 30
    for ns in SCENARIOS:
        out = wrk(cluster, ns, urls[ns]["http"], seconds, "-t1", "-c1", "--latency")
        results[ns]["c1"] = checked_wrk(ns, "at 1 connection", out)
    for ns in SCENARIOS:
        before = cpu_snapshot(procs[ns])
        started = time.monotonic()
        out = wrk(cluster, ns, urls[ns]["http"], seconds, "-t2", "-c50", "--latency")
        elapsed = time.monotonic() - started
        used = cpu_used(before)
        c50 = checked_wrk(ns, "at 50 connections", out)
        requests_k = c50["rps"] * elapsed / 1000
        if used:
            c50["proxy_cpu_s_per_1000_req"] = round(sum(used.values()) / requests_k, 4)
        waypoint = [cpu for p, cpu in used.items() if p.role == "waypoint"]
        if waypoint:
            if not waypoint[0]:
                raise BenchError(
                    "scenario waypoint: the waypoint used no CPU during the 50-connection run: "
                    "the traffic did not go through it"
                )
            c50["waypoint_cpu_s_per_1000_req"] = round(waypoint[0] / requests_k, 4)
        results[ns]["c50"] = c50
    for ns in SCENARIOS:
        out = wrk(cluster, ns, urls[ns]["http"], seconds, "-t1", "-c8", "-H", "Connection: close")
        churn = checked_wrk(ns, "with a new connection per request", out)
        results[ns]["churn"] = {"connections_per_s": churn["rps"]}
    for ns in SCENARIOS:
        # Fixed rate, open loop: 1000 requests/s over 4 connections.
        before = cpu_snapshot(procs[ns])
        started = time.monotonic()
        raw = in_pod(
            cluster, ns, "client", "python3", str(ROOT / "bench" / "openloop.py"), urls[ns]["http"],
            "--rps", "1000", "--connections", "4", "--seconds", str(seconds), timeout=limit,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        results[ns]["rate1000"] = rate1000_figures(ns, raw, cpu_used(before), elapsed)
    for ns in SCENARIOS:
        host, port = urls[ns]["iperf"].rsplit(":", 1)
        raw = in_pod(
            cluster, ns, "client", "iperf3", "-c", host, "-p", port, "-t", str(seconds), "-J",
            timeout=limit,
        )  # fmt: skip
        results[ns]["bulk"] = {"gbit_per_s": round(iperf_gbps(ns, raw), 3)}
    return results


def rate1000_figures(
    ns: str, raw: str, used: dict[ProxyProcess, float], elapsed: float
) -> dict[str, float]:
    """openloop.py's latencies, with the vCPU of the proxies over the run and their RSS at its
    end: per process, all together, and the waypoint's own."""
    try:
        rate: dict[str, float] = json.loads(raw.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(
            f"scenario {ns}: the 1000 rps run gave no result:\n{raw[-1500:]}"
        ) from None
    if not rate.get("requests") or rate.get("errors", 0) > MAX_ERROR_SHARE * rate["requests"]:
        raise BenchError(f"scenario {ns}: the 1000 rps run failed: {json.dumps(rate)}")
    if used:
        rss = {p: p.rss_mb() for p in used}
        rate["vcpu_per_proxy"] = round(sum(used.values()) / elapsed / len(used), 4)
        rate["vcpu_all_proxies"] = round(sum(used.values()) / elapsed, 4)
        rate["rss_mb_per_proxy"] = round(statistics.mean(rss.values()), 1)
        for p in used:
            if p.role == "waypoint":
                rate["waypoint_vcpu"] = round(used[p] / elapsed, 4)
                rate["waypoint_rss_mb"] = round(rss[p], 1)
    return rate


def iperf_gbps(ns: str, raw: str) -> float:
    try:
        data = json.loads(raw[raw.index("{") :])
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"scenario {ns}: iperf3 gave no result:\n{raw[-1500:]}") from None


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median over rounds of every figure."""
    summary: dict[str, dict[str, Any]] = {}
    for ns in SCENARIOS:
        summary[ns] = {}
        for workload in rounds[0][ns]:
            keys = [k for k, v in rounds[0][ns][workload].items() if isinstance(v, (int, float))]
            summary[ns][workload] = {
                k: round(statistics.median(r[ns][workload].get(k, 0.0) for r in rounds), 3)
                for k in keys
            }
    return summary


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Meshway against its peer in the same run: ambient against HAProxy TCP sidecars, the
    waypoint path against HAProxy HTTP sidecars (keys `waypoint_*`)."""
    amb, hap, base = summary["ambient"], summary["haproxy"], summary["no-mesh"]
    wp, hh = summary["waypoint"], summary["haproxy-http"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    def added(s: dict[str, Any], workload: str, key: str) -> float:
        return round(s[workload].get(key, 0) - base[workload].get(key, 0), 3)

    added_amb, added_hap = added(amb, "c1", "p50_ms"), added(hap, "c1", "p50_ms")
    rate_amb, rate_base = amb.get("rate1000", {}), base.get("rate1000", {})
    return {
        "added_p90_at_1000rps_ms": {
            "value": round(rate_amb.get("p90_ms", 0) - rate_base.get("p90_ms", 0), 3),
            "target": "<= 0.17",
        },
        "node_proxy_vcpu_at_1000rps": {
            "value": rate_amb.get("vcpu_per_proxy"),
            "target": "<= 0.06",
        },
        "rps_c50_vs_haproxy": {
            "value": ratio(amb["c50"]["rps"], hap["c50"]["rps"]),
            "target": ">= 1.2",
        },
        "bulk_vs_haproxy": {
            "value": ratio(amb["bulk"]["gbit_per_s"], hap["bulk"]["gbit_per_s"]),
            "target": ">= 1.2",
        },
        "connections_per_s_vs_haproxy": {
            "value": ratio(amb["churn"]["connections_per_s"], hap["churn"]["connections_per_s"]),
            "target": ">= 1.0",
        },
        "added_p50_c1_vs_haproxy": {
            "value": ratio(added_amb, added_hap),
            "ambient_ms": added_amb,
            "haproxy_ms": added_hap,
            "target": "<= 1.0",
        },
        "waypoint_rps_c50_vs_haproxy_http": {
            "value": ratio(wp["c50"]["rps"], hh["c50"]["rps"]),
            "waypoint_rps": wp["c50"]["rps"],
            "haproxy_http_rps": hh["c50"]["rps"],
            "target": ">= 1.0",
        },
        "waypoint_vcpu_at_1000rps": {
            "value": wp["rate1000"].get("waypoint_vcpu"),
            "haproxy_http_vcpu_per_sidecar": hh["rate1000"].get("vcpu_per_proxy"),
            "haproxy_http_vcpu_both_sidecars": hh["rate1000"].get("vcpu_all_proxies"),
            "target": "<= 0.25",
        },
        "waypoint_rss_mb_at_1000rps": {
            "value": wp["rate1000"].get("waypoint_rss_mb"),
            "haproxy_http_rss_mb_per_sidecar": hh["rate1000"].get("rss_mb_per_proxy"),
            "target": "<= 60",
        },
        "waypoint_added_p50_c1_vs_haproxy_http": {
            "value": ratio(added(wp, "c1", "p50_ms"), added(hh, "c1", "p50_ms")),
            "waypoint_ms": added(wp, "c1", "p50_ms"),
            "haproxy_http_ms": added(hh, "c1", "p50_ms"),
            "target": "<= 1.0",
        },
        "waypoint_added_p90_at_1000rps_vs_haproxy_http": {
            "value": ratio(added(wp, "rate1000", "p90_ms"), added(hh, "rate1000", "p90_ms")),
            "waypoint_ms": added(wp, "rate1000", "p90_ms"),
            "haproxy_http_ms": added(hh, "rate1000", "p90_ms"),
            "target": "<= 1.0",
        },
    }


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    rows = [
        ("requests/s, 1 connection", lambda ns: s[ns]["c1"]["rps"]),
        (
            "p50 / p99 ms, 1 connection",
            lambda ns: f"{s[ns]['c1'].get('p50_ms')} / {s[ns]['c1'].get('p99_ms')}",
        ),
        ("requests/s, 50 connections", lambda ns: s[ns]["c50"]["rps"]),
        (
            "p50 / p99 ms, 50 connections",
            lambda ns: f"{s[ns]['c50'].get('p50_ms')} / {s[ns]['c50'].get('p99_ms')}",
        ),
        (
            "connections/s (new connection per request)",
            lambda ns: s[ns]["churn"]["connections_per_s"],
        ),
        ("bulk Gbit/s, one connection", lambda ns: s[ns]["bulk"]["gbit_per_s"]),
        (
            "1000 rps over 4 conn.: p50 / p90 / p99 ms",
            lambda ns: "{p50_ms} / {p90_ms} / {p99_ms}".format(**s[ns]["rate1000"]),
        ),
        (
            "vCPU per proxy process at 1000 rps",
            lambda ns: s[ns]["rate1000"].get("vcpu_per_proxy", "-"),
        ),
        (
            "vCPU, all proxy processes, at 1000 rps",
            lambda ns: s[ns]["rate1000"].get("vcpu_all_proxies", "-"),
        ),
        (
            "RSS MB per proxy process, after 1000 rps",
            lambda ns: s[ns]["rate1000"].get("rss_mb_per_proxy", "-"),
        ),
        (
            "waypoint process: vCPU / RSS MB at 1000 rps",
            lambda ns: (
                "{waypoint_vcpu} / {waypoint_rss_mb}".format(**s[ns]["rate1000"])
                if "waypoint_vcpu" in s[ns]["rate1000"]
                else "-"
            ),
        ),
        (
            "proxy CPU s per 1000 requests (50 conn.)",
            lambda ns: s[ns]["c50"].get("proxy_cpu_s_per_1000_req", "-"),
        ),
    ]

    def ratio_rows(waypoint: bool) -> list[str]:
        lines = []
        for key, r in result["ratios"].items():
            if key.startswith("waypoint_") == waypoint:
                detail = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("value", "target"))
                lines.append(f"| {key} | {r['value']} | {detail} | {r['target']} |")
        return lines

    lines = [
        f"## Data path ({result['date']}, {result['rounds']} interleaved rounds of "
        f"{result['seconds']} s, medians)",
        "",
        "| measure | " + " | ".join(LABELS[ns] for ns in SCENARIOS) + " |",
        "|---" * (len(SCENARIOS) + 1) + "|",
        *[
            "| " + " | ".join([name, *(str(get(ns)) for ns in SCENARIOS)]) + " |"
            for name, get in rows
        ],
        "",
        "| ratio (Meshway ambient / HAProxy sidecars) | value | detail | target |",
        "|---|---|---|---|",
        *ratio_rows(waypoint=False),
        "",
        "| ratio (Meshway waypoint / HAProxy http sidecars) | value | detail | target |",
        "|---|---|---|---|",
        *ratio_rows(waypoint=True),
        "",
        "Proxy processes measured: ambient, the two node proxies; sidecars and HAProxy, the two "
        "pods' sidecars; waypoint, the two node proxies and the waypoint "
        f"(pod {WAYPOINT_POD} on {result['waypoint_node']}). The waypoint path's bulk run "
        "crosses the waypoint as TCP (its Service port has no appProtocol); HAProxy http "
        "sidecars carry iperf3 in `mode tcp`.",
        "",
        f"Machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}. "
        "Command: `python bench/dataplane.py`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s: a smoke run")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    # A stopped benchmark still tears its cluster down (the context managers' exits run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.seconds, args.rounds = 1, 1
    if os.geteuid() != 0:
        print("the data-path benchmark runs in network namespaces: run it as root", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="meshway-bench-dp-") as tmp:
            work = Path(tmp)
            os.chmod(work, 0o755)
            haproxy_certs(work)
            for ns in HAPROXY_MODES:
                haproxy_server_conf(work, ns)
            with running_cluster(work, manifest(work), "--timeout", "120") as cluster:
                urls = prepare(cluster, work)
                waypoint_node = cluster.status()["pods"][WAYPOINT_POD]["node"]
                rounds = []
                for i in range(args.rounds):
                    print(f"round {i + 1}/{args.rounds}", flush=True)
                    rounds.append(one_round(cluster, urls, args.seconds))
    except BenchError as exc:
        print(f"data-path benchmark failed: {exc}", file=sys.stderr)
        return 1
    summary = summarize(rounds)
    result = {
        "benchmark": "dataplane",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds": args.seconds,
        "rounds": args.rounds,
        "waypoint_node": waypoint_node,
        "raw": rounds,
        "summary": summary,
        "ratios": ratios(summary),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "dataplane.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result)
    (args.output / "dataplane.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
