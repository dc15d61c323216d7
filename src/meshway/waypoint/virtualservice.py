"""Istio VirtualService `http` routes at the waypoint, compiled into the route table's own
structures (`routing.py`), so that the data path treats them like HTTPRoute rules.

Which VirtualService applies to a Service:

- its `hosts` name the Service: a short name (in the VirtualService's namespace), `name.ns`,
  `name.ns.svc` or the FQDN `name.ns.svc.<cluster domain>`; other hosts (wildcards, external
  names) are ignored and reported;
- `gateways` empty or including `mesh` (a VirtualService bound only to gateways is not for
  the mesh);
- of several for one Service, the oldest (then by namespace/name) wins and the others are
  reported, as Istio does for sidecars;
- a Service with any HTTPRoute or GRPCRoute attached uses those and no VirtualService
  (`RouteTable.build`); Istio ambient calls mixing the two unsupported.

Semantics (Istio's): the first `http` route whose match (any of its `match` entries; none is
"everything") fits the request wins, in order; no match at all is a 404 `NR`, like routes.

Honoured: `match` (uri exact/prefix/regex, `ignoreUriCase`, scheme, method, authority, headers
and queryParams with exact/prefix/regex or presence, withoutHeaders, port), `route`
destinations with weights, subsets (DestinationRule subsets, `traffic.py`) and ports (without
one, the port the request came to), `rewrite` (uri: the matched prefix when the match was a
prefix, else the whole path; authority), `timeout`, `retries` (attempts, perTryTimeout, retryOn
with `5xx`, `gateway-error`, `retriable-4xx` and status numbers; failures to connect are always
retried when safe, see `RetryPolicy`; without `retries`, Istio's default of 2 retries on 503),
`headers` (request/response set/add/remove, per route and per destination), `mirror` +
`mirrorPercentage` (the port as for destinations), and `fault`.

Not honoured, and reported: matches on `sourceLabels` or `sourceNamespace` (such a match never
matches, rather than matching everyone), a `mirror`'s `subset` (the whole Service is mirrored
to), `exportTo` (every VirtualService is visible to the waypoint).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from meshway.config.model import (
    DEFAULT_NAMESPACE,
    HeaderOperations,
    HTTPMatchRequest,
    HTTPRetry,
    StringMatch,
    VirtualService,
    VirtualServiceHTTPRoute,
    duration_seconds,
)
from meshway.waypoint.faults import compile_fault
from meshway.waypoint.messages import Request, Response
from meshway.waypoint.routing import (
    DEFAULT_RETRY_BACKOFF,
    NO_TIMEOUTS,
    Backend,
    CompiledRule,
    FilterChain,
    HeaderModifier,
    Matcher,
    Mirror,
    RequestFilter,
    RequestView,
    RetryPolicy,
    ServiceRoutes,
    Timeouts,
    header_modifier,
)

# Istio's retry policy for a route that sets none: 2 retries, on 503 (and failed connections).
DEFAULT_VS_RETRY = RetryPolicy(2, frozenset({503}), DEFAULT_RETRY_BACKOFF)
_RETRY_ON_CODES = {
    "5xx": frozenset(range(500, 600)),
    "gateway-error": frozenset({502, 503, 504}),
    "retriable-4xx": frozenset({409}),
}


def resolve_host(host: str, namespace: str, cluster_domain: str) -> tuple[str, str] | None:
    """(namespace, name) of the Service a VirtualService host names, or None."""
    if "*" in host:
        return None
    suffix = f".svc.{cluster_domain}"
    if host.endswith(suffix):
        host = host[: -len(suffix)]
    elif host.endswith(".svc"):
        host = host[:-4]
    parts = host.split(".")
    if len(parts) == 1 and parts[0]:
        return namespace, parts[0]
    if len(parts) == 2 and all(parts):
        return parts[1], parts[0]
    return None


def compile_virtual_services(
    virtual_services: Iterable[VirtualService], cluster_domain: str, problems: list[str]
) -> dict[tuple[str, str], VirtualServiceRoutes]:
    """The VirtualService that applies to each Service it names, ready to serve requests."""
    chosen: dict[tuple[str, str], VirtualServiceRoutes] = {}
    for vs in sorted(virtual_services, key=_age):
        namespace = vs.metadata.namespace or DEFAULT_NAMESPACE
        gateways = vs.spec.gateways
        if gateways and "mesh" not in gateways:
            problems.append(
                f"{vs.object_ref}: bound to gateways only (no 'mesh'); not for the mesh"
            )
            continue
        reported = False
        for i, host in enumerate(vs.spec.hosts):
            service = resolve_host(host, namespace, cluster_domain)
            if service is None:
                problems.append(
                    f"{vs.object_ref} hosts[{i}]: {host!r} does not name a Service "
                    "(name, name.namespace or the FQDN); ignored"
                )
                continue
            previous = chosen.get(service)
            if previous is not None:
                problems.append(
                    f"{vs.object_ref}: {previous.source} (older) routes Service "
                    f"{service[0]}/{service[1]} already; ignored for it"
                )
                continue
            if not reported:
                _compile(vs, cluster_domain, 0, problems)  # report its problems once
                reported = True
            chosen[service] = VirtualServiceRoutes(vs, cluster_domain, *service)
    return chosen


def _age(vs: VirtualService) -> tuple[int, float, str]:
    stamp = vs.metadata.creation_timestamp
    if stamp:
        try:
            return 0, datetime.fromisoformat(stamp).timestamp(), vs.display_name
        except ValueError:
            pass
    return 1, 0.0, vs.display_name


class VirtualServiceRoutes:
    """A VirtualService's routes for one Service, compiled for each port on first use (a
    destination without a port goes to the port the request was sent to)."""

    __slots__ = ("_by_port", "cluster_domain", "name", "namespace", "source", "vs")

    def __init__(self, vs: VirtualService, cluster_domain: str, namespace: str, name: str) -> None:
        self.vs = vs
        self.cluster_domain = cluster_domain
        self.source = vs.object_ref
        self.namespace = namespace
        self.name = name
        self._by_port: dict[int, ServiceRoutes] = {}

    def get(self, port: int) -> ServiceRoutes | None:
        found = self._by_port.get(port)
        if found is None:
            entries = _compile(self.vs, self.cluster_domain, port, [])
            found = ServiceRoutes(
                self.namespace,
                self.name,
                port,
                "VirtualService",
                (self.vs.display_name,),
                entries,
            )
            if len(self._by_port) < 64:
                self._by_port[port] = found
        return found


# --------------------------------------------------------------------------- compilation


@dataclass(frozen=True, slots=True)
class _Where:
    vs: str
    namespace: str
    cluster_domain: str
    port: int
    problems: list[str]

    def hostname(self, namespace: str, name: str) -> str:
        return f"{name}.{namespace}.svc.{self.cluster_domain}"


def _compile(
    vs: VirtualService, cluster_domain: str, port: int, problems: list[str]
) -> list[tuple[Matcher, str, CompiledRule]]:
    """The (matcher, route name, rule) entries of every `http` route, in order, for `port`
    (0: every port, to collect problems)."""
    namespace = vs.metadata.namespace or DEFAULT_NAMESPACE
    ctx = _Where(vs.object_ref, namespace, cluster_domain, port, problems)
    display = vs.display_name
    entries: list[tuple[Matcher, str, CompiledRule]] = []
    for i, http in enumerate(vs.spec.http):
        where = f"{vs.object_ref} http[{i}]"
        choices = _destinations(http, ctx, where)
        timeouts, retry = _timeouts_and_retry(http)
        fault = compile_fault(http.fault, where) if http.fault is not None else None
        mirrors = _mirrors(http, ctx, where)
        request_headers = _header_ops(http.headers.request if http.headers else None, True)
        response_headers = _header_ops(http.headers.response if http.headers else None, False)
        matches: Sequence[HTTPMatchRequest | None] = http.match or [None]
        for j, match in enumerate(matches):
            if match is not None and match.port is not None and port and match.port != port:
                continue
            steps: list[RequestFilter] = []
            if request_headers is not None:
                steps.append(request_headers)
            if http.rewrite is not None and (http.rewrite.uri or http.rewrite.authority):
                prefix = match.uri.prefix if match is not None and match.uri else None
                steps.append(_Rewrite(http.rewrite.uri or None, prefix, http.rewrite.authority))
            filters = FilterChain(tuple(steps), response_headers, mirrors, fault)
            rule = CompiledRule(i, http.name, choices, filters, timeouts, retry, grpc=False)
            matcher = _VSMatcher(match, f"{where}.match[{j}]", problems)
            entries.append((matcher, display, rule))
    return entries


def _destinations(
    http: VirtualServiceHTTPRoute, ctx: _Where, where: str
) -> list[tuple[int, Backend | None]]:
    single = len(http.route) == 1
    choices: list[tuple[int, Backend | None]] = []
    for k, dest in enumerate(http.route):
        weight = dest.weight if dest.weight is not None else (100 if single else 0)
        service = resolve_host(dest.destination.host, ctx.namespace, ctx.cluster_domain)
        if service is None:
            ctx.problems.append(
                f"{where}.route[{k}]: host {dest.destination.host!r} does not name a Service"
            )
            choices.append((weight, None))  # its share answers 500, like an invalid backendRef
            continue
        ns, name = service
        dest_port = dest.destination.port.number if dest.destination.port else ctx.port
        headers = dest.headers
        filters = FilterChain(
            (req,) if (req := _header_ops(headers.request if headers else None, True)) else (),
            _header_ops(headers.response if headers else None, False),
        )
        backend = Backend(
            ns,
            name,
            dest_port,
            weight,
            ctx.hostname(ns, name),
            filters,
            dest.destination.subset,
        )
        choices.append((weight, backend))
    return choices


def _mirrors(http: VirtualServiceHTTPRoute, ctx: _Where, where: str) -> tuple[Mirror, ...]:
    mirror = http.mirror
    if mirror is None:
        return ()
    service = resolve_host(mirror.host, ctx.namespace, ctx.cluster_domain)
    if service is None:
        ctx.problems.append(f"{where}.mirror: host {mirror.host!r} does not name a Service")
        return ()
    if mirror.subset is not None:
        ctx.problems.append(f"{where}.mirror: subset is not honoured; the whole Service gets it")
    ns, name = service
    fraction = http.mirror_percentage.value / 100 if http.mirror_percentage else 1.0
    port = mirror.port.number if mirror.port else ctx.port
    return (Mirror(ns, name, port, ctx.hostname(ns, name), fraction),)


def _timeouts_and_retry(http: VirtualServiceHTTPRoute) -> tuple[Timeouts, RetryPolicy | None]:
    request = (duration_seconds(http.timeout) or None) if http.timeout is not None else None
    retries: HTTPRetry | None = http.retries
    if retries is None:
        retry: RetryPolicy | None = DEFAULT_VS_RETRY
        per_try = None
    else:
        per_try = duration_seconds(retries.per_try_timeout) if retries.per_try_timeout else None
        attempts = retries.attempts or 0
        retry = RetryPolicy(attempts, retry_codes(retries.retry_on), DEFAULT_RETRY_BACKOFF)
        if attempts == 0:
            retry = None
    if request is None and per_try is None:
        return NO_TIMEOUTS, retry
    return Timeouts(request, per_try or None), retry


def retry_codes(retry_on: str | None) -> frozenset[int]:
    """The statuses a `retryOn` list retries (Istio's default when unset: 503)."""
    if retry_on is None:
        return DEFAULT_VS_RETRY.codes
    codes: set[int] = set()
    for token in (t.strip() for t in retry_on.split(",")):
        if token.isdigit():
            codes.add(int(token))
        else:
            codes |= _RETRY_ON_CODES.get(token, frozenset())
    return frozenset(codes)


def _header_ops(ops: HeaderOperations | None, request: bool) -> HeaderModifier | None:
    """Istio header operations as a HeaderModifier (lower-case names; for a request, setting
    `host` sets the authority)."""
    if ops is None or not (ops.set or ops.add or ops.remove):
        return None
    return header_modifier(ops.set.items(), ops.add.items(), ops.remove, request=request)


@dataclass(frozen=True, slots=True)
class _Rewrite:
    """`rewrite`: `uri` replaces the matched prefix (a prefix match) or the whole path (any
    other match), keeping the query; `authority` replaces the authority."""

    uri: str | None
    prefix: str | None
    authority: str | None

    def on_request(self, request: Request, port: int) -> Response | None:
        if self.uri is not None:
            path, sep, query = request.path.partition("?")
            if self.prefix is not None and len(path) >= len(self.prefix):
                path = self.uri + path[len(self.prefix) :]
            else:
                path = self.uri
            request.path = f"{path or '/'}{sep}{query}"
        if self.authority:
            request.authority = self.authority
        return None


# --------------------------------------------------------------------------- matching


class _StringCondition:
    """One StringMatch: exact, prefix, regex (a full match, as Envoy's), or presence."""

    __slots__ = ("exact", "fold", "prefix", "regex")

    def __init__(self, match: StringMatch, fold: bool = False) -> None:
        self.fold = fold
        self.exact = match.exact.lower() if fold and match.exact is not None else match.exact
        self.prefix = match.prefix.lower() if fold and match.prefix is not None else match.prefix
        flags = re.IGNORECASE if fold else 0
        self.regex = re.compile(match.regex, flags) if match.regex is not None else None

    def ok(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.fold:
            value = value.lower()
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return True  # no value given: the header or parameter is present


class _VSMatcher:
    """One `match` entry of an http route (None: everything); all its conditions must hold."""

    __slots__ = (
        "always",
        "authority",
        "headers",
        "method",
        "never",
        "params",
        "scheme",
        "uri",
        "without",
    )

    def __init__(self, match: HTTPMatchRequest | None, where: str, problems: list[str]) -> None:
        self.never = False
        self.uri: _StringCondition | None = None
        self.scheme: _StringCondition | None = None
        self.method: _StringCondition | None = None
        self.authority: _StringCondition | None = None
        self.headers: tuple[tuple[str, _StringCondition], ...] = ()
        self.params: tuple[tuple[str, _StringCondition], ...] = ()
        self.without: tuple[tuple[str, _StringCondition], ...] = ()
        self.always = match is None
        if match is None:
            return
        if match.source_labels or match.source_namespace:
            problems.append(
                f"{where}: sourceLabels/sourceNamespace are not honoured at the waypoint; "
                "this match never matches"
            )
            self.never = True
        fold = bool(match.ignore_uri_case)
        self.uri = _StringCondition(match.uri, fold) if match.uri else None
        self.scheme = _StringCondition(match.scheme) if match.scheme else None
        self.method = _StringCondition(match.method) if match.method else None
        self.authority = _StringCondition(match.authority) if match.authority else None
        self.headers = tuple((n, _StringCondition(m)) for n, m in match.headers.items())
        self.params = tuple((n, _StringCondition(m)) for n, m in match.query_params.items())
        self.without = tuple((n, _StringCondition(m)) for n, m in match.without_headers.items())

    def matches(self, view: RequestView) -> bool:
        if self.never:
            return False
        request = view.request
        if self.uri is not None and not self.uri.ok(view.path):
            return False
        if self.method is not None and not self.method.ok(request.method):
            return False
        if self.scheme is not None and not self.scheme.ok(request.scheme):
            return False
        if self.authority is not None and not self.authority.ok(request.authority):
            return False
        for name, condition in self.headers:
            if not condition.ok(view.header(name)):
                return False
        for name, condition in self.params:
            if not condition.ok(view.param(name)):
                return False
        return not any(condition.ok(view.header(name)) for name, condition in self.without)
