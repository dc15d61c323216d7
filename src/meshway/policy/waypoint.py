"""L7 authorization at the waypoint: AuthorizationPolicies attached with `targetRefs`.

The node proxy enforces `selector` and namespace-wide policies on connections (see
`authorization.py`); a waypoint enforces the policies that target the Service a request is for
or the waypoint's own Gateway, on every request, with the attributes only it can see.

Semantics follow Istio's (istio.io "Authorization Policy" reference):

- Which policies: `targetRefs` naming the request's Service (kind Service, group "" or "core",
  in the policy's namespace), the waypoint's Gateway (kind Gateway, group
  gateway.networking.k8s.io, in the policy's namespace), or, from the root namespace, the
  GatewayClass `istio-waypoint` (every waypoint).
- Order: CUSTOM first (not supported here: a CUSTOM policy denies, so that an unenforced
  external check never lets a request through), then DENY, then ALLOW: with no ALLOW policy
  the request is allowed; with some, one of their rules must match. AUDIT never changes the
  decision; matching AUDIT policies are reported.
- A rule matches when one of its `from` entries, one of its `to` entries and every `when`
  condition match; the fields of one entry are AND'ed. A rule with nothing matches everything,
  a policy without rules matches nothing.
- Strings: exact, `*`, `prefix*`, `*suffix`. Paths are matched without the query string, after
  the normalization Envoy applies by default in Istio (`%2E` decoded, RFC 3986 dot segments
  removed, keeping a final slash) plus merging of repeated slashes; the waypoint forwards that
  normalized path, so the backend serves the path the policy checked. Hosts are matched
  case-insensitively, with and without the port: a deliberate difference from Istio, which
  matches the `Host` exactly and asks users to write `host:*` for a port (that form works too).
  Methods are case-sensitive. Header names in `request.headers[...]` are case-insensitive.
- The identity attributes (principals, namespaces, serviceAccounts, trustDomains) are those of
  the *original client*: the waypoint receives its tunnel from the client's node proxy, which
  presents the client's certificate.
- `requestPrincipals`/`notRequestPrincipals` and the `when` keys `request.auth.principal`,
  `request.auth.audiences`, `request.auth.presenter`, `request.auth.claims[a]` and nested
  `request.auth.claims[a][b]` read the JWT that RequestAuthentication verified (`requestauth.py`;
  a list claim matches when one of its elements does). A request without a verified token has
  no request principal and no claims: `requestPrincipals: ["*"]` requires one.
- `connection.sni` cannot be evaluated: an ALLOW rule naming it never matches; in DENY and
  AUDIT the whole `when` condition counts as matching, which fails closed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, TypeVar

from meshway.api.v1 import authorization_pb2
from meshway.identity.spiffe import SpiffeId
from meshway.policy.authorization import DEFAULT_ROOT_NAMESPACE, Decision, Wildcards

if TYPE_CHECKING:
    from meshway.policy.requestauth import RequestAuth

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")
GATEWAY_GROUP = "gateway.networking.k8s.io"
WAYPOINT_CLASS = "istio-waypoint"
DENIED_BODY = "RBAC: access denied"


@dataclass(slots=True)
class RequestContext:
    """One request as authorization sees it."""

    source_ip: IpAddress
    identity: SpiffeId | None
    destination_ip: IpAddress
    destination_port: int
    method: str
    # The request target as sent ("/a/../b?x=1"); `path` is derived from it.
    target: str
    host: str
    raw_headers: Sequence[tuple[str, str]]
    # The JWT RequestAuthentication verified, if any.
    auth: RequestAuth | None = None
    _path: str | None = field(default=None, repr=False)
    _headers: dict[str, str] | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        if self._path is None:
            target = self.target
            if not target.startswith("/") and "://" in target:  # absolute form
                target = "/" + target.split("://", 1)[1].partition("/")[2]
            self._path = normalize_path(target)
        return self._path

    def header(self, name: str) -> str | None:
        if self._headers is None:
            joined: dict[str, str] = {}
            for key, value in self.raw_headers:
                joined[key] = f"{joined[key]},{value}" if key in joined else value
            self._headers = joined
        return self._headers.get(name)


_ENCODED_DOT = re.compile("%2e", re.IGNORECASE)


def normalize_path(target: str) -> str:
    """The path of a request target as Envoy's default normalization leaves it: no query or
    fragment, `%2E` decoded to `.`, repeated slashes merged and dot segments removed as RFC 3986
    §5.2.4 does (`/a/b/..` is `/a/`, with its final slash)."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    if "%" in path:
        path = _ENCODED_DOT.sub(".", path)
    if "//" not in path and "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif segment == ".":
            if last:
                out.append("")
        elif segment or last:
            out.append(segment)
    return "/" + "/".join(out)


