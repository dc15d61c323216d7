"""Control-plane scale: a real control plane process with a large mesh and many subscribers.

Measures, at N workloads / services / policies (default 10,000 / 1,000 / 500):
  - time to apply the mesh (one API request);
  - time to deliver the full state to a new xDS subscriber (TLS stream start → full snapshot);
  - time for one change to reach every one of M connected subscribers (default 100), p50/p99;
  - CSRs signed per second over gRPC (with node restriction), and in-process;
  - control-plane RSS (current and peak).

Subscribers run in worker processes (each with its own event loop) so that the client side is
not one Python loop serialising 100 streams. Every loop is bounded in count and time.

Usage: python bench/controlplane_scale.py [--workloads N] [--subscribers M] [--quick]
Writes bench/results/controlplane_scale.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import yaml

from meshway.controlplane.launcher import ControlPlaneProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGETS = {
    "full_state_s": 1.0,
    "change_to_all_p99_ms": 200.0,
    "csr_per_s": 500.0,
    "rss_mb": 300.0,
}


def build_mesh(workloads: int, services: int, policies: int, nodes: int) -> str:
    namespaces = max(1, services // 10)
    docs: list[dict[str, Any]] = []
    for n in range(nodes):
        docs.append(
            {"apiVersion": "meshway.io/v1alpha1", "kind": "Node", "metadata": {"name": f"node-{n}"}}
        )
    for ns in range(namespaces):
        name = f"ns-{ns}"
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}},
            }
        )
        for sa in range(10):
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": f"sa-{sa}", "namespace": name},
                }
            )
    for s in range(services):
        ns = s % namespaces
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"svc-{s}", "namespace": f"ns-{ns}"},
                "spec": {
                    "selector": {"app": f"app-{s // namespaces}"},
                    "ports": [
                        {"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}
                    ],
                },
            }
        )
    for w in range(workloads):
        ns = w % namespaces
        idx = w // namespaces
        docs.append(
            {
                "apiVersion": "meshway.io/v1alpha1",
                "kind": "Workload",
                "metadata": {
                    "name": f"wl-{w}",
                    "namespace": f"ns-{ns}",
                    "labels": {"app": f"app-{idx % 10}", "version": "v1"},
                },
                "spec": {
                    "nodeName": f"node-{w % nodes}",
                    "serviceAccountName": f"sa-{idx % 10}",
                    "command": ["sleep", "infinity"],
                    "ports": [{"name": "http", "containerPort": 8080}],
                },
            }
        )
    for p in range(policies):
        ns = p % namespaces
        docs.append(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": f"policy-{p}", "namespace": f"ns-{ns}"},
                "spec": {
                    "selector": {"matchLabels": {"app": f"app-{(p // namespaces) % 10}"}},
                    "rules": [
                        {
                            "from": [
                                {"source": {"principals": [f"cluster.local/ns/ns-{ns}/sa/sa-1"]}}
                            ],
                            "to": [{"operation": {"ports": ["8080"]}}],
                        }
                    ],
                },
            }
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


# -- subscriber workers ----------------------------------------------------------------------


def subscriber_worker(
    conn: Connection, xds: str, bundle: str, creds: list[tuple[str, str]], expected: int
) -> None:
    import uvloop

    from meshway.xds.client import Update, XdsClient
    from meshway.xds.types import ADDRESS_TYPE, node_proxy_types

    async def main() -> None:
        clients = []
        for node, token in creds:
            client = XdsClient(
                xds, node, node_proxy_types(), token=token, root_certificates=bundle.encode()
            )

            def seen(update: Update) -> None:
                msg = update.updated.get("ns-0/wl-0")
                if msg is not None:
                    seq = msg.workload.labels.get("bench-seq")
                    if seq is not None:
                        conn.send(("seen", int(seq), time.monotonic()))

            client.subscribe(seen)
            client.start()
            clients.append(client)
        deadline = time.monotonic() + 300
        while any(len(c.snapshot(ADDRESS_TYPE)) < expected for c in clients):
            if time.monotonic() > deadline:
                conn.send(("error", "subscribers did not sync within 300 s"))
                return
            await asyncio.sleep(0.05)
        conn.send(("ready", len(clients)))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_reader(conn.fileno(), stop.set)
        await stop.wait()
        for c in clients:
            await c.close()

    uvloop.run(main())


# -- measurements ----------------------------------------------------------------------------


async def full_state_time(
    xds: str, bundle: str, node: str, token: str, expected: tuple[int, int]
) -> float:
    from meshway.xds.client import XdsClient
    from meshway.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE, node_proxy_types

    client = XdsClient(
        xds, node, node_proxy_types(), token=token, root_certificates=bundle.encode()
    )
    start = time.monotonic()
    client.start()
    try:
        async with asyncio.timeout(60):
            while (
                len(client.snapshot(ADDRESS_TYPE)) < expected[0]
                or len(client.snapshot(AUTHORIZATION_TYPE)) < expected[1]
            ):
                await asyncio.sleep(0.002)
        return time.monotonic() - start
    finally:
        await client.close()


async def csr_rate(
    xds: str, bundle: str, token: str, identities: list[str], total: int, concurrency: int
) -> float:
    from meshway.api.v1 import ca_pb2
    from meshway.identity.caclient import CREATE_CERTIFICATE
    from meshway.identity.csr import build_csr, generate_key
    from meshway.identity.spiffe import SpiffeId
    from meshway.xds.channel import GrpcChannel
    from meshway.xds.client import CONTROL_PLANE_NAME

    csrs = [
        build_csr(generate_key(), SpiffeId.parse(identities[i % len(identities)])).decode()
        for i in range(min(total, 400))
    ]
    # The proxies' own gRPC client, as they call: one HTTP/2 connection, calls multiplexed.
    channel = GrpcChannel(xds, root_certificates=bundle.encode(), server_name=CONTROL_PLANE_NAME)
    metadata = (("authorization", f"Bearer {token}"),)

    async def sign(csr: str) -> None:
        await channel.unary(
            CREATE_CERTIFICATE,
            ca_pb2.CertificateRequest(csr=csr),
            ca_pb2.CertificateResponse,
            metadata=metadata,
            timeout=30,
        )

    try:
        await sign(csrs[0])
        counter = iter(range(total))

        async def worker() -> None:
            for i in counter:
                await sign(csrs[i % len(csrs)])

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.monotonic() - start)
    finally:
        await channel.close()


def inprocess_sign_rate(total: int) -> float:
    from meshway.identity.ca import CertificateAuthority
    from meshway.identity.csr import build_csr, generate_key
    from meshway.identity.spiffe import SpiffeId

    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.load_or_create(Path(tmp), "cluster.local")
        ident = SpiffeId("cluster.local", "ns-0", "sa-0")
        csr = build_csr(generate_key(), ident)
        start = time.monotonic()
        for _ in range(total):
            ca.sign_csr(csr, ident)
        return total / (time.monotonic() - start)


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def push_histogram(server: str) -> dict[float, float]:
    """Cumulative bucket counts of the control plane's own push-latency histogram."""
    buckets: dict[float, float] = {}
    for line in httpx.get(f"{server}/metrics", timeout=10).text.splitlines():
        if line.startswith("meshway_xds_push_latency_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile q of the observations between two reads."""
    counts = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = counts[-1][1] if counts else 0.0
    for le, cumulative in counts:
        if total and cumulative >= q * total:
            return le
    return float("nan")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meshway-bench-cp-") as tmp:
        return measure(args, Path(tmp))


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "controlplane_scale",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "scale": {
            "workloads": args.workloads,
            "services": args.services,
            "policies": args.policies,
            "nodes": args.nodes,
            "subscribers": args.subscribers,
        },
        "targets": TARGETS,
    }
    with ControlPlaneProcess(work / "state", log_path=work / "cp.log") as cp:
        http = httpx.Client(
            base_url=cp.server, headers={"Authorization": f"Bearer {cp.token}"}, timeout=600
        )
        text = build_mesh(args.workloads, args.services, args.policies, args.nodes)
        start = time.monotonic()
        reply = http.post("/api/v1/apply", json={"sources": [{"name": "scale.yaml", "text": text}]})
        reply.raise_for_status()
        result["apply_s"] = round(time.monotonic() - start, 3)
        print(
            f"applied {len(reply.json()['results'])} objects in {result['apply_s']} s", flush=True
        )

        joins = [http.post(f"/api/v1/nodes/node-{n}/join").json() for n in range(args.nodes)]
        bundle = joins[0]["trustBundle"]
        xds = cp.grpc_address
        expected = (args.workloads + args.services, args.policies)
        time.sleep(1.0)  # let the initial push settle

        full = [
            asyncio.run(full_state_time(xds, bundle, "node-0", joins[0]["credential"], expected))
            for _ in range(args.full_state_runs)
        ]
        result["full_state_s"] = {
            "runs": [round(x, 3) for x in full],
            "median": round(statistics.median(full), 3),
        }
        print(f"full state to a new subscriber: {result['full_state_s']}", flush=True)

        # Subscribers in worker processes.
        ctx = mp.get_context("spawn")
        per_worker = [[] for _ in range(args.workers)]  # type: list[list[tuple[str, str]]]
        for i in range(args.subscribers):
            j = joins[i % len(joins)]
            per_worker[i % args.workers].append((j["node"], j["credential"]))
        pipes, procs = [], []
        for creds in per_worker:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=subscriber_worker, args=(child, xds, bundle, creds, expected[0]), daemon=True
            )
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        try:
            start = time.monotonic()
            for p in pipes:
                if not p.poll(300):
                    raise TimeoutError("a subscriber worker did not report within 300 s")
                msg = p.recv()
                if msg[0] != "ready":
                    raise RuntimeError(str(msg))
            result["subscribers_synced_s"] = round(time.monotonic() - start, 3)
            print(
                f"{args.subscribers} subscribers synced in {result['subscribers_synced_s']} s",
                flush=True,
            )

            per_sub: list[float] = []
            per_change: list[float] = []
            hist_before = push_histogram(cp.server)
            wl0 = yaml.safe_load_all(text)
            base = next(
                d for d in wl0 if d["kind"] == "Workload" and d["metadata"]["name"] == "wl-0"
            )
            for seq in range(args.changes):
                base["metadata"]["labels"]["bench-seq"] = str(seq)
                doc = yaml.safe_dump(base)
                t0 = time.monotonic()
                http.post(
                    "/api/v1/apply", json={"sources": [{"name": "change.yaml", "text": doc}]}
                ).raise_for_status()
                arrivals: list[float] = []
                deadline = time.monotonic() + 30
                while len(arrivals) < args.subscribers and time.monotonic() < deadline:
                    for p in pipes:
                        while p.poll(0):
                            kind, s, at = p.recv()
                            if kind == "seen" and s == seq:
                                arrivals.append(at - t0)
                    time.sleep(0.001)
                if len(arrivals) < args.subscribers:
                    raise TimeoutError(
                        f"change {seq}: only {len(arrivals)} subscribers got it in 30 s"
                    )
                per_sub.extend(arrivals)
                per_change.append(max(arrivals))
                time.sleep(0.1)
            result["change_to_all_ms"] = {
                "changes": args.changes,
                "p50": round(percentile(per_change, 50) * 1000, 1),
                "p99": round(percentile(per_change, 99) * 1000, 1),
                "max": round(max(per_change) * 1000, 1),
                "per_subscriber_p50": round(percentile(per_sub, 50) * 1000, 1),
                "per_subscriber_p99": round(percentile(per_sub, 99) * 1000, 1),
            }
            hist_after = push_histogram(cp.server)
            result["server_push_ms_bucket_upper_bound"] = {
                "p50": bucket_quantile(hist_before, hist_after, 0.5) * 1000,
                "p99": bucket_quantile(hist_before, hist_after, 0.99) * 1000,
            }
            print(f"one change to all subscribers: {result['change_to_all_ms']}", flush=True)
            print(f"server-side push latency: {result['server_push_ms_bucket_upper_bound']}")
        finally:
            for p in pipes:
                p.send("stop")
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()

        # Workloads of node-0 live in namespaces where w % nodes == 0; pick one that is there.
        first = next(w for w in range(args.workloads) if w % args.nodes == 0)
        ns0 = first % max(1, args.services // 10)
        sa = (first // max(1, args.services // 10)) % 10
        identities = [f"spiffe://cluster.local/ns/ns-{ns0}/sa/sa-{sa}"]
        rate = asyncio.run(csr_rate(xds, bundle, joins[0]["credential"], identities, args.csrs, 16))
        result["csr_per_s_grpc"] = round(rate, 1)
        result["csr_per_s_inprocess"] = round(inprocess_sign_rate(min(args.csrs, 1000)), 1)
        print(
            f"CSRs/s over gRPC: {result['csr_per_s_grpc']}, "
            f"in-process: {result['csr_per_s_inprocess']}",
            flush=True,
        )

        assert cp.proc is not None
        rss, peak = rss_mb(cp.proc.pid)
        result["rss_mb"] = {"current": round(rss, 1), "peak": round(peak, 1)}
        print(f"control plane RSS: {result['rss_mb']}", flush=True)
    result["met"] = {
        "full_state_s": result["full_state_s"]["median"] <= TARGETS["full_state_s"],
        "change_to_all_p99_ms": result["change_to_all_ms"]["p99"]
        <= TARGETS["change_to_all_p99_ms"],
        "csr_per_s": result["csr_per_s_grpc"] >= TARGETS["csr_per_s"],
        "rss_mb": result["rss_mb"]["peak"] <= TARGETS["rss_mb"],
    }
    return result


def report(result: dict[str, Any]) -> str:
    s = result["scale"]
    ok = {True: "met", False: "**missed**"}
    met = result["met"]
    rows = [
        (
            "time to full state, new subscriber (median)",
            f"{result['full_state_s']['median']} s",
            "≤ 1 s",
            ok[met["full_state_s"]],
        ),
        (
            f"one change to all {s['subscribers']} subscribers, p50 / p99",
            f"{result['change_to_all_ms']['p50']} / {result['change_to_all_ms']['p99']} ms",
            "p99 ≤ 200 ms",
            ok[met["change_to_all_p99_ms"]],
        ),
        (
            "CSRs signed per second (gRPC, 16 in flight)",
            f"{result['csr_per_s_grpc']}",
            "≥ 500",
            ok[met["csr_per_s"]],
        ),
        (
            "control-plane RSS, current / peak",
            f"{result['rss_mb']['current']} / {result['rss_mb']['peak']} MB",
            "≤ 300 MB",
            ok[met["rss_mb"]],
        ),
        ("apply of the whole mesh (one request)", f"{result['apply_s']} s", "", ""),
        (
            f"{s['subscribers']} subscribers reach full state",
            f"{result['subscribers_synced_s']} s",
            "",
            "",
        ),
        ("CA signing in-process (reference)", f"{result['csr_per_s_inprocess']} /s", "", ""),
    ]
    lines = [
        f"## Control-plane scale ({result['date']})",
        "",
        f"{s['workloads']} Workloads, {s['services']} Services, "
        f"{s['policies']} AuthorizationPolicies, {s['nodes']} Nodes; "
        f"{s['subscribers']} xDS subscribers. Machine: {result['machine']['cpus']} CPUs, "
        f"{result['machine']['platform']}, Python {result['machine']['python']}.",
        "",
        "| measure | result | target | |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        "Command: `make bench` (`python bench/controlplane_scale.py`).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--policies", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--csrs", type=int, default=3000)
    parser.add_argument("--full-state-runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="A small smoke-size run.")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.workloads, args.services, args.policies, args.nodes = 200, 20, 10, 4
        args.subscribers, args.workers, args.changes, args.csrs, args.full_state_runs = (
            4,
            2,
            3,
            50,
            1,
        )
    result = run(args)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "controlplane_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result)
    (args.output / "controlplane_scale.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
