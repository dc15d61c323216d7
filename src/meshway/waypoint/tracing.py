"""Request tracing at the waypoint: a span per request, W3C and B3 context in and out.

What applies to a request comes from Istio's Telemetry API (`tracing:` of Telemetry objects
in the root namespace, the destination's namespace, or with targetRefs to the destination
Service or to this waypoint's Gateway, the more specific overriding field by field) and the
providers of the cluster-scoped MeshConfig (decision 0011).

Per request, with tracing configured for the destination:

1. the incoming context is read from `traceparent` (W3C, preferred), `b3` (single header) or
   `x-b3-*` (multi-header);
2. sampling follows the parent's sampled flag, else `randomSamplingPercentage` (1 % when the
   Telemetry does not say, as Istio);
3. sampled: a SERVER span named `<host>:<port>/*` with Envoy's and Istio's tags, child of the
   incoming span; `traceparent` to the upstream carries the waypoint's span id (and B3 headers
   when the request came with B3); `tracestate` and `baggage` go through unchanged;
4. not sampled: no span; a request that came with a context (or a B3 decision alone) keeps
   its headers, one that came without gets an unsampled `traceparent` so that the services
   behind honour the decision.

The parsing and header rewriting here are pure; the OpenTelemetry SDK is loaded (by
`meshway.telemetry.otlp`) only once a provider is in use, and spans leave the process in
batches from the SDK's worker thread, never from the event loop.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from meshway.api.v1 import address_pb2
from meshway.config.model import (
    MeshConfig,
    MeshExtensionProvider,
    Telemetry,
    TelemetryTracing,
    duration_seconds,
)
from meshway.node.state import ip_text
from meshway.waypoint.messages import Headers, Request, Response, header_value

if TYPE_CHECKING:
    from meshway.waypoint.proxy import Destination, Downstream, Outcome

log = logging.getLogger(__name__)

# Istio's default sampling when neither the Telemetry nor the mesh says (meshConfig's
# defaultConfig.tracing.sampling is 1.0 %).
DEFAULT_SAMPLING_PERCENTAGE = 1.0
_HEX = frozenset("0123456789abcdef")
_B3_HEADERS = frozenset({"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled"})

# -- propagation (pure) ----------------------------------------------------------------------

B3_NONE, B3_SINGLE, B3_MULTI = 0, 1, 2


class Incoming(NamedTuple):
    """The trace context a request came with."""

    trace_id: int  # 0: the headers carried only a sampling decision (B3 `b3: 1`, say)
    span_id: int
    sampled: bool | None  # None: no decision, the waypoint decides
    b3: int = B3_NONE  # which B3 form the request used (its headers are rewritten the same way)
    b3_trace_hex: str = ""  # the B3 trace id as sent (16 or 32 hex digits), kept in B3 headers


def _hex_id(value: str, lengths: tuple[int, ...]) -> int | None:
    """A lower-case hex id of one of `lengths`, not all zeros; else None."""
    if len(value) not in lengths or not _HEX.issuperset(value):
        return None
    number = int(value, 16)
    return number or None


def parse_traceparent(value: str) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) from a W3C `traceparent`, or None if invalid.

    Version 00 is exactly `00-<32 hex>-<16 hex>-<2 hex>`; a later version may append fields
    after a '-', and version ff is invalid (W3C Trace Context §3.2).
    """
    value = value.strip()
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version = value[:2]
    if not _HEX.issuperset(version) or version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    trace_id = _hex_id(value[3:35], (32,))
    span_id = _hex_id(value[36:52], (16,))
    flags = value[53:55]
    if trace_id is None or span_id is None or not _HEX.issuperset(flags):
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def _b3_sampled(value: str | None, debug: bool = False) -> bool | None:
    if debug:
        return True
    if value in ("1", "true", "d"):
        return True
    if value in ("0", "false"):
        return False
    return None


