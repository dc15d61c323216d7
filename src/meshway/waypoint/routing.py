"""HTTPRoute and GRPCRoute routing for the waypoint (Gateway API, GAMMA mesh binding).

`RouteTable.build` compiles the routes once per configuration change into plain tuples,
precompiled regular expressions and frozen dataclasses, sorted by the Gateway API precedence
rules, so that matching a request is a walk over a short list with no pydantic on the way.

What attaches (GEP-1426):

- Only `parentRefs` to a core `Service` count; the parent's namespace defaults to the route's.
  A `port` limits the route to that Service port; without one it applies to every port. A
  `sectionName` (a port *name*) without a `port` cannot be resolved here: that parentRef is
  ignored and reported in `RouteTable.problems`.
- A route in the Service's namespace is a *producer* route and applies to every client. A
  route in another namespace is a *consumer* route: it applies only to clients in its own
  namespace, which then use their consumer routes instead of the producer ones for that port.
- When GRPCRoutes and HTTPRoutes attach to the same Service port, only the GRPCRoutes apply
  (GEP-1426 "Route types": GRPCRoute wins); the two kinds are never merged.
- `hostnames` are ignored, as GEP-1426 asks of mesh implementations; a header match on `host`
  (compared with the request's authority) is the way to select by hostname.

Matching is on the raw request target: the path without its query string, the query
parameters percent-decoded (the first value of a repeated parameter counts), and header values
with repeated fields joined by "," ("; " for cookie), per RFC 9110 §5.3.
"""

from __future__ import annotations

import bisect
import logging
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol
from urllib.parse import unquote

from meshway.config.model import (
    CORE_GROUPS,
    DEFAULT_NAMESPACE,
    BackendObjectReference,
    FaultInjection,
    GRPCBackendRef,
    GRPCMethodMatch,
    GRPCRoute,
    GRPCRouteFilter,
    GRPCRouteMatch,
    GRPCRouteRule,
    HTTPBackendRef,
    HTTPHeaderMatch,
    HTTPHeaderModifier,
    HTTPPathModifier,
    HTTPQueryParamMatch,
    HTTPRequestMirrorFilter,
    HTTPRequestRedirectFilter,
    HTTPRoute,
    HTTPRouteFilter,
    HTTPRouteMatch,
    HTTPRouteRetry,
    HTTPRouteRule,
    HTTPRouteTimeouts,
    HTTPURLRewriteFilter,
    VirtualService,
    duration_seconds,
)
from meshway.waypoint.faults import Fault, compile_fault
from meshway.waypoint.messages import Body, Headers, Request, Response, simple_response

log = logging.getLogger(__name__)

# RFC 9110 §9.2.2: a request with one of these methods may be sent again after a failure.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Gateway API leaves these to the implementation; they are Istio's and Envoy's defaults.
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRY_BACKOFF = 0.025
MAX_BACKOFF_FACTOR = 10

_WELL_KNOWN_PORTS = {"http": 80, "https": 443}

RouteKind = Literal["HTTPRoute", "GRPCRoute", "VirtualService"]
# A backendRef to a DestinationRule subset: {group: meshway.io, kind: ServiceSubset,
# name: <service>.<subset>, port: <service port>}.
SUBSET_GROUP = "meshway.io"
SUBSET_KIND = "ServiceSubset"
# An ExtensionRef filter naming a FaultInjection in the route's namespace (`faults.py`).
FAULT_GROUP = "meshway.io"
FAULT_KIND = "FaultInjection"


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True, slots=True)
class Timeouts:
    """`timeouts` of an HTTPRoute rule, in seconds; None is no timeout ("0s" means none)."""

    request: float | None = None
    backend_request: float | None = None


NO_TIMEOUTS = Timeouts()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`retry` of an HTTPRoute rule (GEP-1731): at most `attempts` retries after the first try.

    Retries are limited to cases that cannot change the outcome of a request twice:

    - no response (`status` None: the connection failed, was reset, or the try timed out):
      retried for any method when the request never reached the upstream (`body_sent`
      False), and otherwise only for idempotent methods (RFC 9110 §9.2.2: GET, HEAD,
      OPTIONS, TRACE, PUT, DELETE), since the upstream may already have acted on it;
    - a response whose status is in `codes`: retried only for idempotent methods.
    """

    attempts: int
    codes: frozenset[int]
    backoff: float

    def should_retry(
        self, method: str, status: int | None, attempt: int, *, body_sent: bool = True
    ) -> bool:
        """Whether to try again after try number `attempt` (1 for the first) failed."""
        if attempt < 1 or attempt > self.attempts:
            return False
        if status is None:
            return not body_sent or method in IDEMPOTENT_METHODS
        return status in self.codes and method in IDEMPOTENT_METHODS

    def backoff_for(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the retry that follows try number `attempt`.

        Exponential from the route's base interval, capped at ten times it, with up to 50%
        added jitter so that clients that failed together do not retry together.
        """
        base = self.backoff * (2 ** max(attempt - 1, 0))
        return min(base * (1 + rand() / 2), self.backoff * MAX_BACKOFF_FACTOR)


