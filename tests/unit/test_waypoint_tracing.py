"""Request tracing at the waypoint: context parsing and injection, Telemetry configuration,
sampling, the span itself, and export to a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from meshway.config.errors import FieldError
from meshway.config.model import KINDS, MeshConfig, Telemetry
from meshway.identity.spiffe import SpiffeId
from meshway.telemetry import otlp
from meshway.waypoint.messages import Body, Request, Response
from meshway.waypoint.proxy import Downstream, WaypointDataPath
from meshway.waypoint.tracing import (
    B3_MULTI,
    B3_SINGLE,
    Incoming,
    TracingConfig,
    TracingProviders,
    WaypointTracer,
    build_tracer,
    extract,
    inject,
    new_unsampled_traceparent,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
    parse_tracestate,
    provider_endpoint,
    service_vip,
)
from tests.unit.test_waypoint_proxy import datapath

pytestmark = pytest.mark.unit

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TP = f"00-{TRACE}-{SPAN}-01"


# -- W3C and B3 parsing ----------------------------------------------------------------------


def test_traceparent_valid_and_unsampled() -> None:
    assert parse_traceparent(TP) == (int(TRACE, 16), int(SPAN, 16), True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00") == (int(TRACE, 16), int(SPAN, 16), False)
    # A later version may carry more fields; its flags are read the same way.
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-03-extra") == (
        int(TRACE, 16),
        int(SPAN, 16),
        True,
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper case is invalid
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-0g",
        f"00_{TRACE}_{SPAN}_01",
    ],
)
def test_invalid_traceparent_is_ignored(value: str) -> None:
    assert parse_traceparent(value) is None


def test_b3_single_header() -> None:
    full = parse_b3_single(f"{TRACE}-{SPAN}-1-{'1' * 16}")
    assert full == Incoming(int(TRACE, 16), int(SPAN, 16), True, B3_SINGLE, TRACE)
    short = parse_b3_single(f"{TRACE[16:]}-{SPAN}")  # 64-bit trace id, no decision
    assert short is not None and short.trace_id == int(TRACE[16:], 16) and short.sampled is None
    assert parse_b3_single(f"{TRACE}-{SPAN}-0") is not None
    assert parse_b3_single(f"{TRACE}-{SPAN}-0").sampled is False  # type: ignore[union-attr]
    assert parse_b3_single(f"{TRACE}-{SPAN}-d").sampled is True  # type: ignore[union-attr]
    assert parse_b3_single("0") == Incoming(0, 0, False, B3_SINGLE)
    assert parse_b3_single("1") == Incoming(0, 0, True, B3_SINGLE)
    for bad in ("", "x", f"{TRACE}", f"{'0' * 32}-{SPAN}-1", f"{TRACE}-{SPAN}-7", f"{TRACE}-zz"):
        assert parse_b3_single(bad) is None, bad


def test_b3_multi_headers() -> None:
    got = parse_b3_multi(TRACE, SPAN, "1", None)
    assert got == Incoming(int(TRACE, 16), int(SPAN, 16), True, B3_MULTI, TRACE)
    assert parse_b3_multi(TRACE, SPAN, "0", None).sampled is False  # type: ignore[union-attr]
    assert parse_b3_multi(TRACE, SPAN, None, "1").sampled is True  # type: ignore[union-attr]
    assert parse_b3_multi(TRACE, SPAN, None, None).sampled is None  # type: ignore[union-attr]
    assert parse_b3_multi(None, None, "0", None) == Incoming(0, 0, False, B3_MULTI)
    assert parse_b3_multi(TRACE, None, "1", None) is None
    assert parse_b3_multi("0" * 16, SPAN, "1", None) is None


def test_extract_prefers_a_valid_traceparent_and_falls_back_to_b3() -> None:
    b3 = f"{'a' * 32}-{'b' * 16}-1"
    both = extract([("traceparent", TP), ("b3", b3)])
    assert both is not None and both.trace_id == int(TRACE, 16) and both.b3 == B3_SINGLE
    fallback = extract([("traceparent", "bogus"), ("b3", b3)])
    assert fallback is not None and fallback.trace_id == int("a" * 32, 16)
    assert extract([("traceparent", "bogus")]) is None
    assert extract([("host", "x")]) is None


def test_tracestate_members_and_invalid_headers() -> None:
    assert parse_tracestate("rojo=00f067aa0ba902b7, congo=t61rcWkgMzE,,") == [
        ("rojo", "00f067aa0ba902b7"),
        ("congo", "t61rcWkgMzE"),
    ]
    assert parse_tracestate("tenant@vendor=x") == [("tenant@vendor", "x")]
    for bad in (
        "garbage",
        "Upper=1",
        "a=1,a=2",
        "a=",
        "a=b=c",
        ",".join(f"k{i}=v" for i in range(33)),
    ):
        assert parse_tracestate(bad) is None, bad


# -- injection --------------------------------------------------------------------------------


def test_inject_w3c_keeps_tracestate_and_baggage() -> None:
    headers = [("traceparent", TP), ("tracestate", "vendor=1"), ("baggage", "k=v")]
    inject(headers, int(TRACE, 16), 0x1234, True, extract(headers))
    assert dict(headers) == {
        "traceparent": f"00-{TRACE}-{0x1234:016x}-01",
        "tracestate": "vendor=1",
        "baggage": "k=v",
    }
    assert [k for k, _ in headers].count("traceparent") == 1


def test_inject_b3_single_and_multi_keep_the_incoming_width_and_parent() -> None:
    headers = [("b3", f"{TRACE[16:]}-{SPAN}-1")]
    incoming = extract(headers)
    inject(headers, int(TRACE[16:], 16), 0xABC, True, incoming)
    values = dict(headers)
    assert values["b3"] == f"{TRACE[16:]}-{0xABC:016x}-1-{SPAN}"
    # W3C needs 128 bits: the 64-bit B3 trace id is left-padded.
    assert values["traceparent"] == f"00-{'0' * 16}{TRACE[16:]}-{0xABC:016x}-01"

    headers = [("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "1")]
    inject(headers, int(TRACE, 16), 0xDEF, True, extract(headers))
    values = dict(headers)
    assert values["x-b3-traceid"] == TRACE
    assert values["x-b3-spanid"] == f"{0xDEF:016x}"
    assert values["x-b3-parentspanid"] == SPAN
    assert values["x-b3-sampled"] == "1"
    assert len(headers) == 5


# -- configuration ----------------------------------------------------------------------------


def mesh_config(**http: Any) -> MeshConfig:
    return MeshConfig.model_validate(
        {
            "apiVersion": "meshway.io/v1alpha1",
            "kind": "MeshConfig",
            "metadata": {"name": "mesh"},
            "spec": {
                "extensionProviders": [
                    {
                        "name": "otel",
                        "opentelemetry": {
                            "service": "collector.obs.svc.cluster.local",
                            "port": 4318,
                            "http": {"path": "/v1/traces", **http},
                        },
                    }
                ]
            },
        }
    )


def telemetry(name: str, namespace: str, **spec: Any) -> Telemetry:
    return Telemetry.model_validate(
        {
            "apiVersion": "telemetry.istio.io/v1",
            "kind": "Telemetry",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def test_telemetry_layers_override_field_by_field() -> None:
    objects = [
        mesh_config(),
        telemetry("mesh", "istio-system", tracing=[{"providers": [{"name": "otel"}]}]),
        telemetry("ns", "shop", tracing=[{"randomSamplingPercentage": 25}]),
        telemetry(
            "svc",
            "shop",
            targetRefs=[{"kind": "Service", "group": "", "name": "web"}],
            tracing=[
                {
                    "randomSamplingPercentage": 100,
                    "customTags": {"team": {"literal": {"value": "a"}}},
                }
            ],
        ),
        telemetry(
            "client-only",
            "other",
            tracing=[{"match": {"mode": "CLIENT"}, "randomSamplingPercentage": 50}],
        ),
        telemetry("off", "quiet", tracing=[{"disableSpanReporting": True}]),
    ]
    config = TracingConfig.build(objects, ("shop", "waypoint"), "istio-system")
    assert config.enabled
    web = config.settings("shop", "web")
    assert web is not None and web.provider == "otel" and web.percentage == 100
    assert web.custom_tags == (("team", "literal", "a", None),)
    db = config.settings("shop", "db")
    assert db is not None and db.percentage == 25 and not db.custom_tags
    # Nothing in the namespace: the mesh-wide Telemetry and Istio's default of 1 %.
    elsewhere = config.settings("else", "x")
    assert elsewhere is not None and elsewhere.percentage == 1.0
    # A CLIENT-only entry is not the waypoint's: the mesh-wide one applies.
    other = config.settings("other", "x")
    assert other is not None and other.percentage == 1.0
    quiet = config.settings("quiet", "x")
    assert quiet is not None and not quiet.report
    # A Telemetry attached to this waypoint's Gateway sits between the namespace and the
    # Service; one attached to another Gateway does nothing here.
    gateway = telemetry(
        "gw",
        "shop",
        targetRefs=[{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
        tracing=[{"randomSamplingPercentage": 60}],
    )
    other = telemetry(
        "other-gw",
        "shop",
        targetRefs=[{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "east"}],
        tracing=[{"randomSamplingPercentage": 70}],
    )
    config = TracingConfig.build([*objects, gateway, other], ("shop", "waypoint"), "istio-system")
    assert config.settings("shop", "db").percentage == 60  # type: ignore[union-attr]
    assert config.settings("shop", "web").percentage == 100  # type: ignore[union-attr]
    east = TracingConfig.build([*objects, gateway, other], ("shop", "east"), "istio-system")
    assert east.settings("shop", "db").percentage == 70  # type: ignore[union-attr]


def test_no_provider_no_tracing_and_default_providers() -> None:
    only_telemetry = [telemetry("t", "istio-system", tracing=[{"randomSamplingPercentage": 5}])]
    config = TracingConfig.build(only_telemetry, ("shop", "waypoint"), "istio-system")
    assert not config.enabled and config.settings("shop", "web") is None
    data = mesh_config().to_dict()
    data["spec"]["defaultProviders"] = {"tracing": ["otel"]}
    defaults = MeshConfig.model_validate(data)
    config = TracingConfig.build([defaults], ("shop", "waypoint"), "istio-system")
    assert config.enabled
    web = config.settings("shop", "web")
    assert web is not None and web.provider == "otel" and web.percentage == 1.0


@pytest.mark.parametrize(
    ("kind", "doc", "message"),
    [
        ("Telemetry", {"tracing": [{"randomSamplingPercentage": 101}]}, "less than or equal"),
        (
            "Telemetry",
            {
                "targetRefs": [
                    {"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "x"}
                ]
            },
            "Telemetry can target a Service or a waypoint Gateway",
        ),
        ("Telemetry", {"tracing": [{"providers": [{"name": "a"}, {"name": "b"}]}]}, "at most 1"),
        (
            "Telemetry",
            {
                "tracing": [
                    {"customTags": {"t": {"literal": {"value": "a"}, "header": {"name": "x"}}}}
                ]
            },
            "exactly one of literal, environment, header",
        ),
        (
            "MeshConfig",
            {
                "extensionProviders": [
                    {"name": "o", "opentelemetry": {"service": "c", "port": 4317}}
                ]
            },
            "OTLP/gRPC export is not supported",
        ),
        (
            "MeshConfig",
            {"defaultProviders": {"tracing": ["nope"]}},
            "no extensionProvider named 'nope'",
        ),
    ],
)
def test_config_validation_errors(kind: str, doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KINDS[kind].model_validate(
            {
                "kind": kind,
                "metadata": {"name": "mesh", "namespace": "shop"}
                if kind == "Telemetry"
                else {"name": "mesh"},
                "spec": doc,
            }
        )


def test_mesh_config_is_a_cluster_scoped_singleton() -> None:
    with pytest.raises(ValueError, match="singleton"):
        MeshConfig.model_validate({"metadata": {"name": "other"}})
    with pytest.raises((ValueError, FieldError), match="cluster-scoped"):
        MeshConfig.model_validate({"metadata": {"name": "mesh", "namespace": "x"}})


def test_provider_endpoint_resolves_service_hosts_from_state() -> None:
    dp = datapath()
    services = list(dp.state.services.values())
    assert service_vip(services, "web.shop.svc.cluster.local") == "10.96.0.10"
    assert service_vip(services, "shop/web.shop.svc.cluster.local") == "10.96.0.10"
    assert service_vip(services, "other/web.shop.svc.cluster.local") is None
    provider = mesh_config(timeout="2s", headers=[{"name": "x-token", "value": "t"}])
    endpoint = provider_endpoint(provider.spec.extension_providers[0], lambda h: "10.96.0.99")
    assert endpoint is not None
    assert endpoint.url == "http://10.96.0.99:4318/v1/traces"
    assert endpoint.timeout == 2.0 and endpoint.headers == (("x-token", "t"),)
    assert provider_endpoint(provider.spec.extension_providers[0], lambda h: None) is None


# -- spans through the data path ----------------------------------------------------------------


class Rand:
    """A stand-in for random.random with chosen draws."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


