"""What issue 6's features cost when configured but not triggered: a waypoint with traffic
policy, rate limits, faults, mirroring, JWT authentication and authorization, and tracing all
configured for its Service, against a bare waypoint, in the same run.

One local cluster, three namespaces with the same shape: a client pod on node-1, nginx on
node-2 behind a Service (`appProtocol: http`), each namespace with its own waypoint. The
`full` namespace gets FULL_CONFIG: every feature applies to every request, none fires: a
DestinationRule (least request, subset, connection-pool limits, outlier detection), an
HTTPRoute to the subset with a RequestMirror at 0 % and a FaultInjection at 0 %, a Local
RateLimitPolicy far above the load, a RequestAuthentication (the requests carry no token, so
it passes them) and a DENY AuthorizationPolicy on a claim, and tracing at Istio's default 1 %
to an OTLP sink in the mesh. The `global` namespace has the same plus a Global rate limit,
which costs a Redis round trip per request. wrk runs at 50 connections against each waypoint
in turn, the order rotating between rounds; the figures are medians over the rounds, and the
waypoints' CPU per request is read from /proc over each run. Target (issue 6): the full
waypoint serves at most 10 % fewer requests/s than the bare one. Writes
bench/results/waypoint_features.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataplane import (
    HTTP_PORT,
    ROOT,
    BenchError,
    ProxyProcess,
    checked_wrk,
    in_pod,
    netns_pids,
    nginx_conf,
    wait_until,
)

from tests.e2e.meshcluster import Cluster, running_cluster

SCENARIOS = ("bare", "full", "global")
CONFIGURED = ("full", "global")
TARGET_RATIO = 0.90
SERVICE_PORT = 80
METRICS = "http://127.0.0.1:15020/metrics"


def url(ns: str) -> str:
    return f"http://server.{ns}.svc.cluster.local/"


def manifest(work: Path) -> str:
    sink = work / "nginx-otlp-sink.conf"
    sink.write_text(
        nginx_conf(work, "sink").read_text().replace(f"listen {HTTP_PORT}", "listen 4318")
    )
    docs = [
        "apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {name: node-1}",
        "apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {name: node-2}",
        # An OTLP/HTTP sink for the 1 % of sampled spans: it answers every POST 200.
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: observability}",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: observability}",
        "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
        "metadata: {name: sink, namespace: observability, labels: {app: sink}}\n"
        f"spec:\n  nodeName: node-1\n  command: [nginx, -c, '{sink}', -g, 'daemon off;']",
        "apiVersion: v1\nkind: Service\nmetadata: {name: sink, namespace: observability}\n"
        "spec:\n  selector: {app: sink}\n  ports: [{name: otlp, port: 4318, targetPort: 4318}]",
    ]
    for ns in SCENARIOS:
        conf = nginx_conf(work, ns)
        docs += [
            f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: "
            "{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}",
            f"apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: default, namespace: {ns}}}",
            "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
            f"metadata: {{name: server, namespace: {ns}, labels: {{app: server, version: v1}}}}\n"
            f"spec:\n  nodeName: node-2\n  command: [nginx, -c, '{conf}', -g, 'daemon off;']",
            "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
            f"metadata: {{name: client, namespace: {ns}, labels: {{app: client}}}}\n"
            "spec:\n  nodeName: node-1\n  command: [sleep, infinity]",
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: {ns}}}\n"
            "spec:\n  selector: {app: server}\n  ports:\n"
            f"  - {{name: http, port: {SERVICE_PORT}, targetPort: {HTTP_PORT}, "
            "appProtocol: http}",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
            f"metadata: {{name: waypoint, namespace: {ns}, "
            "labels: {istio.io/waypoint-for: service}}\n"
            "spec:\n  gatewayClassName: istio-waypoint\n"
            "  listeners: [{name: mesh, port: 15008, protocol: HBONE}]",
        ]
    return "\n---\n".join(docs) + "\n"


def jwks() -> str:
    """A JWK set with one EC public key (the requests carry no token: it is never used)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    key = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    return json.dumps({"keys": [{**key, "kid": "bench", "alg": "ES256"}]})