def normalize_target(target: str) -> str:
    """The request target with its path normalized and its query kept: what the waypoint
    checks, routes and forwards, so that the backend serves the path the policy allowed."""
    prefix = ""
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if not sep or not scheme.isalpha():
            return target  # "*" (OPTIONS) or something the HTTP parser would not pass on
        authority, slash, tail = rest.partition("/")
        prefix, target = f"{scheme}://{authority}", slash + tail
    path, mark, query = target.partition("?")
    normalized = normalize_path(path)
    if normalized == path:
        return prefix + target
    return f"{prefix}{normalized}{mark}{query}"


Check = Callable[[RequestContext], bool]


class _Unevaluable(Exception):
    pass


def _matcher(values: Iterable[str], *, lower: bool = False) -> Callable[[str | None], bool]:
    matches = Wildcards.of(values, lower=lower).matches

    def match(value: str | None) -> bool:
        if value is None:
            return False
        return matches(value.lower() if lower else value)

    return match


def _negatable(match: Callable[[RequestContext], bool], negate: bool) -> Check:
    if not negate:
        return match
    return lambda ctx: not match(ctx)


def _string_field(
    get: Callable[[RequestContext], str | None], values: Sequence[str], negate: bool
) -> Check:
    match = _matcher(values)
    return _negatable(lambda ctx: match(get(ctx)), negate)


def _ip_field(
    get: Callable[[RequestContext], IpAddress], values: Sequence[str], negate: bool
) -> Check:
    try:
        networks = [ipaddress.ip_network(v, strict=False) for v in values]
    except ValueError as exc:
        raise _Unevaluable(str(exc)) from exc
    return _negatable(lambda ctx: any(get(ctx) in net for net in networks), negate)


def _port_field(values: Iterable[int | str], negate: bool) -> Check:
    try:
        ports = frozenset(int(v) for v in values)
    except ValueError as exc:
        raise _Unevaluable(str(exc)) from exc
    return _negatable(lambda ctx: ctx.destination_port in ports, negate)


def _host_field(values: Sequence[str], negate: bool) -> Check:
    match = _matcher(values, lower=True)

    def check(ctx: RequestContext) -> bool:
        host = ctx.host
        if match(host):
            return True
        bare, colon, port = host.rpartition(":")
        return bool(colon) and port.isdigit() and match(bare)

    return _negatable(check, negate)


def _service_accounts(values: Sequence[str], namespace: str, negate: bool) -> Check:
    wanted = {
        tuple(v.split("/", 1)) if "/" in v else (namespace, v)  # "sa" is in the policy's ns
        for v in values
    }

    def check(ctx: RequestContext) -> bool:
        peer = ctx.identity
        return peer is not None and (peer.namespace, peer.service_account) in wanted

    return _negatable(check, negate)


def _identity(attr: str) -> Callable[[RequestContext], str | None]:
    def get(ctx: RequestContext) -> str | None:
        peer = ctx.identity
        return getattr(peer, attr) if peer is not None else None

    return get