@pytest.fixture
def spans() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter, provider
    provider.shutdown()


def traced_datapath(
    provider: TracerProvider, percentage: float = 100.0
) -> tuple[WaypointDataPath, list[Request]]:
    dp = datapath()
    config = TracingConfig.build(
        [
            mesh_config(),
            telemetry(
                "mesh",
                "istio-system",
                tracing=[
                    {
                        "providers": [{"name": "otel"}],
                        "randomSamplingPercentage": percentage,
                        "customTags": {"tenant": {"header": {"name": "x-tenant"}}},
                    }
                ],
            ),
        ],
        ("shop", "waypoint"),
        "istio-system",
    )
    dp.tracer = WaypointTracer(
        config, {"otel": provider.get_tracer("test")}, "waypoint~shop/waypoint", "cluster.local"
    )
    sent: list[Request] = []

    async def request(endpoint: Any, req: Request, http2: bool, *_: Any) -> Response:
        sent.append(req)
        return Response(200, [("content-type", "text/plain")], Body.of(b"ok"))

    dp.upstream.request = request  # type: ignore[method-assign]
    return dp, sent


async def call(dp: WaypointDataPath, headers: list[tuple[str, str]]) -> Response:
    dest = dp.destination("10.96.0.10", 80)
    assert dest is not None
    down = Downstream(SpiffeId("cluster.local", "shop", "client"), "10.244.0.9", None, dest)
    response = await dp.serve(down, Request("GET", "/a?b=1", "web", list(headers)))
    await response.body.read_all()
    return response