# Everything of issue 6 that applies to the `full` namespace's Service, none of it firing.
FULL_CONFIG = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: server, namespace: NS}
spec:
  host: server
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 10000, connectTimeout: 5s}
      http: {http1MaxPendingRequests: 10000, http2MaxRequests: 10000, idleTimeout: 300s}
    outlierDetection: {consecutive5xxErrors: 5, baseEjectionTime: 30s, maxEjectionPercent: 50}
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: meshway.io/v1alpha1
kind: FaultInjection
metadata: {name: chaos, namespace: NS}
spec:
  delay: {fixedDelay: 1s, percentage: {value: 0}}
  abort: {httpStatus: 503, percentage: {value: 0}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server, namespace: NS}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: server, port: 80}
        percent: 0
    - type: ExtensionRef
      extensionRef: {group: meshway.io, kind: FaultInjection, name: chaos}
    backendRefs:
    - {group: meshway.io, kind: ServiceSubset, name: server.v1, port: 80}
---
apiVersion: meshway.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: server, namespace: NS}
spec:
  targetRefs: [{kind: Service, name: server}]
  limits:
  - {name: per-client, requests: 1000000, per: 1s, key: {type: SourceIdentity}}
  - {name: per-user, requests: 1000000, per: 1s, key: {type: Header, name: x-user}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: server, namespace: NS}
spec:
  targetRefs: [{kind: Service, name: server}]
  jwtRules:
  - issuer: https://issuer.example
    jwks: 'JWKS'
    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server, namespace: NS}
spec:
  targetRefs: [{kind: Service, name: server}]
  action: DENY
  rules:
  - when: [{key: "request.auth.claims[groups]", values: [blocked]}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: tracing, namespace: NS}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 1
"""
# The same plus a Global limit, far above the load: one Redis round trip per request.
GLOBAL_LIMIT = """\
---
apiVersion: meshway.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: shared, namespace: NS}
spec:
  targetRefs: [{kind: Service, name: server}]
  limits:
  - {name: all, requests: 1000000, per: 1s, scope: Global}
"""
MESH_CONFIG = """\
apiVersion: meshway.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  extensionProviders:
  - name: otel
    opentelemetry:
      service: sink.observability.svc.cluster.local
      port: 4318
      http: {path: /v1/traces}
"""


def configuration(ns: str) -> str:
    text = FULL_CONFIG + (GLOBAL_LIMIT if ns == "global" else "")
    return text.replace("namespace: NS", f"namespace: {ns}").replace("JWKS", jwks())


def configured_kinds() -> list[str]:
    lines = (FULL_CONFIG + GLOBAL_LIMIT + MESH_CONFIG).splitlines()
    return sorted({ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("kind:")})


def waypoint_process(cluster: Cluster, ns: str) -> ProxyProcess:
    """The `meshway.waypoint` process serving namespace `ns` (its sockets are in the pod)."""
    pod = cluster.status()["pods"].get(f"{ns}/waypoint") or {}
    candidates = set(netns_pids(f"mw.{cluster.name}.pod.{ns}.waypoint", lambda _: True))
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
        raise BenchError(f"scenario {ns}: expected one waypoint process, found {len(found)}")
    return ProxyProcess.of(ns, "waypoint", found[0])


def waypoint_requests(cluster: Cluster, ns: str) -> float:
    out = in_pod(
        cluster, ns, "waypoint", "curl", "-s", "--max-time", "5", METRICS, timeout=10
    )  # fmt: skip
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in out.splitlines()
        if line.startswith("istio_requests_total{")
    )


def wait_through_waypoint(cluster: Cluster, ns: str) -> None:
    """Until a request answers 200 and the namespace's waypoint counted it."""

    def ok() -> bool:
        before = waypoint_requests(cluster, ns)
        code = in_pod(
            cluster, ns, "client", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
            "--max-time", "5", url(ns), timeout=10,
        ).strip()  # fmt: skip
        return code == "200" and waypoint_requests(cluster, ns) > before

    wait_until(f"scenario {ns}: GET {url(ns)} through the waypoint", ok, 90, lambda: "")


