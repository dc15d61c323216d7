"""What tracing costs the waypoint per request, in CPU microseconds of the data path.

Runs `WaypointDataPath.serve` (authorization, x-request-id, routing, endpoint pick, the
upstream call answered by a stub, telemetry and the access log into /dev/null) in one event
loop, for: tracing not configured; configured and the request not sampled (with no context,
and with an unsampled parent); sampled (a span per request into a BatchSpanProcessor whose
exporter drops the batches: the event loop's share, the export runs in the SDK's thread).
Reports the median of several rounds. Writes bench/results/tracing_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshway.identity.spiffe import SpiffeId  # noqa: E402
from meshway.waypoint.messages import Body, Request, Response  # noqa: E402
from meshway.waypoint.proxy import Downstream, WaypointDataPath  # noqa: E402
from meshway.waypoint.tracing import TracingConfig, WaypointTracer  # noqa: E402
from tests.unit.test_waypoint_proxy import datapath  # noqa: E402
from tests.unit.test_waypoint_tracing import mesh_config, telemetry  # noqa: E402

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-"


def traced(dp: WaypointDataPath, percentage: float, tracer: Any) -> None:
    config = TracingConfig.build(
        [
            mesh_config(),
            telemetry(
                "mesh",
                "istio-system",
                tracing=[{"providers": [{"name": "otel"}], "randomSamplingPercentage": percentage}],
            ),
        ],
        ("shop", "waypoint"),
        "istio-system",
    )
    dp.tracer = WaypointTracer(config, {"otel": tracer}, "waypoint~shop/waypoint", "cluster.local")


async def per_request_us(dp: WaypointDataPath, headers: Sequence[tuple[str, str]], n: int) -> float:
    dest = dp.destination("10.96.0.10", 80)
    assert dest is not None
    down = Downstream(SpiffeId("cluster.local", "shop", "client"), "10.244.0.9", None, dest)

    async def upstream(endpoint: Any, request: Request, http2: bool) -> Response:
        return Response(200, [("content-type", "text/plain")], Body.of(b"ok"))

    dp.upstream.request = upstream  # type: ignore[method-assign]
    started = time.process_time()
    for _ in range(n):
        request = Request("GET", "/api?x=1", "web", [("user-agent", "bench"), *headers])
        response = await dp.serve(down, request)
        await response.body.read_all()
    return (time.process_time() - started) / n * 1e6


async def run(n: int, rounds: int) -> dict[str, Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=2048))
    tracer = provider.get_tracer("bench")
    cases: dict[str, tuple[float | None, list[tuple[str, str]]]] = {
        "not configured": (None, []),
        "configured, not sampled (no context)": (0.0, []),
        "configured, not sampled (unsampled parent)": (
            100.0,
            [("traceparent", TRACEPARENT + "00")],
        ),
        "sampled (sampled parent)": (0.0, [("traceparent", TRACEPARENT + "01")]),
        "sampled (no context, 100 %)": (100.0, []),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    dp = datapath()
    dp.access_log_enabled = False  # the same for every case; keeps stderr quiet
    for _ in range(rounds):
        for name, (percentage, headers) in cases.items():
            dp.tracer = None
            if percentage is not None:
                traced(dp, percentage, tracer)
            await per_request_us(dp, headers, n // 10)  # warm up
            results[name].append(await per_request_us(dp, headers, n))
    provider.shutdown()
    base = statistics.median(results["not configured"])
    return {
        "requests_per_round": n,
        "rounds": rounds,
        "python": sys.version.split()[0],
        "us_per_request": {k: round(statistics.median(v), 2) for k, v in results.items()},
        "added_us_per_request": {
            k: round(statistics.median(v) - base, 2) for k, v in results.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(run(args.requests, args.rounds))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracing_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
