"""Node proxy memory: RSS of one `meshway node run` with 0, 1 and 50 enrolled pods.

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


def manifest(pods: int) -> str:
    docs = [
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}",
        "apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {name: node-1}",
    ]
    for i in range(pods):
        docs.append(
            "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
            f"metadata: {{name: pod-{i}, namespace: bench, labels: {{app: bench}}}}\n"
            "spec: {nodeName: node-1, command: [sleep, infinity]}"
        )
    return "\n---\n".join(docs) + "\n"


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1))


def measure(pods: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="meshway-rss-") as tmp,
        running_cluster(Path(tmp), manifest(pods), "--timeout", "180") as cluster,
    ):

        def captured() -> bool:
            metrics = cluster.in_node("node-1", "curl", "-s", "127.0.0.1:15020/metrics")
            found = re.search(r"^meshway_node_enrolled_pods ([0-9.]+)", metrics, re.M)
            return bool(found) and float(found.group(1)) == pods and "healthz" not in metrics

        cluster.eventually(captured, seconds=180, interval=0.5)
        time.sleep(2.0)
        pid = cluster.status()["nodeProxies"]["node-1"]["pid"]
        return {"pods": pods, "rss_mib": round(rss_kib(pid) / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="0,1,50")
    args = parser.parse_args()
    # A stopped benchmark still tears its cluster down (the context managers' exits run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = [measure(int(n)) for n in args.sizes.split(",")]
    for r in results:
        print(f"node proxy RSS with {r['pods']:>3} enrolled pods: {r['rss_mib']} MiB", flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "node_rss.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
