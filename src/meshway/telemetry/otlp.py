"""OTLP/HTTP span export with the OpenTelemetry SDK, loaded only when tracing is configured.

Nothing here is imported by a proxy that traces nothing: the SDK, the exporter and their
protobuf modules cost several MiB of RSS (the waypoint's is a tracked target).

The `xds-protos` wheel ships its own, older `opentelemetry/proto/...` modules; installed over
`opentelemetry-proto`'s, the OTLP encoder fails to import. `check_otel_protos` finds that at
the start of tracing and says how to fix it (`make setup` does the fix, decision 0011).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

OTLP_FIX = (
    "the opentelemetry-proto modules are not the ones the OTLP exporter needs (xds-protos "
    "installs older copies over them); fix: `make otel-protos` (a step of `make setup`), or "
    "`.venv/bin/pip install --force-reinstall --no-deps opentelemetry-proto=={version}`"
)


class TracingUnavailable(RuntimeError):
    """Tracing is configured but cannot run in this installation."""


def _proto_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("opentelemetry-proto")
    except importlib.metadata.PackageNotFoundError:
        return "<version>"


def check_otel_protos() -> None:
    """Raise TracingUnavailable naming the fix when the OTLP exporter cannot load its protos."""
    try:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import (  # noqa: F401
            encode_spans,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: F401
            OTLPSpanExporter,
        )
        from opentelemetry.proto.common.v1.common_pb2 import (  # noqa: F401
            InstrumentationScope,
        )
    except ImportError as exc:
        raise TracingUnavailable(f"{OTLP_FIX.format(version=_proto_version())} ({exc})") from exc


# BatchSpanProcessor's bounds: spans beyond the queue are dropped, never waited for.
MAX_QUEUE = 2048
MAX_BATCH = 512
SCHEDULE_DELAY_MS = 1000
EXPORT_TIMEOUT_S = 10.0


def otlp_tracer_provider(
    endpoint: str,
    service_name: str,
    resource_attributes: dict[str, str],
    *,
    thread_init: Callable[[], None] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = EXPORT_TIMEOUT_S,
    schedule_delay_ms: int = SCHEDULE_DELAY_MS,
) -> TracerProvider:
    """A TracerProvider whose spans go, in batches from a worker thread, to `endpoint`
    (`http://ip:port/path`) as OTLP/HTTP protobuf.

    `thread_init` runs once in the exporting thread before its first export: the waypoint
    uses it to move that thread into its pod's network namespace, where the collector is
    reachable (a thread's namespace is its own).
    """
    check_otel_protos()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    class _ThreadInitExporter(SpanExporter):
        """The OTLP exporter, with `thread_init` run once in each exporting thread first
        (the SDK's worker, or a thread that flushes). Never in the main thread, which runs
        the event loop and must stay in its own namespace."""

        def __init__(self, inner: SpanExporter, init: Callable[[], None]) -> None:
            self._inner = inner
            self._init = init
            self._done = threading.local()

        def export(self, spans: Any) -> Any:
            if not getattr(self._done, "value", False):
                if threading.current_thread() is threading.main_thread():
                    from opentelemetry.sdk.trace.export import SpanExportResult

                    return SpanExportResult.FAILURE
                self._init()
                self._done.value = True
            return self._inner.export(spans)

        def shutdown(self) -> None:
            self._inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(self._inner.force_flush(timeout_millis))

    exporter: SpanExporter = OTLPSpanExporter(
        endpoint=endpoint, headers=headers or None, timeout=timeout
    )
    if thread_init is not None:
        exporter = _ThreadInitExporter(exporter, thread_init)
    resource = Resource.create({"service.name": service_name, **resource_attributes})
    # Meshway decides sampling itself (the parent's flag, else the configured percentage)
    # before a span exists; a span the SDK is asked for is one that was chosen.
    provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=MAX_QUEUE,
            max_export_batch_size=MAX_BATCH,
            schedule_delay_millis=schedule_delay_ms,
        )
    )
    return provider
