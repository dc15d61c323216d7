"""Data-path benchmark: Meshway's node proxies against HAProxy sidecars and no mesh at all.

One local cluster (two nodes) holds every scenario side by side, each a client pod on node-1
and a server pod on node-2 running nginx (a 500-byte answer) and an iperf3 server:

- no-mesh: plain pods, direct;
- ambient: pods in an ambient namespace, through the two node proxies (HBONE, mTLS);
- sidecar: the same proxy code as a per-pod sidecar at both ends (`meshway.io/proxy: sidecar`);
- haproxy: HAProxy 2.6 as an mTLS TCP sidecar in each pod, one thread each (TLS 1.3, mutual
  verification), the classic sidecar mesh built from a fast C proxy.

Workloads are interleaved round by round so that machine noise hits every scenario alike:
wrk closed loop at 1 and 50 connections (requests/s, p50, p99), wrk with a new connection per
request (connections/s), a fixed 1000 requests/s over 4 connections with an open-loop generator
(bench/openloop.py: p50/p90/p99 and the proxies' vCPU), and iperf3 over one connection
(Gbit/s). CPU seconds per 1000 requests of each scenario's proxies come from /proc during the
50-connection run. Each run is bounded (`--seconds`); results go to
bench/results/dataplane.{json,md}.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshway.identity import CertificateAuthority, SpiffeId, build_csr, generate_key, key_to_pem  # noqa: E402
from tests.e2e.meshcluster import Cluster, running_cluster  # noqa: E402

SCENARIOS = ("no-mesh", "ambient", "sidecar", "haproxy")
BODY = "x" * 499 + "\n"
# Meshway in sidecar mode: the same proxy code, one process per pod (meshway.io/proxy: sidecar).
SIDECAR_LABEL = {ns: (", meshway.io/proxy: sidecar" if ns == "sidecar" else "") for ns in SCENARIOS}
HTTP_PORT, IPERF_PORT = 8080, 5201
HAP_HTTP, HAP_IPERF = 10000, 10001  # client sidecar listeners (in the client pod)
HAP_TLS_HTTP, HAP_TLS_IPERF = 15443, 15444  # server sidecar listeners


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
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
"""


def haproxy_server_conf(work: Path) -> Path:
    """The server sidecar: one thread, TLS 1.3, client certificates required."""
    conf = work / "haproxy-server.cfg"
    tls = f"ssl crt {work}/hap-server.pem ca-file {work}/hap-ca.pem verify required"
    conf.write_text(
        HAPROXY_GLOBAL
        + "".join(
            f"listen in{port}\n  bind 0.0.0.0:{port} {tls}\n  server app 127.0.0.1:{app}\n"
            for port, app in ((HAP_TLS_HTTP, HTTP_PORT), (HAP_TLS_IPERF, IPERF_PORT))
        )
    )
    return conf


def haproxy_client_conf(work: Path, server_ip: str) -> Path:
    """The client sidecar: one thread, presents its certificate, verifies the server's."""
    conf = work / "haproxy-client.cfg"
    tls = f"ssl crt {work}/hap-client.pem ca-file {work}/hap-ca.pem verify required"
    conf.write_text(
        HAPROXY_GLOBAL
        + "".join(
            f"listen out{local}\n  bind 127.0.0.1:{local}\n  server s {server_ip}:{remote} {tls}\n"
            for local, remote in ((HAP_HTTP, HAP_TLS_HTTP), (HAP_IPERF, HAP_TLS_IPERF))
        )
    )
    return conf


def client_workload(ns: str, command: str) -> str:
    return (
        "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
        f"metadata: {{name: client, namespace: {ns}, labels: {{app: client{SIDECAR_LABEL[ns]}}}}}\n"
        f"spec:\n  nodeName: node-1\n  command: [sh, -c, {json.dumps(command)}]"
    )