def parse_b3_single(value: str) -> Incoming | None:
    """`b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`, or a decision alone
    (`0`, `1`, `d`); None if invalid."""
    value = value.strip().lower()
    if value in ("0", "1", "d"):
        return Incoming(0, 0, _b3_sampled(value), B3_SINGLE)
    parts = value.split("-")
    if len(parts) < 2 or len(parts) > 4:
        return None
    trace_id = _hex_id(parts[0], (16, 32))
    span_id = _hex_id(parts[1], (16,))
    if trace_id is None or span_id is None:
        return None
    sampled = None
    if len(parts) >= 3:
        if parts[2] not in ("0", "1", "d"):
            return None
        sampled = _b3_sampled(parts[2])
    if len(parts) == 4 and _hex_id(parts[3], (16,)) is None:
        return None
    return Incoming(trace_id, span_id, sampled, B3_SINGLE, parts[0])


def parse_b3_multi(
    trace: str | None, span: str | None, sampled: str | None, flags: str | None
) -> Incoming | None:
    """`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, `x-b3-flags`; None if invalid."""
    decision = _b3_sampled(sampled.strip().lower() if sampled else None, (flags or "") == "1")
    if trace is None and span is None:
        return Incoming(0, 0, decision, B3_MULTI) if decision is not None else None
    trace_hex = (trace or "").strip().lower()
    trace_id = _hex_id(trace_hex, (16, 32))
    span_id = _hex_id((span or "").strip().lower(), (16,))
    if trace_id is None or span_id is None:
        return None
    return Incoming(trace_id, span_id, decision, B3_MULTI, trace_hex)


def extract(headers: Headers) -> Incoming | None:
    """The incoming trace context: W3C when its `traceparent` is valid, else B3 (single
    header first); None when there is none or it is invalid. The B3 form seen is kept either
    way, so that B3 headers are rewritten too."""
    traceparent = b3 = trace = span = sampled = flags = None
    for name, value in headers:
        if name[0] not in "tbx":
            continue
        if name == "traceparent":
            traceparent = value
        elif name == "b3":
            b3 = value
        elif name.startswith("x-b3-"):
            if name == "x-b3-traceid":
                trace = value
            elif name == "x-b3-spanid":
                span = value
            elif name == "x-b3-sampled":
                sampled = value
            elif name == "x-b3-flags":
                flags = value
    b3_in: Incoming | None = None
    if b3 is not None:
        b3_in = parse_b3_single(b3)
    elif trace is not None or span is not None or sampled is not None or flags is not None:
        b3_in = parse_b3_multi(trace, span, sampled, flags)
    if traceparent is not None:
        w3c = parse_traceparent(traceparent)
        if w3c is not None:
            form = b3_in.b3 if b3_in is not None else B3_NONE
            trace_hex = b3_in.b3_trace_hex if b3_in is not None else ""
            return Incoming(w3c[0], w3c[1], w3c[2], form, trace_hex)
    return b3_in


_TRACESTATE_KEY = re.compile(
    r"[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}"
)
_TRACESTATE_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


def parse_tracestate(value: str) -> list[tuple[str, str]] | None:
    """The members of a W3C `tracestate`, or None when any is invalid, a key repeats or there
    are more than 32 (W3C Trace Context §3.3: such a header is discarded, not repaired). The
    header itself is forwarded unchanged either way."""
    members: list[tuple[str, str]] = []
    for raw in value.split(","):
        member = raw.strip(" \t")
        if not member:
            continue
        key, eq, val = member.partition("=")
        if not eq or not _TRACESTATE_KEY.fullmatch(key) or not _TRACESTATE_VALUE.fullmatch(val):
            return None
        members.append((key, val))
    if len(members) > 32 or len({k for k, _ in members}) != len(members):
        return None
    return members


def traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def inject(
    headers: Headers, trace_id: int, span_id: int, sampled: bool, incoming: Incoming | None
) -> None:
    """Rewrite the request's context for its upstream: `traceparent` with `span_id` as the
    parent, and the B3 form the request came with (the incoming span as the parent span).
    `tracestate`, `baggage` and every other header stay as they are."""
    b3 = incoming.b3 if incoming is not None else B3_NONE
    if not b3:
        _set_traceparent(headers, traceparent(trace_id, span_id, sampled))
        return
    headers[:] = [(k, v) for k, v in headers if k != "traceparent" and k not in _B3_HEADERS]
    headers.append(("traceparent", traceparent(trace_id, span_id, sampled)))
    assert incoming is not None
    trace_hex = incoming.b3_trace_hex
    if not trace_hex or int(trace_hex, 16) != trace_id:
        trace_hex = f"{trace_id:032x}"
    flag = "1" if sampled else "0"
    parent = f"{incoming.span_id:016x}" if incoming.span_id else ""
    if b3 == B3_SINGLE:
        value = f"{trace_hex}-{span_id:016x}-{flag}"
        headers.append(("b3", f"{value}-{parent}" if parent else value))
    else:
        headers.append(("x-b3-traceid", trace_hex))
        headers.append(("x-b3-spanid", f"{span_id:016x}"))
        if parent:
            headers.append(("x-b3-parentspanid", parent))
        headers.append(("x-b3-sampled", flag))


def _set_traceparent(headers: Headers, value: str) -> None:
    """`traceparent: value`, in place of any the request had."""
    for name, _ in headers:  # a loop, not any(): this runs for every request traced
        if name == "traceparent":
            headers[:] = [(k, v) for k, v in headers if k != "traceparent"]
            break
    headers.append(("traceparent", value))


_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16


def new_unsampled_traceparent() -> str:
    """The `traceparent` of a new, unsampled trace: random ids from one draw of 24 bytes
    (what most requests pay for tracing at the default 1 %; all-zero ids are invalid)."""
    ids = random.randbytes(24).hex()
    trace, span = ids[:32], ids[32:]
    if trace == _ZERO_TRACE_ID or span == _ZERO_SPAN_ID:
        return traceparent(new_trace_id(), new_span_id(), False)
    return f"00-{trace}-{span}-00"


def new_trace_id() -> int:
    return random.getrandbits(128) or 1


def new_span_id() -> int:
    return random.getrandbits(64) or 1


# -- configuration (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OtlpEndpoint:
    """Where a provider's spans go: `http://<ip>:<port><path>`, with its headers."""

    url: str
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class SpanSettings:
    """What tracing does for one destination, merged from the Telemetry objects."""

    provider: str
    percentage: float = DEFAULT_SAMPLING_PERCENTAGE
    report: bool = True
    # (tag, kind, value, default): kind "literal" (value), "header" (value is its name,
    # default when absent) or "environment" (resolved when compiled)
    custom_tags: tuple[tuple[str, str, str, str | None], ...] = ()


def _applies_at_waypoint(entry: TelemetryTracing) -> bool:
    """The waypoint reports SERVER spans: entries for CLIENT alone are not its."""
    return entry.match is None or entry.match.mode != "CLIENT"


def _age(t: Telemetry) -> tuple[str, str]:
    return (t.metadata.creation_timestamp or "", t.metadata.name)


def merge_tracing(
    layers: Iterable[Telemetry | None], default_providers: list[str]
) -> SpanSettings | None:
    """Istio's inheritance: each more specific layer overrides the fields it sets. None when
    no provider results (tracing off for the destination)."""
    provider = default_providers[0] if default_providers else None
    percentage: float | None = None
    report = True
    tags: dict[str, tuple[str, str, str | None]] = {}
    seen = False
    for telemetry in layers:
        if telemetry is None:
            continue
        entry = next((e for e in telemetry.spec.tracing if _applies_at_waypoint(e)), None)
        if entry is None:
            continue
        seen = True
        if entry.providers:
            provider = entry.providers[0].name
        if entry.random_sampling_percentage is not None:
            percentage = entry.random_sampling_percentage
        if entry.disable_span_reporting is not None:
            report = not entry.disable_span_reporting
        for name, tag in entry.custom_tags.items():
            if tag.literal is not None:
                tags[name] = ("literal", tag.literal.value, None)
            elif tag.header is not None:
                tags[name] = ("header", tag.header.name.lower(), tag.header.default_value)
            elif tag.environment is not None:
                env = os.environ.get(tag.environment.name, tag.environment.default_value or "")
                tags[name] = ("literal", env, None)
    if provider is None or not (seen or default_providers):
        return None
    return SpanSettings(
        provider,
        DEFAULT_SAMPLING_PERCENTAGE if percentage is None else percentage,
        report,
        tuple((name, kind, value, default) for name, (kind, value, default) in tags.items()),
    )


@dataclass
class TracingConfig:
    """The Telemetry objects and the MeshConfig, indexed for the questions a waypoint asks."""

    gateway: tuple[str, str]
    root_namespace: str
    mesh: MeshConfig | None = None
    # Namespace-wide Telemetry (no selector, no targetRefs), the oldest per namespace.
    namespace_wide: dict[str, Telemetry] = field(default_factory=dict)
    # targetRefs: ("Service" | "Gateway", namespace, name) -> the oldest Telemetry.
    targeted: dict[tuple[str, str, str], Telemetry] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        objects: Iterable[Any],
        gateway: tuple[str, str],
        root_namespace: str,
        served: Collection[str] | None = None,
    ) -> TracingConfig:
        """`served`: the namespaces of what this waypoint serves (None: any). Telemetry of
        other namespaces cannot apply here, and must not make a waypoint load the SDK."""
        config = cls(gateway, root_namespace)
        telemetries = sorted((o for o in objects if isinstance(o, Telemetry)), key=_age)
        for obj in objects:
            if isinstance(obj, MeshConfig):
                config.mesh = obj
        for t in telemetries:
            ns = t.metadata.namespace or ""
            if served is not None and ns not in (root_namespace, gateway[0], *served):
                continue
            refs = t.spec.all_target_refs
            if refs:
                for ref in refs:
                    config.targeted.setdefault((ref.kind, ns, ref.name), t)
            elif t.spec.selector is None or not t.spec.selector.match_labels:
                config.namespace_wide.setdefault(ns, t)
            # A selector picks workloads (their own proxies); it says nothing to a waypoint.
        return config

    @property
    def default_providers(self) -> list[str]:
        mesh = self.mesh
        if mesh is None or mesh.spec.default_providers is None:
            return []
        return mesh.spec.default_providers.tracing

    @property
    def enabled(self) -> bool:
        """Could any destination be traced? (If not, requests pay nothing.)"""
        return bool(
            self.mesh is not None
            and self.mesh.spec.extension_providers
            and (self.namespace_wide or self.targeted or self.default_providers)
        )

    def settings(self, namespace: str, service: str | None) -> SpanSettings | None:
        """Tracing for a destination: a Service (`service` its name) or a workload."""
        gw_ns, gw_name = self.gateway
        root = self.namespace_wide.get(self.root_namespace)
        layers = [
            root,
            self.namespace_wide.get(namespace) if namespace != self.root_namespace else None,
            self.targeted.get(("Gateway", gw_ns, gw_name)),
            self.targeted.get(("Service", namespace, service)) if service else None,
        ]
        return merge_tracing(layers, self.default_providers)

    def provider_names(self) -> set[str]:
        """The providers that some Telemetry (or the mesh's defaults) names."""
        names = set(self.default_providers)
        for t in [*self.namespace_wide.values(), *self.targeted.values()]:
            names |= {p.name for e in t.spec.tracing for p in e.providers}
        return names


def provider_endpoint(
    provider: MeshExtensionProvider, resolve: Callable[[str], str | None]
) -> OtlpEndpoint | None:
    """The provider's OTLP/HTTP URL with its host resolved (`resolve` maps a Service host,
    `<name>.<ns>.svc.<domain>` or `<ns>/<host>`, to its VIP); None while it does not resolve."""
    otel = provider.opentelemetry
    host = otel.service
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        found = resolve(host)
        if found is None:
            return None
        ip = found
    http = otel.http
    assert http is not None  # the model requires it
    address = f"[{ip}]" if ":" in ip else ip
    return OtlpEndpoint(
        f"http://{address}:{otel.port}{http.path}",
        tuple((h.name, h.value) for h in http.headers),
        duration_seconds(http.timeout) if http.timeout else 10.0,
    )


def service_vip(services: Iterable[address_pb2.Service], host: str) -> str | None:
    """The VIP of the Service named `<name>.<ns>.svc.<domain>` or `<ns>/<that>`, from the
    waypoint's xDS state."""
    namespace, _, hostname = host.rpartition("/")
    for svc in services:
        matches = svc.hostname == hostname and (not namespace or svc.namespace == namespace)
        if matches and svc.addresses:
            return ip_text(svc.addresses[0].address)
    return None


# -- spans -----------------------------------------------------------------------------------


class _Otel:
    """The few OpenTelemetry names the per-request code needs, imported once."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            TraceState,
        )

        self.set_span_in_context = trace.set_span_in_context
        self.NonRecordingSpan = NonRecordingSpan
        self.SpanContext = SpanContext
        self.SERVER = SpanKind.SERVER
        self.error = Status(StatusCode.ERROR)
        self.sampled = TraceFlags(TraceFlags.SAMPLED)
        self.not_sampled = TraceFlags(TraceFlags.DEFAULT)
        self.TraceState = TraceState


@dataclass(slots=True)
class TracedDestination:
    """A destination's settings and its tracer (None: propagate, report nothing)."""

    settings: SpanSettings
    fraction: float
    tracer: Any | None