def one_round(cluster: Cluster, seconds: int, order: tuple[str, ...]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for ns in order:
        proc = waypoint_process(cluster, ns)
        before = proc.cpu_seconds()
        out = in_pod(
            cluster, ns, "client", "wrk", "-t2", "-c50", "--latency", f"-d{seconds}s", url(ns),
            timeout=seconds + 30,
        )  # fmt: skip
        used = proc.cpu_seconds() - before
        figures = checked_wrk(ns, "at 50 connections", out)
        figures["waypoint_cpu_s_per_1000_req"] = round(used / figures["requests"] * 1000, 4)
        figures["waypoint_rss_mb"] = round(proc.rss_mb(), 1)
        results[ns] = figures
    return results


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def summarize(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ("rps", "p50_ms", "p99_ms", "waypoint_cpu_s_per_1000_req", "waypoint_rss_mb")
    return {
        ns: {k: round(statistics.median(r[ns][k] for r in rounds), 4) for k in keys}
        for ns in SCENARIOS
    }


def paired(rounds: list[dict[str, Any]], ns: str, key: str) -> float | None:
    """The median over rounds of `ns` / bare within each round: the runs of one round are
    back to back, so this cancels the machine's drift between rounds."""
    ratios = [r[ns][key] / r["bare"][key] for r in rounds if r["bare"][key]]
    return round(statistics.median(ratios), 3) if ratios else None


def report(result: dict[str, Any]) -> str:
    s, r = result["summary"], result["ratio"]
    rows = [
        ("requests/s, 50 connections", "rps"),
        ("p50 ms", "p50_ms"),
        ("p99 ms", "p99_ms"),
        ("waypoint CPU s per 1000 requests", "waypoint_cpu_s_per_1000_req"),
        ("waypoint RSS MB", "waypoint_rss_mb"),
    ]
    lines = [
        f"## Waypoint features configured, not triggered ({result['date']}, "
        f"{result['rounds']} interleaved rounds of {result['seconds']} s, medians)",
        "",
        "| measure | bare waypoint | configured waypoint | configured + a Global limit |",
        "|---|---|---|---|",
        *[f"| {name} | {s['bare'][k]} | {s['full'][k]} | {s['global'][k]} |" for name, k in rows],
        "",
        "| ratio | value | target |",
        "|---|---|---|",
        f"| requests/s, configured / bare | {r['rps']} | >= {TARGET_RATIO} |",
        f"| the same, median of the rounds' own ratios | {r['rps_paired']} | |",
        f"| waypoint CPU per request, configured / bare | {r['cpu_per_request']} | |",
        f"| the same, median of the rounds' own ratios | {r['cpu_per_request_paired']} | |",
        f"| requests/s, configured + Global limit / bare | {r['global_rps']} | |",
        f"| waypoint CPU per request, configured + Global limit / bare "
        f"| {r['global_cpu_per_request']} | |",
        "",
        f"Configured: {', '.join(result['configured'])}.",
        "",
        f"Machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}. "
        "Command: `python bench/waypoint_features.py`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s: a smoke run")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.seconds, args.rounds = 1, 1
    if os.geteuid() != 0:
        print("this benchmark runs in network namespaces: run it as root", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="meshway-bench-wf-") as tmp:
            work = Path(tmp)
            os.chmod(work, 0o755)
            with running_cluster(work, manifest(work), "--timeout", "120") as cluster:
                try:
                    cluster.apply(MESH_CONFIG)
                    for ns in CONFIGURED:
                        cluster.apply(configuration(ns))
                except AssertionError as exc:
                    raise BenchError(f"the configuration is refused: {exc}") from None
                for ns in SCENARIOS:
                    wait_through_waypoint(cluster, ns)
                time.sleep(1.0)
                rounds = []
                for i in range(args.rounds):
                    print(f"round {i + 1}/{args.rounds}", flush=True)
                    order = SCENARIOS[i % 3 :] + SCENARIOS[: i % 3]
                    rounds.append(one_round(cluster, args.seconds, order))
    except BenchError as exc:
        print(f"waypoint features benchmark failed: {exc}", file=sys.stderr)
        return 1
    summary = summarize(rounds)
    bare, full = summary["bare"], summary["full"]
    result = {
        "benchmark": "waypoint_features",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds": args.seconds,
        "rounds": args.rounds,
        "configured": configured_kinds(),
        "raw": rounds,
        "summary": summary,
        "ratio": {
            "rps": ratio(full["rps"], bare["rps"]),
            "cpu_per_request": ratio(
                full["waypoint_cpu_s_per_1000_req"], bare["waypoint_cpu_s_per_1000_req"]
            ),
            "rps_paired": paired(rounds, "full", "rps"),
            "cpu_per_request_paired": paired(rounds, "full", "waypoint_cpu_s_per_1000_req"),
            "global_rps": ratio(summary["global"]["rps"], bare["rps"]),
            "global_cpu_per_request": ratio(
                summary["global"]["waypoint_cpu_s_per_1000_req"],
                bare["waypoint_cpu_s_per_1000_req"],
            ),
            "target_rps": f">= {TARGET_RATIO}",
        },
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "waypoint_features.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result)
    (args.output / "waypoint_features.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
