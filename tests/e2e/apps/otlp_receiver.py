"""An OTLP/HTTP trace receiver for the tracing end-to-end tests, run inside a pod.

otlp_receiver.py PORT   accepts POST /v1/traces (protobuf ExportTraceServiceRequest, decoded
                        with opentelemetry-proto) and answers GET /spans with every span
                        received so far as JSON (ids in hex, attributes as strings)
"""

from __future__ import annotations

import sys
from typing import Any


def main(port: int) -> None:
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    spans: list[dict[str, Any]] = []

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        try:
            message.ParseFromString(await request.read())
        except Exception as exc:  # garbage: a clear 400, as a collector answers
            return web.Response(status=400, text=f"not an ExportTraceServiceRequest: {exc}")
        for resource_spans in message.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        {
                            "name": span.name,
                            "kind": span.kind,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "attributes": {a.key: a.value.string_value for a in span.attributes},
                            "resource": resource,
                        }
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def listing(request: web.Request) -> web.Response:
        return web.json_response(spans)

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/spans", listing)
    web.run_app(app, host="0.0.0.0", port=port, print=None, access_log=None)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(int(sys.argv[1]))