def _source_checks(source: authorization_pb2.Source, namespace: str) -> list[Check]:
    checks: list[Check] = []
    for negate in (False, True):
        p = "not_" if negate else ""
        if values := getattr(source, f"{p}principals"):
            checks.append(_string_field(_identity("principal"), values, negate))
        if values := getattr(source, f"{p}namespaces"):
            checks.append(_string_field(_identity("namespace"), values, negate))
        if values := getattr(source, f"{p}trust_domains"):
            checks.append(_string_field(_identity("trust_domain"), values, negate))
        if values := getattr(source, f"{p}service_accounts"):
            checks.append(_service_accounts(values, namespace, negate))
        for name in ("ip_blocks", "remote_ip_blocks"):
            if values := getattr(source, f"{p}{name}"):
                checks.append(_ip_field(lambda ctx: ctx.source_ip, values, negate))
        if values := getattr(source, f"{p}request_principals"):
            checks.append(_string_field(_request_principal, values, negate))
    return checks


def _request_principal(ctx: RequestContext) -> str | None:
    return ctx.auth.principal if ctx.auth is not None else None


def _any_value_field(
    get: Callable[[RequestContext], Sequence[str]], values: Sequence[str], negate: bool
) -> Check:
    """A multi-valued attribute (audiences, a list claim): one of its values must match."""
    match = _matcher(values)

    def any_value(ctx: RequestContext) -> bool:
        for value in get(ctx):  # noqa: SIM110 (a loop: no generator per request)
            if match(value):
                return True
        return False

    return _negatable(any_value, negate)


_CLAIM_PATH = re.compile(r"\[([^\[\]]+)\]")


def _claim_path(key: str) -> tuple[str, ...]:
    """`request.auth.claims[a][b]` -> ("a", "b")."""
    rest = key[len("request.auth.claims") :]
    names = _CLAIM_PATH.findall(rest)
    if not names or "".join(f"[{n}]" for n in names) != rest:
        raise _Unevaluable(f"when {key}")
    return tuple(names)


def _auth_condition(key: str, values: Sequence[str], negate: bool) -> Check:
    if key == "request.auth.principal":
        return _string_field(_request_principal, values, negate)
    if key == "request.auth.presenter":
        return _string_field(
            lambda ctx: ctx.auth.presenter if ctx.auth is not None else None, values, negate
        )
    if key == "request.auth.audiences":
        return _any_value_field(
            lambda ctx: ctx.auth.audiences if ctx.auth is not None else (), values, negate
        )
    if key.startswith("request.auth.claims["):
        path = _claim_path(key)
        return _any_value_field(
            lambda ctx: ctx.auth.claim(path) if ctx.auth is not None else (), values, negate
        )
    raise _Unevaluable(f"when {key}")


def _operation_checks(operation: authorization_pb2.Operation) -> list[Check]:
    checks: list[Check] = []
    for negate in (False, True):
        p = "not_" if negate else ""
        if values := getattr(operation, f"{p}methods"):
            checks.append(_string_field(lambda ctx: ctx.method, values, negate))
        if values := getattr(operation, f"{p}paths"):
            checks.append(_string_field(lambda ctx: ctx.path, values, negate))
        if values := getattr(operation, f"{p}hosts"):
            checks.append(_host_field(values, negate))
        if values := getattr(operation, f"{p}ports"):
            checks.append(_port_field(values, negate))
    return checks


def _header(name: str) -> Callable[[RequestContext], str | None]:
    return lambda ctx: ctx.header(name)