async def test_sampled_parent_gives_a_child_server_span_and_the_upstream_its_id(
    spans: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = spans
    dp, sent = traced_datapath(provider, percentage=0)  # the parent's flag wins
    headers = [("traceparent", TP), ("tracestate", "v=1"), ("baggage", "k=v"), ("x-tenant", "t1")]
    await call(dp, headers)
    (span,) = exporter.get_finished_spans()
    ctx = span.get_span_context()
    assert ctx is not None and f"{ctx.trace_id:032x}" == TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == SPAN
    assert span.kind is SpanKind.SERVER
    assert span.name == "web.shop.svc.cluster.local:80/*"
    attrs = dict(span.attributes or {})
    assert attrs["http.method"] == "GET" and attrs["http.url"] == "http://web/a?b=1"
    assert attrs["http.status_code"] == "200" and attrs["response_flags"] == "-"
    assert attrs["upstream_address"] in ("10.244.1.2:8080", "10.244.1.3:8080")
    assert attrs["upstream_cluster"] == "web.shop.svc.cluster.local"
    assert attrs["source_principal"] == "spiffe://cluster.local/ns/shop/sa/client"
    assert attrs["peer.address"] == "10.244.0.9"
    assert attrs["node_id"] == "waypoint~shop/waypoint" and attrs["tenant"] == "t1"
    upstream = dict(sent[0].headers)
    assert attrs["guid:x-request-id"] == upstream["x-request-id"]
    assert upstream["traceparent"] == f"00-{TRACE}-{ctx.span_id:016x}-01"
    assert upstream["tracestate"] == "v=1" and upstream["baggage"] == "k=v"
    assert dict(ctx.trace_state) == {"v": "1"}  # the span continues the client's tracestate


async def test_garbage_context_headers_are_ignored_quietly(
    spans: tuple[InMemorySpanExporter, TracerProvider], caplog: pytest.LogCaptureFixture
) -> None:
    exporter, provider = spans
    dp, sent = traced_datapath(provider, percentage=100)
    garbage = [
        ("traceparent", "00-zz"),
        ("tracestate", "\x00junk,,=="),
        ("b3", "-"),
        ("x-b3-spanid", "q"),
    ]
    response = await call(dp, garbage)
    assert response.status == 200
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and not span.context.trace_state  # a new trace
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    upstream = dict(sent[0].headers)
    assert upstream["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"


async def test_unsampled_parent_gives_no_span_and_keeps_the_headers(
    spans: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = spans
    dp, sent = traced_datapath(provider, percentage=100)
    await call(dp, [("traceparent", f"00-{TRACE}-{SPAN}-00")])
    await call(dp, [("b3", "0")])
    assert exporter.get_finished_spans() == ()
    assert dict(sent[0].headers)["traceparent"] == f"00-{TRACE}-{SPAN}-00"
    assert dict(sent[1].headers)["b3"] == "0"


async def test_b3_request_gets_b3_and_w3c_with_the_waypoint_span(
    spans: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = spans
    dp, sent = traced_datapath(provider, percentage=0)
    await call(dp, [("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "1")])
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None and f"{span.parent.span_id:016x}" == SPAN
    own = f"{span.context.span_id:016x}"
    upstream = dict(sent[0].headers)
    assert upstream["x-b3-spanid"] == own and upstream["x-b3-parentspanid"] == SPAN
    assert upstream["traceparent"] == f"00-{TRACE}-{own}-01"


async def test_root_requests_are_sampled_by_percentage(
    spans: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = spans
    dp, sent = traced_datapath(provider, percentage=30)
    assert dp.tracer is not None
    dp.tracer._rand = Rand(0.5)  # above 30 %: not sampled, but the decision travels on
    await call(dp, [])
    assert exporter.get_finished_spans() == ()
    unsampled = parse_traceparent(dict(sent[0].headers)["traceparent"])
    assert unsampled is not None and unsampled[2] is False
    dp.tracer._rand = Rand(0.1)
    await call(dp, [])
    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    sampled = dict(sent[1].headers)["traceparent"]
    assert sampled == f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"


async def test_sampling_rate_of_real_draws(
    spans: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = spans
    dp, _ = traced_datapath(provider, percentage=20)
    for _ in range(2000):
        await call(dp, [])
    share = len(exporter.get_finished_spans()) / 2000
    assert 0.15 < share < 0.25  # 20 %, with room for chance (about 5 sigma)


async def test_errors_mark_the_span(spans: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    exporter, provider = spans
    dp, _ = traced_datapath(provider)

    async def fail(endpoint: Any, req: Request, http2: bool, *_: Any) -> Response:
        return Response(503, [], Body.of(b"no"))

    dp.upstream.request = fail  # type: ignore[method-assign]
    await call(dp, [("traceparent", TP)])
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["http.status_code"] == "503"
    assert span.attributes["error"] == "true" and not span.status.is_ok


async def test_grpc_status_from_trailers(
    spans: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = spans
    dp, _ = traced_datapath(provider)

    async def grpc(endpoint: Any, req: Request, http2: bool, *_: Any) -> Response:
        return Response(
            200, [("content-type", "application/grpc")], Body.of(b"", [("grpc-status", "5")])
        )

    dp.upstream.request = grpc  # type: ignore[method-assign]
    await call(dp, [("traceparent", TP), ("content-type", "application/grpc")])
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["grpc.status_code"] == "5"


# -- export over OTLP/HTTP ------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """A real OTLP/HTTP receiver on loopback: POST /v1/traces, protobuf."""
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1/traces", received
    finally:
        await runner.cleanup()


async def test_spans_reach_an_otlp_http_receiver(
    receiver: tuple[str, list[ExportTraceServiceRequest]],
) -> None:
    url, received = receiver
    threads: list[str] = []
    provider = otlp.otlp_tracer_provider(
        url,
        "waypoint.shop",
        {"k8s.namespace.name": "shop"},
        thread_init=lambda: threads.append(threading.current_thread().name),
    )
    try:
        dp, _ = traced_datapath(provider)
        await call(dp, [("traceparent", TP)])
        await asyncio.to_thread(provider.force_flush)  # the exporter blocks: not on the loop
    finally:
        await asyncio.to_thread(provider.shutdown)
    assert threads and threading.main_thread().name not in threads
    spans = [
        (rs.resource, span)
        for message in received
        for rs in message.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    assert len(spans) == 1
    resource, span = spans[0]
    assert span.trace_id.hex() == TRACE and span.parent_span_id.hex() == SPAN
    assert span.kind == span.SPAN_KIND_SERVER
    assert span.name == "web.shop.svc.cluster.local:80/*"
    names = {a.key: a.value.string_value for a in resource.attributes}
    assert names["service.name"] == "waypoint.shop"


async def test_build_tracer_makes_providers_only_when_traced(
    receiver: tuple[str, list[ExportTraceServiceRequest]],
) -> None:
    providers = TracingProviders("waypoint.shop", {})
    try:
        args = (("shop", "waypoint"), "istio-system", lambda h: "127.0.0.1", providers)
        kw = {"node_id": "n", "mesh_id": "cluster.local"}
        assert build_tracer([mesh_config()], *args, **kw) is None  # type: ignore[arg-type]
        assert providers._providers == {}
        traced = [
            mesh_config(),
            telemetry("t", "istio-system", tracing=[{"providers": [{"name": "otel"}]}]),
        ]
        tracer = build_tracer(traced, *args, **kw)  # type: ignore[arg-type]
        assert tracer is not None and len(providers._providers) == 1
        again = build_tracer(traced, *args, **kw)  # type: ignore[arg-type]
        assert again is not None and len(providers._providers) == 1  # reused, not rebuilt
        assert build_tracer([], *args, **kw) is None  # type: ignore[arg-type]
        assert providers._providers == {}  # shut down once unused
    finally:
        providers.close()


def test_wrong_opentelemetry_protos_are_reported_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = types.ModuleType("opentelemetry.proto.common.v1.common_pb2")  # like xds-protos' copy
    monkeypatch.setitem(sys.modules, "opentelemetry.proto.common.v1.common_pb2", old)
    with pytest.raises(otlp.TracingUnavailable, match="--force-reinstall --no-deps opentelemetry"):
        otlp.check_otel_protos()
    providers = TracingProviders("waypoint.shop", {})
    assert providers.tracers({"otel": _endpoint()}) == {}
    assert providers.unavailable is not None and "make otel-protos" in providers.unavailable


def _endpoint() -> Any:
    from meshway.waypoint.tracing import OtlpEndpoint

    return OtlpEndpoint("http://127.0.0.1:9/v1/traces")


def test_a_waypoint_that_traces_nothing_does_not_load_opentelemetry() -> None:
    """The SDK and the exporter cost RSS (a tracked target): loaded only once configured.
    So do redis-py (24 MiB with the OpenTelemetry metrics SDK it loads), PyJWT and httpcore:
    only on a Global limit's first check or a RequestAuthentication's first key set."""
    import subprocess

    heavy = ("opentelemetry", "redis", "jwt", "httpcore", "anyio")
    code = (
        "import sys, meshway.waypoint.server, meshway.waypoint.proxy;"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_telemetry_and_mesh_config_reach_waypoints_as_route_resources() -> None:
    import json

    from meshway.controlplane.translate import MeshSettings, MeshTranslator
    from meshway.xds.types import ROUTE_TYPE, check_route

    translator = MeshTranslator(MeshSettings())
    objects = [
        mesh_config(),
        telemetry("mesh", "istio-system", tracing=[{"providers": [{"name": "otel"}]}]),
    ]
    (change,) = translator.full(objects, "1")
    assert change.type_url == ROUTE_TYPE
    assert set(change.updated) == {"/MeshConfig/mesh", "istio-system/Telemetry/mesh"}
    from meshway.api.v1 import route_pb2

    for name, resource in change.updated.items():
        message = route_pb2.Route()
        resource.proto.resource.Unpack(message)
        check_route(name, message)  # what the waypoint's xDS client checks before it ACKs
        assert KINDS[message.kind].model_validate(json.loads(message.resource_json)) in objects
    # A Telemetry the waypoint would not understand is NACKed, not half-applied.
    bad = route_pb2.Route(
        kind="Telemetry",
        namespace="shop",
        name="t",
        resource_json=json.dumps(
            {
                "kind": "Telemetry",
                "metadata": {"name": "t", "namespace": "shop"},
                "spec": {"tracing": [{"randomSamplingPercentage": 500}]},
            }
        ),
    )
    with pytest.raises(ValueError, match="randomSamplingPercentage"):
        check_route("shop/Telemetry/t", bad)


def test_telemetry_of_namespaces_the_waypoint_does_not_serve_is_ignored() -> None:
    """Every waypoint receives every Telemetry; one for a namespace it does not serve must
    not turn tracing (and the SDK) on in it."""
    provider = [{"providers": [{"name": "otel"}]}]
    objects = [mesh_config(), telemetry("t", "billing", tracing=provider)]
    gateway = ("shop", "waypoint")
    assert not TracingConfig.build(objects, gateway, "istio-system", served={"shop"}).enabled
    assert TracingConfig.build(objects, gateway, "istio-system", served={"billing"}).enabled
    assert TracingConfig.build(objects, gateway, "istio-system").enabled  # served unknown
    mesh_wide = [mesh_config(), telemetry("t", "istio-system", tracing=provider)]
    assert TracingConfig.build(mesh_wide, gateway, "istio-system", served={"shop"}).enabled


def test_a_new_unsampled_context_is_a_valid_traceparent_with_fresh_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = {new_unsampled_traceparent() for _ in range(200)}
    assert len(values) == 200
    for value in values:
        parsed = parse_traceparent(value)
        assert parsed is not None and parsed[2] is False and parsed[0] and parsed[1]
    # All-zero ids are invalid (W3C): a draw that gives one is not used as it is.
    monkeypatch.setattr("random.randbytes", lambda n: bytes(n))
    parsed = parse_traceparent(new_unsampled_traceparent())
    assert parsed is not None and parsed[0] != 0 and parsed[1] != 0
