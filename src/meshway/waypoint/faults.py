"""Fault injection at the waypoint: a delay and an abort, each for a share of requests.

The semantics are Envoy's HTTP fault filter as Istio configures it for a VirtualService's
`fault`, and the same for Meshway's `FaultInjection` resource (an HTTPRoute/GRPCRoute
`ExtensionRef` filter):

- per route rule, after the route matched and before a backend is picked (Envoy's fault filter
  runs before the router), so a delay is not counted against the rule's request timeout;
- the delay first, then the abort, each drawn on its own: a request may be delayed and then
  aborted;
- a share that is not given is 0 (no request is faulted), as Istio's translation leaves it;
- the delay is an asyncio sleep: other requests go on meanwhile;
- an abort with an HTTP status answers with that status and the body `fault filter abort`
  (a gRPC client gets it mapped to a gRPC status by the data path); an abort with a gRPC
  status answers trailers-only (HTTP 200, `grpc-status`, `grpc-message: fault filter abort`);
- the response flags are Envoy's: `DI` delayed, `FI` aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from meshway.config.model import HTTPFaultInjection, duration_seconds, grpc_status_code
from meshway.waypoint.messages import Body, Response

ABORT_BODY = "fault filter abort"
DELAY_FLAG = "DI"
ABORT_FLAG = "FI"


@dataclass(frozen=True, slots=True)
class Fault:
    """A compiled fault: `delay` seconds for a `delay_fraction` of requests, and an abort with
    `abort_status` (HTTP) or `abort_grpc` (a gRPC status) for an `abort_fraction` of them."""

    delay: float = 0.0
    delay_fraction: float = 0.0
    abort_status: int | None = None
    abort_grpc: int | None = None
    abort_fraction: float = 0.0
    # Where it comes from ("FaultInjection shop/flaky", "VirtualService shop/web http[0]").
    source: str = ""

    @property
    def active(self) -> bool:
        """False for a fault that can never fire (its percentages are 0): nothing to draw."""
        return (self.delay_fraction > 0 and self.delay > 0) or self.abort_fraction > 0

    def draw_delay(self, rand: Callable[[], float]) -> float | None:
        """The delay for this request, or None when the draw spares it."""
        if self.delay_fraction > 0 and self.delay > 0 and rand() < self.delay_fraction:
            return self.delay
        return None

    def draw_abort(self, rand: Callable[[], float]) -> Response | None:
        """The abort answer for this request, or None when the draw spares it."""
        if self.abort_fraction > 0 and rand() < self.abort_fraction:
            return self.abort_response()
        return None

    def abort_response(self) -> Response:
        if self.abort_grpc is not None:
            return Response(
                200,
                [
                    ("content-type", "application/grpc"),
                    ("grpc-status", str(self.abort_grpc)),
                    ("grpc-message", ABORT_BODY),
                ],
                Body.of(),
            )
        body = ABORT_BODY.encode()
        return Response(
            self.abort_status or 503,
            [("content-type", "text/plain"), ("content-length", str(len(body)))],
            Body.of(body),
        )


def compile_fault(spec: HTTPFaultInjection, source: str = "") -> Fault:
    """A validated `HTTPFaultInjection` (VirtualService `fault`, FaultInjection `spec`)."""
    delay = spec.delay
    abort = spec.abort
    return Fault(
        delay=duration_seconds(delay.fixed_delay) if delay is not None else 0.0,
        delay_fraction=delay.fraction if delay is not None else 0.0,
        abort_status=abort.http_status if abort is not None else None,
        abort_grpc=(
            grpc_status_code(abort.grpc_status)
            if abort is not None and abort.grpc_status is not None
            else None
        ),
        abort_fraction=abort.fraction if abort is not None else 0.0,
        source=source,
    )


async def inject(fault: Fault, rand: Callable[[], float]) -> tuple[str, Response | None]:
    """Run `fault` on one request: sleep if its delay is drawn, then draw its abort.

    Returns the response flags it adds ("", "DI", "FI" or "DI,FI") and the abort answer, if
    any (None: the request goes on).
    """
    flags = ""
    delay = fault.draw_delay(rand)
    if delay is not None:
        await asyncio.sleep(delay)
        flags = DELAY_FLAG
    answer = fault.draw_abort(rand)
    if answer is not None:
        flags = f"{flags},{ABORT_FLAG}" if flags else ABORT_FLAG
    return flags, answer


# The order Envoy lists response flags in (`ResponseFlagUtils`), for the ones the waypoint sets.
_FLAG_ORDER = {
    flag: i
    for i, flag in enumerate(
        ("UH", "UT", "UF", "UC", "UO", "NR", "DI", "FI", "URX", "NC", "DC"),
    )
}


def merge_flags(flags: str, extra: str) -> str:
    """`flags` ("-" for none) with the flags in `extra` added, in Envoy's order."""
    if not extra:
        return flags
    parts = {p for p in flags.split(",") if p and p != "-"} | set(extra.split(","))
    return ",".join(sorted(parts, key=lambda f: (_FLAG_ORDER.get(f, len(_FLAG_ORDER)), f)))
