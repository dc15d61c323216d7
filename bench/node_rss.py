"""Node proxy memory: RSS of one node proxy with 0, 1, 50 and 200 enrolled pods, against the
total RSS of Meshway sidecars (one proxy per pod) for 1 and 50 pods.

Runs a one-node local cluster for each size (root, network namespaces), waits until the proxy
captures every pod (listeners, capture rules, a certificate per identity), and reads the
proxy's VmRSS from /proc while idle. Writes bench/results/node_rss.json.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.meshcluster import running_cluster  # noqa: E402


def manifest(pods: int, sidecars: bool = False) -> str:
    docs = [
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}",
        "apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {name: node-1}",
    ]
    extra = SIDECAR if sidecars else ""
    for i in range(pods):
        docs.append(
            "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
            f"metadata: {{name: pod-{i}, namespace: bench, labels: {{app: bench{extra}}}}}\n"
            "spec: {nodeName: node-1, command: [sleep, infinity]}"
        )
    return "\n---\n".join(docs) + "\n"


SIDECAR = ", meshway.io/proxy: sidecar"


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1))


def measure(pods: int, sidecars: bool = False) -> dict[str, Any]:
    """Idle RSS of the node proxy, or the sidecars' total, once every pod is captured."""
    with (
        tempfile.TemporaryDirectory(prefix="meshway-rss-") as tmp,
        running_cluster(Path(tmp), manifest(pods, sidecars), "--timeout", "300") as cluster,
    ):
        logs = cluster.directory / "logs"

        def captured() -> bool:
            if sidecars:
                done = [f for f in logs.glob("sidecar.*.log") if "capturing pod" in f.read_text()]
                return len(done) == pods
            metrics = cluster.in_node("node-1", "curl", "-s", "127.0.0.1:15020/metrics")
            found = re.search(r"^meshway_node_enrolled_pods ([0-9.]+)", metrics, re.M)
            return bool(found) and float(found.group(1)) == pods

        cluster.eventually(captured, seconds=600, interval=1.0)
        time.sleep(2.0)
        state = cluster.status()
        if sidecars:
            pids = [p["pid"] for p in state["sidecars"].values()]
            mode = "sidecars (total)"
        else:
            pids = [state["nodeProxies"]["node-1"]["pid"]]
            mode = "node proxy"
        total = sum(rss_kib(pid) for pid in pids)
        return {
            "mode": mode,
            "pods": pods,
            "processes": len(pids),
            "rss_mib": round(total / 1024, 1),
        }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="0,1,50,200", help="node proxy: enrolled pods")
    parser.add_argument(
        "--sidecar-sizes", default="1,50", help="sidecar mode: pods (a ~60 MiB process each)"
    )
    args = parser.parse_args()
    # A stopped benchmark still tears its cluster down (the context managers' exits run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = [measure(int(n)) for n in args.sizes.split(",") if n]
    results += [measure(int(n), sidecars=True) for n in args.sidecar_sizes.split(",") if n]
    for r in results:
        print(
            f"{r['mode']:>17} RSS with {r['pods']:>3} enrolled pods: {r['rss_mib']} MiB", flush=True
        )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "node_rss.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