# --------------------------------------------------------------------------- filters


class RequestFilter(Protocol):
    """A request-side filter: changes the request in place, or answers it (a response)."""

    def on_request(self, request: Request, port: int) -> Response | None: ...


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    """RequestHeaderModifier / ResponseHeaderModifier with lower-case names.

    A request's `host` is its authority, not a header: `set`/`add` of `host` replace the
    authority, and `remove` of it is ignored since a request cannot go without one.
    """

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: frozenset[str] = frozenset()
    host: str | None = None
    # `remove` and the names `set` replaces: dropped before the new values go in.
    drop: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop", self.remove.union(name for name, _ in self.set))

    def apply(self, headers: Headers) -> None:
        if self.drop:
            headers[:] = [h for h in headers if h[0] not in self.drop]
        headers.extend(self.set)
        for name, value in self.add:
            _append_value(headers, name, value)

    def on_request(self, request: Request, port: int) -> Response | None:
        self.apply(request.headers)
        if self.host is not None:
            request.authority = self.host
        return None


@dataclass(frozen=True, slots=True)
class PathRewrite:
    """ReplaceFullPath (`full_path`) or ReplacePrefixMatch (`prefix` -> `replacement`).

    `prefix` is the rule's PathPrefix match with any trailing "/" removed ("" for "/"); the
    query string of the request is kept.
    """

    full_path: str | None = None
    prefix: str = ""
    replacement: str = ""

    def apply(self, target: str) -> str:
        path, sep, query = target.partition("?")
        if self.full_path is not None:
            path = self.full_path
        elif path.startswith(self.prefix):
            path = self.replacement.rstrip("/") + path[len(self.prefix) :] or "/"
        return f"{path}{sep}{query}"


@dataclass(frozen=True, slots=True)
class URLRewrite:
    hostname: str | None = None
    path: PathRewrite | None = None

    def on_request(self, request: Request, port: int) -> Response | None:
        if self.hostname is not None:
            request.authority = self.hostname
        if self.path is not None:
            request.path = self.path.apply(request.path)
        return None


@dataclass(frozen=True, slots=True)
class Redirect:
    """RequestRedirect: answers with a `Location` built per the Gateway API.

    Without a `port`, a redirect to another scheme uses that scheme's well-known port, and one
    without a scheme keeps the port the request was sent to (the Service port, which is the
    mesh's "listener port"); ports 80 for http and 443 for https are left out of the URL.
    """

    status: int = 302
    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path: PathRewrite | None = None

    def on_request(self, request: Request, port: int) -> Response | None:
        scheme = self.scheme or request.scheme
        host = self.hostname or _host_without_port(request.authority)
        if self.port is not None:
            target_port = self.port
        elif self.scheme is not None:
            target_port = _WELL_KNOWN_PORTS.get(self.scheme, port)
        else:
            target_port = port
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        if _WELL_KNOWN_PORTS.get(scheme) != target_port:
            host = f"{host}:{target_port}"
        target = self.path.apply(request.path) if self.path is not None else request.path
        return Response(
            self.status,
            [("location", f"{scheme}://{host}{target}"), ("content-length", "0")],
            Body.of(),
        )


@dataclass(frozen=True, slots=True)
class UnsupportedFilter:
    """A filter this waypoint cannot run (an ExtensionRef to an unknown kind, or to an object
    that does not exist): the Gateway API forbids skipping it, so requests that would have
    gone through it are answered with 500."""

    description: str
    body: str = "route filter not supported\n"

    def on_request(self, request: Request, port: int) -> Response | None:
        return simple_response(500, self.body)


@dataclass(frozen=True, slots=True)
class Mirror:
    """A RequestMirror target; `fraction` of requests (0..1) are to be copied to it."""

    namespace: str
    name: str
    port: int
    hostname: str
    fraction: float


@dataclass(frozen=True, slots=True)
class FilterChain:
    """A rule's (or a backend's) filters: request steps in configuration order, the response
    header modifier, the mirrors (exposed here, sent by the proxy) and the fault (injected by
    the proxy before the request filters, as Envoy's fault filter runs before the router)."""

    request: tuple[RequestFilter, ...] = ()
    response: HeaderModifier | None = None
    mirrors: tuple[Mirror, ...] = ()
    fault: Fault | None = None
    # Nothing here can act on a request or its response (no filter, no mirror or fault that
    # can fire): the proxy then skips the chain.
    passive: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        passive = (
            not self.request
            and self.response is None
            and not any(m.fraction > 0 for m in self.mirrors)
            and (self.fault is None or not self.fault.active)
        )
        object.__setattr__(self, "passive", passive)

    def apply_request(self, request: Request, port: int) -> Response | None:
        for step in self.request:
            answer = step.on_request(request, port)
            if answer is not None:
                return answer
        return None

    def apply_response(self, response: Response) -> None:
        if self.response is not None:
            self.response.apply(response.headers)


NO_FILTERS = FilterChain()


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True, slots=True)
class Backend:
    """A valid backendRef: a Service port, its weight, and its own filters."""

    namespace: str
    name: str
    port: int
    weight: int
    hostname: str
    filters: FilterChain = NO_FILTERS
    # A DestinationRule subset of the Service (`traffic.py`), or None for all its endpoints.
    subset: str | None = None