def manifest(work: Path) -> str:
    docs = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: no-mesh}",
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: ambient, labels: {istio.io/dataplane-mode: ambient}}",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: haproxy}",
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: sidecar, labels: {istio.io/dataplane-mode: ambient}}",
        "apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {name: node-1}",
        "apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {name: node-2}",
    ]
    for ns in SCENARIOS:
        conf = nginx_conf(work, ns)
        server_cmd = f"nginx -c {conf} -g 'daemon off;' & iperf3 -s -p {IPERF_PORT} & "
        server_cmd += f"exec haproxy -f {work}/haproxy-server.cfg" if ns == "haproxy" else "wait"
        docs.append(
            "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
            f"metadata: {{name: server, namespace: {ns}, "
            f"labels: {{app: server{SIDECAR_LABEL[ns]}}}}}\n"
            f"spec:\n  nodeName: node-2\n  command: [sh, -c, {json.dumps(server_cmd)}]"
        )
        if ns != "haproxy":  # the HAProxy client needs the server's IP: applied once known
            docs.append(client_workload(ns, "exec sleep infinity"))
    return "\n---\n".join(docs) + "\n"


def in_pod(cluster: Cluster, ns: str, name: str, *cmd: str, timeout: float) -> str:
    netns = f"mw.{cluster.name}.pod.{ns}.{name}"
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, timeout=timeout
    )
    return proc.stdout + proc.stderr


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def parse_wrk(out: str) -> dict[str, float]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    pct = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    result = {"rps": float(rps.group(1)) if rps else 0.0}
    for p, text in pct.items():
        m = re.match(r"([\d.]+)(us|ms|s)", text)
        if m:
            result[f"p{p}_ms"] = round(_ms(m.group(1), m.group(2)), 3)
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        result["socket_errors"] = errors.group(1)  # type: ignore[assignment]
    return result


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def proxy_pids(cluster: Cluster, ns: str) -> list[int]:
    state = cluster.status()
    if ns == "ambient":
        return [p["pid"] for p in state["nodeProxies"].values()]
    if ns == "sidecar":
        return [p["pid"] for k, p in state["sidecars"].items() if k.startswith("sidecar/")]
    if ns == "haproxy":
        pids = []
        for name in ("client", "server"):
            netns = f"mw.{cluster.name}.pod.haproxy.{name}"
            for pid in subprocess.run(
                ["ip", "netns", "pids", netns], capture_output=True, text=True
            ).stdout.split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "haproxy":
                    pids.append(int(pid))
        return pids
    return []


def targets(cluster: Cluster) -> dict[str, dict[str, str]]:
    pods = cluster.status()["pods"]
    out = {}
    for ns in SCENARIOS:
        ip = pods[f"{ns}/server"]["ip"]
        if ns == "haproxy":
            out[ns] = {"http": f"http://127.0.0.1:{HAP_HTTP}/", "iperf": f"127.0.0.1:{HAP_IPERF}"}
        else:
            out[ns] = {"http": f"http://{ip}:{HTTP_PORT}/", "iperf": f"{ip}:{IPERF_PORT}"}
    return out


def one_round(
    cluster: Cluster, urls: dict[str, dict[str, str]], seconds: int
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {ns: {} for ns in SCENARIOS}
    d = f"{seconds}s"
    limit = seconds + 30
    for ns in SCENARIOS:
        url = urls[ns]["http"]
        results[ns]["c1"] = parse_wrk(
            in_pod(
                cluster,
                ns,
                "client",
                "wrk",
                "-t1",
                "-c1",
                f"-d{d}",
                "--latency",
                url,
                timeout=limit,
            )
        )
    for ns in SCENARIOS:
        url = urls[ns]["http"]
        pids = proxy_pids(cluster, ns)
        before = cpu_seconds(pids) if pids else 0.0
        started = time.monotonic()
        c50 = parse_wrk(
            in_pod(
                cluster,
                ns,
                "client",
                "wrk",
                "-t2",
                "-c50",
                f"-d{d}",
                "--latency",
                url,
                timeout=limit,
            )
        )
        elapsed = time.monotonic() - started
        if pids and c50["rps"]:
            used = cpu_seconds(pids) - before
            c50["proxy_cpu_s_per_1000_req"] = round(used / (c50["rps"] * elapsed / 1000), 4)
        results[ns]["c50"] = c50
    for ns in SCENARIOS:
        url = urls[ns]["http"]
        churn = parse_wrk(
            in_pod(
                cluster,
                ns,
                "client",
                "wrk",
                "-t1",
                "-c8",
                f"-d{d}",
                "-H",
                "Connection: close",
                url,
                timeout=limit,
            )
        )
        results[ns]["churn"] = {"connections_per_s": churn["rps"]}
    for ns in SCENARIOS:
        # Fixed rate, open loop: 1000 requests/s over 4 connections.
        pids = proxy_pids(cluster, ns)
        before = cpu_seconds(pids) if pids else 0.0
        started = time.monotonic()
        raw = in_pod(
            cluster, ns, "client", "python3", str(ROOT / "bench" / "openloop.py"), urls[ns]["http"],
            "--rps", "1000", "--connections", "4", "--seconds", str(seconds), timeout=limit,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        try:
            rate = json.loads(raw.strip().splitlines()[-1])
        except (ValueError, IndexError):
            rate = {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "achieved_rps": 0.0}
        if pids:
            rate["vcpu_per_proxy"] = round((cpu_seconds(pids) - before) / elapsed / len(pids), 4)
        results[ns]["rate1000"] = rate
    for ns in SCENARIOS:
        host, port = urls[ns]["iperf"].rsplit(":", 1)
        raw = in_pod(
            cluster,
            ns,
            "client",
            "iperf3",
            "-c",
            host,
            "-p",
            port,
            "-t",
            str(seconds),
            "-J",
            timeout=limit,
        )
        try:
            gbps = json.loads(raw[raw.index("{") :])["end"]["sum_received"]["bits_per_second"] / 1e9
        except (ValueError, KeyError):
            gbps = 0.0
        results[ns]["bulk"] = {"gbit_per_s": round(gbps, 3)}
    return results


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
    amb, hap, base = summary["ambient"], summary["haproxy"], summary["no-mesh"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    added_amb = amb["c1"].get("p50_ms", 0) - base["c1"].get("p50_ms", 0)
    added_hap = hap["c1"].get("p50_ms", 0) - base["c1"].get("p50_ms", 0)
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
            "ambient_ms": round(added_amb, 3),
            "haproxy_ms": round(added_hap, 3),
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
            "proxy CPU s per 1000 requests (50 conn.)",
            lambda ns: s[ns]["c50"].get("proxy_cpu_s_per_1000_req", "-"),
        ),
    ]
    lines = [
        f"## Data path ({result['date']}, {result['rounds']} interleaved rounds of "
        f"{result['seconds']} s, medians)",
        "",
        "| measure | no mesh | Meshway ambient | Meshway sidecars | HAProxy sidecars |",
        "|---|---|---|---|---|",
        *[
            "| " + " | ".join([name, *(str(get(ns)) for ns in SCENARIOS)]) + " |"
            for name, get in rows
        ],
        "",
        "| ratio (Meshway ambient / HAProxy sidecars) | value | target |",
        "|---|---|---|",
        *[f"| {k} | {v['value']} | {v['target']} |" for k, v in result["ratios"].items()],
        "",
        f"Machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}. "
        "Command: `python bench/dataplane.py`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
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
    with tempfile.TemporaryDirectory(prefix="meshway-bench-dp-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        haproxy_certs(work)
        haproxy_server_conf(work)
        with running_cluster(work, manifest(work), "--timeout", "120") as cluster:
            server_ip = cluster.status()["pods"]["haproxy/server"]["ip"]
            conf = haproxy_client_conf(work, server_ip)
            cluster.apply(client_workload("haproxy", f"exec haproxy -f {conf}"))
            probe = f"http://127.0.0.1:{HAP_HTTP}/"
            cluster.eventually(
                lambda: (
                    cluster.status()["pods"].get("haproxy/client", {}).get("phase") == "Running"
                    and "200"
                    in in_pod(
                        cluster,
                        "haproxy",
                        "client",
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        probe,
                        timeout=10,
                    )
                ),
                seconds=60,
            )
            cluster.eventually(
                lambda: "capturing pod ambient/server" in cluster.node_log("node-2"), seconds=60
            )
            cluster.eventually(
                lambda: "capturing pod ambient/client" in cluster.node_log("node-1"), seconds=60
            )
            time.sleep(1.0)
            urls = targets(cluster)
            rounds = []
            for i in range(args.rounds):
                print(f"round {i + 1}/{args.rounds}", flush=True)
                rounds.append(one_round(cluster, urls, args.seconds))
    summary = summarize(rounds)
    result = {
        "benchmark": "dataplane",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds": args.seconds,
        "rounds": args.rounds,
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