def _condition_checks(condition: authorization_pb2.Condition, namespace: str) -> list[Check]:
    key = condition.key
    checks: list[Check] = []
    for values, negate in ((condition.values, False), (condition.not_values, True)):
        if not values:
            continue
        if key.startswith("request.headers[") and key.endswith("]"):
            name = key[len("request.headers[") : -1].lower()
            checks.append(_string_field(_header(name), values, negate))
        elif key in ("source.ip", "remote.ip"):
            checks.append(_ip_field(lambda ctx: ctx.source_ip, values, negate))
        elif key == "destination.ip":
            checks.append(_ip_field(lambda ctx: ctx.destination_ip, values, negate))
        elif key == "destination.port":
            checks.append(_port_field(values, negate))
        elif key == "source.namespace":
            checks.append(_string_field(_identity("namespace"), values, negate))
        elif key == "source.principal":
            checks.append(_string_field(_identity("principal"), values, negate))
        elif key == "source.serviceAccount":
            checks.append(_service_accounts(values, namespace, negate))
        elif key.startswith("request.auth."):
            checks.append(_auth_condition(key, values, negate))
        else:
            raise _Unevaluable(f"when {key}")
    return checks


def _all(checks: Sequence[Check]) -> Check | None:
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)
    return lambda ctx: all(check(ctx) for check in frozen)


def _any_entry(entries: list[list[Check]]) -> Check | None:
    """OR of entries, each an AND of checks; None when unconstrained."""
    if not entries or any(not entry for entry in entries):
        return None
    alternatives = tuple(alt for entry in entries if (alt := _all(entry)) is not None)

    def any_of(ctx: RequestContext) -> bool:
        return any(alternative(ctx) for alternative in alternatives)

    return any_of


@dataclass(frozen=True, slots=True)
class L7Rule:
    checks: tuple[Check, ...]
    # Attributes this waypoint cannot evaluate (the rule then fails closed).
    unevaluable: tuple[str, ...] = ()
    # The rule cannot match a request without a verified JWT: one of its checks requires a
    # request principal or a claim (`requestPrincipals`, a `when` on `request.auth.*`).
    needs_auth: bool = False

    def matches(self, ctx: RequestContext) -> bool:
        for check in self.checks:  # noqa: SIM110 (a loop: cheaper than all() and a generator)
            if not check(ctx):
                return False
        return True


def _compile_entries(
    items: Iterable[T], build: Callable[[T], list[Check]], unevaluable: list[str]
) -> Check | None:
    entries: list[list[Check]] = []
    for item in items:
        try:
            entries.append(build(item))
        except _Unevaluable as exc:
            unevaluable.append(str(exc))
            entries.append([])  # unconstrained: decided below by the policy's action
    return _any_entry(entries)


@dataclass(frozen=True, slots=True)
class L7Policy:
    name: str
    action: authorization_pb2.Action.ValueType
    rules: tuple[L7Rule, ...]

    def matching_rule(self, ctx: RequestContext) -> L7Rule | None:
        for rule in self.rules:
            if rule.matches(ctx):
                return rule
        return None


@lru_cache(maxsize=4096)
def _compile(data: bytes) -> L7Policy:
    policy = authorization_pb2.Authorization.FromString(data)
    rules: list[L7Rule] = []
    for rule in policy.rules:
        unevaluable: list[str] = []
        sources = getattr(rule, "from")
        from_check = _compile_entries(
            sources, lambda s: _source_checks(s, policy.namespace), unevaluable
        )
        # Every `from` entry requires a request principal (and each could be evaluated).
        needs_auth = (
            from_check is not None
            and not unevaluable
            and all(source.request_principals for source in sources)
        )
        checks = [from_check, _compile_entries(rule.to, _operation_checks, unevaluable)]
        for condition in rule.when:
            try:
                checks.extend(_condition_checks(condition, policy.namespace))
            except _Unevaluable as exc:
                unevaluable.append(str(exc))
                continue
            # A non-negated `request.auth.*` condition is false without a verified JWT.
            needs_auth |= condition.key.startswith("request.auth.") and bool(condition.values)
        if unevaluable and policy.action == authorization_pb2.ALLOW:
            continue  # an ALLOW rule we cannot fully check never matches
        rules.append(
            L7Rule(
                tuple(c for c in checks if c is not None),
                tuple(dict.fromkeys(unevaluable)),
                needs_auth,
            )
        )
    return L7Policy(f"{policy.namespace}/{policy.name}", policy.action, tuple(rules))