class CompiledRule:
    """One route rule, ready for requests.

    `backends` are the valid backendRefs; invalid ones (another kind than a core Service, no
    port, a filter that cannot apply) keep their weight in the draw, so that their share of
    the traffic gets no backend (the Gateway API's 500), as the spec requires.
    """

    __slots__ = (
        "_cumulative",
        "_slots",
        "backends",
        "filters",
        "grpc",
        "index",
        "name",
        "retry",
        "timeouts",
    )

    def __init__(
        self,
        index: int,
        name: str | None,
        choices: Sequence[tuple[int, Backend | None]],
        filters: FilterChain,
        timeouts: Timeouts,
        retry: RetryPolicy | None,
        grpc: bool,
    ) -> None:
        self.index = index
        self.name = name
        self.filters = filters
        self.timeouts = timeouts
        self.retry = retry
        self.grpc = grpc
        self.backends = tuple(b for _, b in choices if b is not None)
        cumulative: list[int] = []
        slots: list[Backend | None] = []
        total = 0
        for weight, backend in choices:
            if weight > 0:
                total += weight
                cumulative.append(total)
                slots.append(backend)
        self._cumulative = tuple(cumulative)
        self._slots = tuple(slots)

    def pick(self, rand: Callable[[], float] = random.random) -> Backend | None:
        """A backend drawn by weight; None when the draw lands on an invalid backend or no
        backend has a positive weight."""
        slots = self._slots
        if len(slots) == 1:  # one backend (the common case) needs no draw
            return slots[0]
        if not slots:
            return None
        point = rand() * self._cumulative[-1]
        i = bisect.bisect_right(self._cumulative, point)
        return self._slots[min(i, len(self._slots) - 1)]

    def __repr__(self) -> str:
        return f"CompiledRule(index={self.index}, name={self.name!r})"


# --------------------------------------------------------------------------- matching