class RequestSpan:
    """A sampled request's span, ended when its response is over (`WaypointDataPath._track`)."""

    __slots__ = ("_otel", "_tags", "span")

    def __init__(self, span: Any, otel: _Otel, tags: tuple[tuple[str, str, str, str | None], ...]):
        self.span = span
        self._otel = otel
        self._tags = tags

    def end(
        self,
        down: Downstream,
        request: Request,
        response: Response,
        outcome: Outcome,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        status = response.status
        endpoint = outcome.endpoint
        dest = down.destination
        attributes: dict[str, str] = {
            "http.status_code": str(status),
            "response_flags": outcome.flags,
            "request_size": str(request_bytes),
            "response_size": str(response_bytes),
            "guid:x-request-id": request.header("x-request-id") or "",
            "upstream_cluster": dest.hostname,
            "upstream_cluster.name": dest.hostname,
        }
        if endpoint is not None:
            attributes["upstream_address"] = f"{endpoint.ip}:{endpoint.port}"
            attributes["destination_principal"] = endpoint.principal
        if (request.header("content-type") or "").startswith("application/grpc"):
            grpc_status = response.header("grpc-status") or header_value(
                response.body.trailers or (), "grpc-status"
            )
            if grpc_status is not None:
                attributes["grpc.status_code"] = grpc_status
        for name, kind, value, default in self._tags:
            if kind == "header":
                found = request.header(value)
                if found is None:
                    found = default
                if found is not None:
                    attributes[name] = found
            else:
                attributes[name] = value
        span = self.span
        span.set_attributes(attributes)
        if status >= 500:
            span.set_attribute("error", "true")
            span.set_status(self._otel.error)
        span.end()


class WaypointTracer:
    """Tracing for the requests of one waypoint, with the tracers of its providers."""

    def __init__(
        self,
        config: TracingConfig,
        tracers: Mapping[str, Any],
        node_id: str,
        mesh_id: str,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self._tracers = tracers
        self._node_id = node_id
        self._mesh_id = mesh_id
        self._rand = rand
        self._cache: dict[tuple[str, str | None], TracedDestination | None] = {}
        self._otel = _Otel() if tracers else None

    def destination(self, dest: Destination) -> TracedDestination | None:
        """How requests to `dest` are traced; None when they are not (the data path keeps the
        answer for the tunnel: see `WaypointDataPath._plan`)."""
        svc = dest.service
        key = (svc.namespace, svc.name) if svc is not None else (dest.workload_namespace, None)
        try:
            return self._cache[key]
        except KeyError:
            pass
        settings = self.config.settings(*key)
        found: TracedDestination | None = None
        if settings is not None and settings.provider in self._tracers:
            tracer = self._tracers[settings.provider] if settings.report else None
            found = TracedDestination(settings, settings.percentage / 100.0, tracer)
        if len(self._cache) < 4096:
            self._cache[key] = found
        return found

    def start(
        self, down: Downstream, request: Request, dest: TracedDestination
    ) -> RequestSpan | None:
        """Extract, sample, start the span and rewrite the context for the upstream (`dest`:
        what `destination` said for the request's destination)."""
        headers = request.headers
        incoming = extract(headers)
        if incoming is not None and incoming.sampled is not None:
            sampled = incoming.sampled
        else:
            sampled = dest.fraction > 0 and self._rand() < dest.fraction
        has_parent = incoming is not None and incoming.trace_id != 0
        if not sampled:
            if incoming is None:  # a new trace, unsampled: the services behind follow
                _set_traceparent(headers, new_unsampled_traceparent())
            return None
        if dest.tracer is None or self._otel is None:  # disableSpanReporting: propagate only
            trace_id = incoming.trace_id if incoming is not None and has_parent else 0
            inject(headers, trace_id or new_trace_id(), new_span_id(), True, incoming)
            return None
        otel = self._otel
        context = None
        if has_parent:
            assert incoming is not None
            state = request.header("tracestate")
            members = parse_tracestate(state) if state else None
            parent = otel.SpanContext(
                incoming.trace_id,
                incoming.span_id,
                is_remote=True,
                trace_flags=otel.sampled,
                trace_state=otel.TraceState(members) if state and members else None,
            )
            context = otel.set_span_in_context(otel.NonRecordingSpan(parent))
        service = down.destination.service
        dest_ns = down.destination.workload_namespace
        attributes = {
            "component": "proxy",
            "node_id": self._node_id,
            "http.method": request.method,
            "http.url": f"{request.scheme}://{request.authority}{request.path}",
            "http.protocol": request.protocol,
            "user_agent": request.header("user-agent") or "-",
            "downstream_cluster": "-",
            "peer.address": down.ip,
            "source_principal": down.identity.uri,
            "istio.mesh_id": self._mesh_id,
            "istio.namespace": service.namespace if service else dest_ns,
            "istio.canonical_service": service.name if service else "unknown",
        }
        span = dest.tracer.start_span(
            f"{_span_host(down.destination)}:{down.destination.port}/*",
            context=context,
            kind=otel.SERVER,
            attributes=attributes,
        )
        ctx = span.get_span_context()
        inject(headers, ctx.trace_id, ctx.span_id, True, incoming)
        return RequestSpan(span, otel, dest.settings.custom_tags)


def _span_host(dest: Destination) -> str:
    if dest.service is not None:
        return dest.service.hostname
    return str(dest.ip)


# -- providers --------------------------------------------------------------------------------


class TracingProviders:
    """One OpenTelemetry TracerProvider (OTLP/HTTP, batched) per provider endpoint in use;
    kept across configuration updates, shut down once no longer used."""

    def __init__(
        self,
        service_name: str,
        resource_attributes: dict[str, str],
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self._service_name = service_name
        self._attributes = resource_attributes
        self._thread_init = thread_init
        self._providers: dict[OtlpEndpoint, Any] = {}
        self._warned: set[str] = set()
        self.unavailable: str | None = None

    def tracers(self, endpoints: Mapping[str, OtlpEndpoint]) -> dict[str, Any]:
        """A tracer per provider name; providers for endpoints no longer named are shut down.
        Empty (and `unavailable` says why) when the OTLP exporter cannot load."""
        from meshway.telemetry.otlp import TracingUnavailable, otlp_tracer_provider

        wanted = set(endpoints.values())
        gone = [self._providers.pop(e) for e in list(self._providers) if e not in wanted]
        self._shutdown(gone, wait=False)  # on the event loop: flushed in the background
        tracers: dict[str, Any] = {}
        for name, endpoint in endpoints.items():
            provider = self._providers.get(endpoint)
            if provider is None:
                try:
                    provider = otlp_tracer_provider(
                        endpoint.url,
                        self._service_name,
                        self._attributes,
                        thread_init=self._thread_init,
                        headers=dict(endpoint.headers),
                        timeout=endpoint.timeout,
                    )
                except TracingUnavailable as exc:
                    if self.unavailable != str(exc):
                        log.error("tracing is configured but cannot run: %s", exc)
                    self.unavailable = str(exc)
                    return {}
                self._providers[endpoint] = provider
                log.info("tracing provider %s exports to %s", name, endpoint.url)
            tracers[name] = provider.get_tracer("meshway.waypoint")
        return tracers

    def warn_once(self, message: str) -> None:
        """Log a configuration problem once: configuration often arrives before the Service
        it names, and every xDS update rebuilds the tracer."""
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def close(self) -> None:
        """Flush and stop every provider, waiting up to 5 s (call it off the event loop)."""
        providers = list(self._providers.values())
        self._providers.clear()
        self._shutdown(providers, wait=True)

    def _shutdown(self, providers: list[Any], *, wait: bool) -> None:
        """Flush and stop providers from a thread of their own: their last export must not
        run on (or move into the pod's namespace) the event loop's thread."""
        if not providers:
            return

        def stop() -> None:
            for provider in providers:
                try:
                    provider.shutdown()
                except Exception:  # a collector that is gone must not stop the proxy
                    log.debug("tracing provider shutdown failed", exc_info=True)

        thread = threading.Thread(target=stop, name="tracing-shutdown", daemon=True)
        thread.start()
        if wait:
            thread.join(timeout=5.0)


def build_tracer(
    objects: Iterable[Any],
    gateway: tuple[str, str],
    root_namespace: str,
    resolve: Callable[[str], str | None],
    providers: TracingProviders,
    *,
    node_id: str,
    mesh_id: str,
    served: Collection[str] | None = None,
) -> WaypointTracer | None:
    """The waypoint's tracer for this configuration, or None when nothing is traced (the
    data path then pays a single attribute test per request)."""
    config = TracingConfig.build(list(objects), gateway, root_namespace, served)
    if not config.enabled:
        providers.tracers({})
        return None
    endpoints: dict[str, OtlpEndpoint] = {}
    assert config.mesh is not None
    used = config.provider_names()
    defined = {p.name for p in config.mesh.spec.extension_providers}
    for name in sorted(used - defined):
        providers.warn_once(f"tracing provider {name} is not an extensionProvider of MeshConfig")
    for provider in config.mesh.spec.extension_providers:
        if provider.name not in used:
            continue
        endpoint = provider_endpoint(provider, resolve)
        if endpoint is None:
            providers.warn_once(
                f"tracing provider {provider.name}: service {provider.opentelemetry.service} "
                "not found; its spans are not exported"
            )
            continue
        endpoints[provider.name] = endpoint
    tracers = providers.tracers(endpoints)
    if not tracers:
        return None
    return WaypointTracer(config, tracers, node_id, mesh_id)