def compile_l7(policy: authorization_pb2.Authorization) -> L7Policy:
    return _compile(policy.SerializeToString(deterministic=True))


@dataclass(frozen=True, slots=True)
class L7PolicySet:
    """The policies of one target, in evaluation order."""

    custom: tuple[L7Policy, ...] = ()
    deny: tuple[L7Policy, ...] = ()
    allow: tuple[L7Policy, ...] = ()
    audit: tuple[L7Policy, ...] = ()
    # The decision for every request without a verified JWT, when it is known without
    # looking at the request: no ALLOW or CUSTOM policy, and no DENY or AUDIT rule that can
    # match such a request (the common "deny on a claim" set). None: evaluate each request.
    unauthenticated: Decision | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.custom and not self.allow:
            policies = (*self.deny, *self.audit)
            if all(rule.needs_auth for policy in policies for rule in policy.rules):
                decision = Decision(True, None, "no ALLOW policy")
                object.__setattr__(self, "unauthenticated", decision)

    @property
    def empty(self) -> bool:
        return not (self.custom or self.deny or self.allow or self.audit)

    def evaluate(self, ctx: RequestContext) -> Decision:
        if self.custom:
            name = self.custom[0].name
            return Decision(
                False, name, f"CUSTOM policy {name}: external authorization not supported"
            )
        for policy in self.deny:
            if policy.matching_rule(ctx) is not None:
                return Decision(False, policy.name, f"denied by {policy.name}")
        audited = [p.name for p in self.audit if p.matching_rule(ctx) is not None]
        if not self.allow:
            return Decision(True, None, "no ALLOW policy", audited)
        for policy in self.allow:
            if policy.matching_rule(ctx) is not None:
                return Decision(True, policy.name, f"allowed by {policy.name}", audited)
        names = ", ".join(p.name for p in self.allow)
        return Decision(False, None, f"no ALLOW rule matched ({names})", audited)


def _targets(
    ref: authorization_pb2.TargetRef,
    policy_namespace: str,
    service: tuple[str, str],
    gateway: tuple[str, str],
    root_namespace: str,
) -> bool:
    namespace = ref.namespace or policy_namespace
    if ref.kind == "Service" and ref.group in ("", "core"):
        return (namespace, ref.name) == service and namespace == policy_namespace
    if ref.kind == "Gateway" and ref.group == GATEWAY_GROUP:
        return (namespace, ref.name) == gateway and namespace == policy_namespace
    if ref.kind == "GatewayClass" and ref.group == GATEWAY_GROUP:
        return ref.name == WAYPOINT_CLASS and policy_namespace == root_namespace
    return False


class WaypointPolicyIndex:
    """The targetRefs policies of one snapshot, grouped per Service on first use."""

    def __init__(
        self,
        policies: Iterable[authorization_pb2.Authorization],
        gateway: tuple[str, str],
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> None:
        self._policies = sorted(
            (p for p in policies if p.scope == authorization_pb2.TARGET_REF),
            key=lambda p: (p.namespace, p.name),
        )
        self.gateway = gateway
        self.root_namespace = root_namespace
        self._sets: dict[tuple[str, str], L7PolicySet] = {}

    def policy_set(self, namespace: str, service: str) -> L7PolicySet:
        key = (namespace, service)
        found = self._sets.get(key)
        if found is None:
            groups: dict[int, list[L7Policy]] = {}
            for policy in self._policies:
                if any(
                    _targets(ref, policy.namespace, key, self.gateway, self.root_namespace)
                    for ref in policy.target_refs
                ):
                    groups.setdefault(policy.action, []).append(compile_l7(policy))
            found = L7PolicySet(
                custom=tuple(groups.get(authorization_pb2.CUSTOM, ())),
                deny=tuple(groups.get(authorization_pb2.DENY, ())),
                allow=tuple(groups.get(authorization_pb2.ALLOW, ())),
                audit=tuple(groups.get(authorization_pb2.AUDIT, ())),
            )
            self._sets[key] = found
        return found