class RequestView:
    """What matching reads from a request, each part computed at most once."""

    __slots__ = ("_headers", "_params", "path", "query", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.path, _, self.query = request.path.partition("?")
        self._headers: dict[str, str] | None = None
        self._params: dict[str, str] | None = None

    def header(self, name: str) -> str | None:
        if name == "host":
            return self.request.authority or None
        if self._headers is None:
            joined: dict[str, str] = {}
            for key, value in self.request.headers:
                previous = joined.get(key)
                if previous is None:
                    joined[key] = value
                else:
                    joined[key] = previous + ("; " if key == "cookie" else ",") + value
            self._headers = joined
        return self._headers.get(name)

    def param(self, name: str) -> str | None:
        if self._params is None:
            params: dict[str, str] = {}
            for part in self.query.split("&") if self.query else ():
                key, _, value = part.partition("=")
                params.setdefault(unquote(key), unquote(value))
            self._params = params
        return self._params.get(name)


class Matcher(Protocol):
    """One match of a rule: whether a request satisfies it (`always`: any request does, so
    that matching needs no view of the request)."""

    always: bool

    def matches(self, view: RequestView) -> bool: ...


# (name, exact value or None, regex or None)
_Condition = tuple[str, str | None, re.Pattern[str] | None]

_EXACT, _PREFIX, _REGEX = 0, 1, 2


def _condition_ok(value: str | None, exact: str | None, regex: re.Pattern[str] | None) -> bool:
    if value is None:
        return False
    if regex is not None:
        return regex.fullmatch(value) is not None
    return value == exact


class _HTTPMatcher:
    __slots__ = ("always", "headers", "method", "params", "path_kind", "path_regex", "path_value")

    def __init__(self, match: HTTPRouteMatch) -> None:
        path = match.path
        self.path_regex: re.Pattern[str] | None = None
        if path.type == "Exact":
            self.path_kind = _EXACT
            self.path_value = path.value
        elif path.type == "PathPrefix":
            self.path_kind = _PREFIX
            self.path_value = path.value.rstrip("/")
        else:
            self.path_kind = _REGEX
            self.path_value = path.value
            self.path_regex = re.compile(path.value)
        self.method = match.method
        self.headers = _header_conditions(match.headers)
        self.params = _param_conditions(match.query_params)
        self.always = (
            self.path_kind == _PREFIX
            and not self.path_value
            and self.method is None
            and not self.headers
            and not self.params
        )

    def matches(self, view: RequestView) -> bool:
        if self.method is not None and view.request.method != self.method:
            return False
        path = view.path
        if self.path_kind == _EXACT:
            if path != self.path_value:
                return False
        elif self.path_kind == _PREFIX:
            prefix = self.path_value
            if prefix and not (
                path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")
            ):
                return False
        elif self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return False
        for name, exact, regex in self.headers:
            if not _condition_ok(view.header(name), exact, regex):
                return False
        return all(
            _condition_ok(view.param(name), exact, regex) for name, exact, regex in self.params
        )

    def precedence(self) -> tuple[int, ...]:
        """Gateway API order (smaller first): Exact, then PathPrefix, then (as Istio does)
        RegularExpression; longer values; a method; more header, then query matches."""
        return (
            self.path_kind,
            -len(self.path_value),
            0 if self.method is not None else 1,
            -len(self.headers),
            -len(self.params),
        )


class _GRPCMatcher:
    __slots__ = ("always", "headers", "method", "service")

    def __init__(self, match: GRPCRouteMatch) -> None:
        method: GRPCMethodMatch | None = match.method
        self.service = _name_condition(method, method.service if method else None)
        self.method = _name_condition(method, method.method if method else None)
        self.headers = _header_conditions(match.headers)
        self.always = self.service is None and self.method is None and not self.headers

    def matches(self, view: RequestView) -> bool:
        if self.service is not None or self.method is not None:
            service, method = _grpc_method(view.path)
            if method is None:
                return False
            if self.service is not None and not _condition_ok(service, *self.service):
                return False
            if self.method is not None and not _condition_ok(method, *self.method):
                return False
        return all(
            _condition_ok(view.header(name), exact, regex) for name, exact, regex in self.headers
        )

    def precedence(self) -> tuple[int, ...]:
        """GRPCRoute order: more characters in the service, then in the method, then more
        header matches."""
        return (
            -len(self.service[0] or "") if self.service else 0,
            -len(self.method[0] or "") if self.method else 0,
            -len(self.headers),
        )


def _grpc_method(path: str) -> tuple[str | None, str | None]:
    """("package.Service", "Method") from a gRPC `:path`, or (None, None)."""
    if not path.startswith("/"):
        return None, None
    service, sep, method = path[1:].partition("/")
    if not sep or not service or not method or "/" in method:
        return None, None
    return service, method


def _name_condition(
    match: GRPCMethodMatch | None, value: str | None
) -> tuple[str | None, re.Pattern[str] | None] | None:
    if match is None or not value:
        return None
    if match.type == "RegularExpression":
        return value, re.compile(value)
    return value, None


def _header_conditions(matches: Iterable[HTTPHeaderMatch]) -> tuple[_Condition, ...]:
    """Header conditions; of several with the same (case-insensitive) name, the first counts."""
    seen: set[str] = set()
    conditions: list[_Condition] = []
    for match in matches:
        name = match.name.lower()
        if name in seen:
            continue
        seen.add(name)
        conditions.append(_condition(name, match.type, match.value))
    return tuple(conditions)


def _param_conditions(matches: Iterable[HTTPQueryParamMatch]) -> tuple[_Condition, ...]:
    """Query conditions; of several with the same (exact) name, the first counts."""
    seen: set[str] = set()
    conditions: list[_Condition] = []
    for match in matches:
        if match.name in seen:
            continue
        seen.add(match.name)
        conditions.append(_condition(match.name, match.type, match.value))
    return tuple(conditions)


def _condition(name: str, kind: str, value: str) -> _Condition:
    if kind == "RegularExpression":
        return name, None, re.compile(value)
    return name, value, None


# --------------------------------------------------------------------------- per service


class RouteMatch:
    """The outcome of matching one request: the route and rule it matched, and (once
    `pick_backend` ran) the backend chosen for it."""

    __slots__ = ("backend", "port", "route", "rule")

    def __init__(self, route: str, rule: CompiledRule, port: int) -> None:
        self.route = route
        self.rule = rule
        self.port = port
        self.backend: Backend | None = None

    def pick_backend(self, rand: Callable[[], float] = random.random) -> Backend | None:
        """A backend by weight, remembered for the backend's own filters; None means the
        request gets no backend (no valid one was drawn): the caller answers 500."""
        self.backend = self.rule.pick(rand)
        return self.backend

    def apply_request_filters(self, request: Request) -> Response | None:
        """The rule's request filters, in order; a response (a redirect, or a 500 for an
        unsupported filter) ends the request there."""
        return self.rule.filters.apply_request(request, self.port)

    def apply_backend_filters(self, request: Request) -> Response | None:
        """The picked backend's own request filters (Gateway API: only for requests sent to
        that backend); call after `pick_backend`."""
        if self.backend is None:
            return None
        return self.backend.filters.apply_request(request, self.port)

    def apply_response_filters(self, response: Response) -> None:
        """ResponseHeaderModifier of the rule, then of the picked backend (the more specific
        one wins for a header both set)."""
        self.rule.filters.apply_response(response)
        if self.backend is not None:
            self.backend.filters.apply_response(response)

    @property
    def fault(self) -> Fault | None:
        """The rule's fault (a FaultInjection ExtensionRef, a VirtualService `fault`)."""
        return self.rule.filters.fault

    @property
    def backend_fault(self) -> Fault | None:
        """The picked backend's own fault (a FaultInjection in its backendRef's filters)."""
        return self.backend.filters.fault if self.backend is not None else None

    @property
    def mirrors(self) -> tuple[Mirror, ...]:
        """The rule's RequestMirror targets, plus the picked backend's."""
        if self.backend is None or not self.backend.filters.mirrors:
            return self.rule.filters.mirrors
        return self.rule.filters.mirrors + self.backend.filters.mirrors


class ServiceRoutes:
    """The rules of every route attached to one Service port, in precedence order."""

    __slots__ = ("_entries", "kind", "name", "namespace", "port", "routes")

    def __init__(
        self,
        namespace: str,
        name: str,
        port: int,
        kind: RouteKind,
        routes: tuple[str, ...],
        entries: Sequence[tuple[Matcher, str, CompiledRule]],
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.port = port
        self.kind: RouteKind = kind
        # The routes that apply, oldest first, as "namespace/name".
        self.routes = routes
        self._entries = tuple(entries)

    def at_port(self, port: int) -> ServiceRoutes:
        """The same routes for another port (routes attached without a port serve them all,
        and a redirect needs the port the request was sent to)."""
        return ServiceRoutes(self.namespace, self.name, port, self.kind, self.routes, self._entries)

    def match(self, request: Request) -> RouteMatch | None:
        """The rule with the highest precedence that matches, or None (the caller answers
        404: GAMMA rejects what no attached route matches)."""
        view: RequestView | None = None
        for matcher, route, rule in self._entries:
            if not matcher.always:
                if view is None:
                    view = RequestView(request)
                if not matcher.matches(view):
                    continue
            return RouteMatch(route, rule, self.port)
        return None

    def __repr__(self) -> str:
        return f"ServiceRoutes({self.namespace}/{self.name}:{self.port} {self.kind} {self.routes})"


# --------------------------------------------------------------------------- the table


@dataclass(slots=True, eq=False)
class _CompiledRoute:
    kind: RouteKind
    display: str
    order: tuple[tuple[int, float], str]
    entries: list[tuple[tuple[int, ...], int, int, _HTTPMatcher | _GRPCMatcher, CompiledRule]]


@dataclass(slots=True)
class _Attachment:
    """Routes attached to one Service for one group of clients, by parentRef port."""

    any_port: list[_CompiledRoute]
    by_port: dict[int, list[_CompiledRoute]]


@dataclass(frozen=True, slots=True)
class _ServiceEntry:
    """The routes of one Service for one group of clients: for the ports parentRefs name, and
    (`any_port`) for the others."""

    any_port: ServiceRoutes | None
    by_port: dict[int, ServiceRoutes]

    def get(self, port: int) -> ServiceRoutes | None:
        found = self.by_port.get(port)
        if found is not None:
            return found
        return self.any_port.at_port(port) if self.any_port is not None else None


class RoutesByPort(Protocol):
    """The routes of one Service for one group of clients, by the port a request is sent to."""

    def get(self, port: int) -> ServiceRoutes | None: ...


class RouteTable:
    """Every route attached to a Service, compiled; immutable once built."""

    __slots__ = ("_services", "problems")

    def __init__(
        self, services: Mapping[tuple[str, str, str], RoutesByPort], problems: tuple[str, ...]
    ) -> None:
        self._services = services
        # What was ignored and why (unresolvable parentRefs, invalid backends), for logs and
        # status.
        self.problems = problems

    @classmethod
    def build(
        cls,
        routes: Iterable[HTTPRoute | GRPCRoute],
        cluster_domain: str = "cluster.local",
        *,
        faults: Iterable[FaultInjection] = (),
        virtual_services: Iterable[VirtualService] = (),
    ) -> RouteTable:
        """Compile the routes. `faults` are what FaultInjection ExtensionRefs resolve to;
        `virtual_services` route the Services that no HTTPRoute or GRPCRoute attaches to
        (`virtualservice.py`)."""
        problems: list[str] = []
        attached: dict[tuple[str, str, str], _Attachment] = {}
        compiled_faults = {
            (f.metadata.namespace or DEFAULT_NAMESPACE, f.metadata.name): compile_fault(
                f.spec, f.object_ref
            )
            for f in faults
        }
        for route in routes:
            compiled = _compile_route(route, cluster_domain, problems, compiled_faults)
            route_ns = route.metadata.namespace or DEFAULT_NAMESPACE
            for i, parent in enumerate(route.spec.parent_refs):
                if not parent.is_service:
                    continue
                if parent.port is None and parent.section_name is not None:
                    problems.append(
                        f"{route.object_ref}: parentRefs[{i}] names Service port "
                        f"{parent.section_name!r} without a port number; set `port` instead"
                    )
                    continue
                service_ns = parent.namespace or route_ns
                # Producer routes ("" scope) serve everyone; consumer routes, their namespace.
                scope = "" if service_ns == route_ns else route_ns
                slot = attached.setdefault(
                    (service_ns, parent.name, scope), _Attachment([], defaultdict(list))
                )
                target = slot.any_port if parent.port is None else slot.by_port[parent.port]
                if compiled not in target:
                    target.append(compiled)
        services: dict[tuple[str, str, str], RoutesByPort] = {}
        for key, slot in attached.items():
            by_port: dict[int, ServiceRoutes] = {}
            for port, extra in slot.by_port.items():
                merged = [*slot.any_port, *(r for r in extra if r not in slot.any_port)]
                by_port[port] = _service_routes(key, port, merged)
            any_port = _service_routes(key, 0, slot.any_port) if slot.any_port else None
            services[key] = _ServiceEntry(any_port, by_port)
        virtual_services = list(virtual_services)
        if virtual_services:
            from meshway.waypoint.virtualservice import compile_virtual_services

            routed = {(ns, name) for ns, name, _ in attached}
            for (ns, name), entry in compile_virtual_services(
                virtual_services, cluster_domain, problems
            ).items():
                if (ns, name) in routed:
                    problems.append(
                        f"{entry.source}: Service {ns}/{name} has HTTPRoutes or GRPCRoutes, "
                        "which win over VirtualServices; ignored for it"
                    )
                    continue
                services[(ns, name, "")] = entry
        for problem in problems:
            log.warning("%s", problem)
        return cls(services, tuple(problems))

    def for_service(
        self, namespace: str, name: str, port: int, client_namespace: str | None = None
    ) -> ServiceRoutes | None:
        """The routes for a request to a Service port, or None when none is attached (the
        caller then sends the request to the Service itself, GAMMA's default).

        A client in `client_namespace` with consumer routes for that port gets those; any
        other client gets the producer routes.
        """
        if client_namespace is not None and client_namespace != namespace:
            entry = self._services.get((namespace, name, client_namespace))
            if entry is not None and (found := entry.get(port)) is not None:
                return found
        entry = self._services.get((namespace, name, ""))
        return entry.get(port) if entry is not None else None


def _service_routes(
    key: tuple[str, str, str], port: int, routes: list[_CompiledRoute]
) -> ServiceRoutes:
    """The routes of one kind (GRPCRoute if any, GEP-1426) and their rules, by precedence."""
    kind: RouteKind = "GRPCRoute" if any(r.kind == "GRPCRoute" for r in routes) else "HTTPRoute"
    chosen = sorted((r for r in routes if r.kind == kind), key=lambda r: r.order)
    ranked = sorted(
        (
            (precedence, position, rule_index, match_index, matcher, route.display, rule)
            for position, route in enumerate(chosen)
            for precedence, rule_index, match_index, matcher, rule in route.entries
        ),
        key=lambda e: e[:4],
    )
    return ServiceRoutes(
        key[0],
        key[1],
        port,
        kind,
        tuple(r.display for r in chosen),
        [(matcher, display, rule) for *_, matcher, display, rule in ranked],
    )


# --------------------------------------------------------------------------- compilation


def _compile_route(
    route: HTTPRoute | GRPCRoute,
    cluster_domain: str,
    problems: list[str],
    faults: Mapping[tuple[str, str], Fault],
) -> _CompiledRoute:
    namespace = route.metadata.namespace or DEFAULT_NAMESPACE
    context = _Context(route.object_ref, namespace, cluster_domain, problems, faults)
    entries: list[tuple[tuple[int, ...], int, int, _HTTPMatcher | _GRPCMatcher, CompiledRule]] = []
    if isinstance(route, GRPCRoute):
        for r, grpc_rule in enumerate(route.spec.rules):
            rule = _compile_grpc_rule(r, grpc_rule, context)
            grpc_matchers = [_GRPCMatcher(m) for m in grpc_rule.matches or [GRPCRouteMatch()]]
            for m, grpc_matcher in enumerate(grpc_matchers):
                entries.append((grpc_matcher.precedence(), r, m, grpc_matcher, rule))
        kind: RouteKind = "GRPCRoute"
    else:
        for r, http_rule in enumerate(route.spec.rules):
            rule = _compile_http_rule(r, http_rule, context)
            matchers = [_HTTPMatcher(m) for m in http_rule.matches or [HTTPRouteMatch()]]
            for m, matcher in enumerate(matchers):
                entries.append((matcher.precedence(), r, m, matcher, rule))
        kind = "HTTPRoute"
    return _CompiledRoute(kind, route.display_name, (_age(route), route.display_name), entries)


def _age(route: HTTPRoute | GRPCRoute) -> tuple[int, float]:
    """Sort key for "the oldest route first"; routes without a readable creation time last."""
    stamp = route.metadata.creation_timestamp
    if stamp:
        try:
            return 0, datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            pass
    return 1, 0.0


@dataclass(frozen=True, slots=True)
class _Context:
    route: str
    namespace: str
    cluster_domain: str
    problems: list[str]
    # FaultInjections by (namespace, name), compiled.
    faults: Mapping[tuple[str, str], Fault] = field(default_factory=dict)

    def hostname(self, namespace: str, name: str) -> str:
        return f"{name}.{namespace}.svc.{self.cluster_domain}"


def _compile_http_rule(index: int, rule: HTTPRouteRule, ctx: _Context) -> CompiledRule:
    prefix = _single_prefix(rule.matches)
    where = f"{ctx.route} rules[{index}]"
    filters = _rule_filters(rule.filters, prefix, ctx, where)
    choices = [
        _compile_backend(ref, prefix, ctx, f"{where}.backendRefs[{i}]")
        for i, ref in enumerate(rule.backend_refs)
    ]
    return CompiledRule(
        index,
        rule.name,
        choices,
        filters,
        _timeouts(rule.timeouts),
        _retry(rule.retry),
        grpc=False,
    )


def _compile_grpc_rule(index: int, rule: GRPCRouteRule, ctx: _Context) -> CompiledRule:
    where = f"{ctx.route} rules[{index}]"
    filters = _rule_filters(rule.filters, None, ctx, where)
    choices = [
        _compile_backend(ref, None, ctx, f"{where}.backendRefs[{i}]")
        for i, ref in enumerate(rule.backend_refs)
    ]
    return CompiledRule(index, rule.name, choices, filters, NO_TIMEOUTS, None, grpc=True)


def _rule_filters(
    filters: Sequence[HTTPRouteFilter | GRPCRouteFilter],
    prefix: str | None,
    ctx: _Context,
    where: str,
) -> FilterChain:
    """A rule's filters; when one cannot apply, the rule answers 500 rather than skip it."""
    chain = _compile_filters(filters, prefix, ctx, where)
    if chain is None:
        return FilterChain((UnsupportedFilter(f"in {where}: a filter cannot apply"),))
    return chain


def _single_prefix(matches: Sequence[HTTPRouteMatch]) -> str | None:
    """The PathPrefix of a rule with exactly one match of that type (what ReplacePrefixMatch
    rewrites), trailing "/" removed; else None."""
    if len(matches) == 1 and matches[0].path.type == "PathPrefix":
        return matches[0].path.value.rstrip("/")
    return None


def _compile_backend(
    ref: HTTPBackendRef | GRPCBackendRef, prefix: str | None, ctx: _Context, where: str
) -> tuple[int, Backend | None]:
    """(weight, backend), with None for an invalid backendRef that keeps its share.

    Besides core Services, a backendRef may name a DestinationRule subset of a Service:
    group `meshway.io`, kind `ServiceSubset`, name `<service>.<subset>`, and the Service port.
    """
    name, subset = ref.name, None
    if ref.group == SUBSET_GROUP and ref.kind == SUBSET_KIND:
        name, _, subset = ref.name.partition(".")
        if not name or not subset:
            ctx.problems.append(f"{where}: a {SUBSET_KIND} is named <service>.<subset>")
            return ref.weight, None
    elif ref.kind != "Service" or ref.group not in CORE_GROUPS:
        ctx.problems.append(f"{where}: unsupported backend kind {ref.group or 'core'}/{ref.kind}")
        return ref.weight, None
    if ref.port is None:
        ctx.problems.append(f"{where}: a Service backend needs a port")
        return ref.weight, None
    filters = _compile_filters(ref.filters, prefix, ctx, where)
    if filters is None:
        return ref.weight, None
    namespace = ref.namespace or ctx.namespace
    return ref.weight, Backend(
        namespace, name, ref.port, ref.weight, ctx.hostname(namespace, name), filters, subset
    )


def _compile_filters(
    filters: Sequence[HTTPRouteFilter | GRPCRouteFilter],
    prefix: str | None,
    ctx: _Context,
    where: str,
) -> FilterChain | None:
    """The compiled filters, or None when one cannot apply (ReplacePrefixMatch without a
    single PathPrefix match), which makes what carries them invalid."""
    steps: list[RequestFilter] = []
    response: HeaderModifier | None = None
    mirrors: list[Mirror] = []
    fault: Fault | None = None
    for i, filt in enumerate(filters):
        if filt.request_header_modifier is not None:
            steps.append(_header_modifier(filt.request_header_modifier, request=True))
        elif filt.response_header_modifier is not None:
            response = _header_modifier(filt.response_header_modifier, request=False)
        elif filt.request_mirror is not None:
            mirror = _mirror(filt.request_mirror, ctx, f"{where}.filters[{i}]")
            if mirror is not None:
                mirrors.append(mirror)
        elif filt.extension_ref is not None:
            ref = filt.extension_ref
            here = f"{where}.filters[{i}]"
            if ref.group != FAULT_GROUP or ref.kind != FAULT_KIND:
                ctx.problems.append(f"{here}: unsupported ExtensionRef {ref.group}/{ref.kind}")
                steps.append(UnsupportedFilter(f"ExtensionRef {ref.group}/{ref.kind} {ref.name}"))
                continue
            found = ctx.faults.get((ctx.namespace, ref.name))
            if found is None:
                ctx.problems.append(f"{here}: {FAULT_KIND} {ctx.namespace}/{ref.name} not found")
                steps.append(
                    UnsupportedFilter(
                        f"{FAULT_KIND} {ctx.namespace}/{ref.name} not found",
                        "route filter not found\n",
                    )
                )
            elif fault is not None:
                ctx.problems.append(f"{here}: only one {FAULT_KIND} may apply; this one is not")
                steps.append(UnsupportedFilter(f"second {FAULT_KIND} {ref.name}"))
            else:
                fault = found
        elif isinstance(filt, HTTPRouteFilter) and filt.request_redirect is not None:
            redirect = _redirect(filt.request_redirect, prefix)
            if redirect is None:
                ctx.problems.append(f"{where}.filters[{i}]: {_PREFIX_PROBLEM}")
                return None
            steps.append(redirect)
        elif isinstance(filt, HTTPRouteFilter) and filt.url_rewrite is not None:
            rewrite = _url_rewrite(filt.url_rewrite, prefix)
            if rewrite is None:
                ctx.problems.append(f"{where}.filters[{i}]: {_PREFIX_PROBLEM}")
                return None
            steps.append(rewrite)
    if not steps and response is None and not mirrors and fault is None:
        return NO_FILTERS
    return FilterChain(tuple(steps), response, tuple(mirrors), fault)


_PREFIX_PROBLEM = "ReplacePrefixMatch needs a rule with exactly one PathPrefix match"


def _header_modifier(modifier: HTTPHeaderModifier, *, request: bool) -> HeaderModifier:
    return header_modifier(
        [(h.name, h.value) for h in modifier.set],
        [(h.name, h.value) for h in modifier.add],
        modifier.remove,
        request=request,
    )


def header_modifier(
    set_headers: Iterable[tuple[str, str]],
    add_headers: Iterable[tuple[str, str]],
    remove_headers: Iterable[str],
    *,
    request: bool,
) -> HeaderModifier:
    """Headers to set, add and remove (names lower-cased); on a request, `host` is the
    authority, so setting it sets that instead of a header."""
    set_ = [(name.lower(), value) for name, value in set_headers]
    add = [(name.lower(), value) for name, value in add_headers]
    remove = {name.lower() for name in remove_headers}
    host = None
    if request:
        host = next((v for n, v in [*add, *set_] if n == "host"), None)
        set_ = [(n, v) for n, v in set_ if n != "host"]
        add = [(n, v) for n, v in add if n != "host"]
        remove.discard("host")
    return HeaderModifier(tuple(set_), tuple(add), frozenset(remove), host)


def _path_rewrite(modifier: HTTPPathModifier | None, prefix: str | None) -> PathRewrite | None:
    """None when the modifier is ReplacePrefixMatch and the rule has no single prefix."""
    if modifier is None or modifier.type == "ReplaceFullPath":
        return PathRewrite(full_path=modifier.replace_full_path if modifier else None)
    if prefix is None:
        return None
    return PathRewrite(prefix=prefix, replacement=modifier.replace_prefix_match or "")


def _redirect(spec: HTTPRequestRedirectFilter, prefix: str | None) -> Redirect | None:
    path = None
    if spec.path is not None:
        path = _path_rewrite(spec.path, prefix)
        if path is None:
            return None
    return Redirect(spec.status_code, spec.scheme, spec.hostname, spec.port, path)


def _url_rewrite(spec: HTTPURLRewriteFilter, prefix: str | None) -> URLRewrite | None:
    path = None
    if spec.path is not None:
        path = _path_rewrite(spec.path, prefix)
        if path is None:
            return None
    return URLRewrite(spec.hostname, path)


def _mirror(spec: HTTPRequestMirrorFilter, ctx: _Context, where: str) -> Mirror | None:
    ref: BackendObjectReference = spec.backend_ref
    if ref.kind != "Service" or ref.group not in CORE_GROUPS or ref.port is None:
        ctx.problems.append(f"{where}: mirror backend must be a Service with a port; dropped")
        return None
    if spec.fraction is not None:
        fraction = spec.fraction.numerator / spec.fraction.denominator
    elif spec.percent is not None:
        fraction = spec.percent / 100
    else:
        fraction = 1.0
    namespace = ref.namespace or ctx.namespace
    return Mirror(namespace, ref.name, ref.port, ctx.hostname(namespace, ref.name), fraction)


def _timeouts(spec: HTTPRouteTimeouts | None) -> Timeouts:
    if spec is None:
        return NO_TIMEOUTS
    return Timeouts(_seconds(spec.request), _seconds(spec.backend_request))


def _seconds(value: str | None) -> float | None:
    """A Gateway API duration in seconds; "0s" (no timeout) and unset are None."""
    if value is None:
        return None
    return duration_seconds(value) or None


def _retry(spec: HTTPRouteRetry | None) -> RetryPolicy | None:
    if spec is None:
        return None
    attempts = DEFAULT_RETRY_ATTEMPTS if spec.attempts is None else spec.attempts
    backoff = DEFAULT_RETRY_BACKOFF if spec.backoff is None else duration_seconds(spec.backoff)
    return RetryPolicy(attempts, frozenset(spec.codes), backoff)


# --------------------------------------------------------------------------- helpers


def _append_value(headers: Headers, name: str, value: str) -> None:
    """Add `value` to a header: appended to its last field line as a list element ("a,b"),
    or as its own line for set-cookie (which cannot be joined) or a new header."""
    if name != "set-cookie":
        for i in range(len(headers) - 1, -1, -1):
            if headers[i][0] == name:
                headers[i] = (name, f"{headers[i][1]},{value}")
                return
    headers.append((name, value))


def _host_without_port(authority: str) -> str:
    """The host part of an authority ("a:80" -> "a", "[::1]:80" -> "::1")."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[1:end] if end > 0 else authority
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority
