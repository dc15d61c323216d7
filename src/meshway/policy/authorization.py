"""L4 authorization at the node proxy: which policies apply to a workload, and whether they let
one connection in.

A pure core, called for every inbound connection and again for every open connection when the
policies change, so the work is split in two: `compile_policy` turns an `Authorization` message
into plain Python checks once (CIDRs parsed, wildcards split, service accounts resolved), and
evaluation then only does int, set and string work. Compiled policies are cached by the
message's serialized bytes, so an unchanged policy is never compiled twice and a changed one is
never served stale. On the hot path, a `PolicyIndex` built from the snapshot hands out each
workload's `PolicySet`, already compiled and sorted by action.

Semantics follow Istio, and ztunnel where the node proxy is concerned:

- No policy: allow. Any matching DENY denies; then, if an ALLOW policy applies, one must match.
  AUDIT only reports (`Decision.audited`). CUSTOM and targetRefs policies are enforced by
  waypoints (istiod does not even send them to ztunnel: `convertAuthorizationPolicy` in
  istio/istio `pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`), so the node
  proxy ignores them and says so in the reason.
- A policy without rules matches nothing; a rule without from/to/when matches everything; from
  entries are OR'ed, to entries OR'ed, when conditions AND'ed, and the fields of one entry AND'ed
  (istio/ztunnel `src/rbac.rs`, `Authorization::matches`).
- L4 attributes: the peer identity (principals, namespaces, serviceAccounts as `sa` in the
  policy's namespace or `ns/sa`, trustDomains — a Meshway extension — and `source.principal`,
  `source.namespace`, `source.serviceAccount`), the source IP (ipBlocks, remoteIpBlocks,
  `source.ip`, `remote.ip`), the destination IP (`destination.ip`) and port (ports,
  `destination.port`). Strings match exactly, or `*` (any), `*suffix`, `prefix*` as in istiod's
  `stringToMatch`; IPs as CIDRs or bare addresses, IPv4 and IPv6.
- Identity fields never match a connection without a peer identity, so their `not*` forms
  always do: `notPrincipals: [x]` alone lets plaintext through an ALLOW and denies it in a DENY.
  That is ztunnel's `rbac_test!(not_principals, ...)` (plaintext => true) and Envoy's (a
  `not_id` of an `authenticated` principal is true without TLS).
- Attributes the node proxy cannot see (hosts, methods, paths, requestPrincipals, and every
  other when key, `connection.sni` included: the node proxy does not read the tunnelled TLS)
  fail closed, as in Istio's sidecar model (`checkError` in istio/istio
  `pilot/pkg/security/authz/model/model.go`) and istiod's ambient `handleRule`: an ALLOW rule that
  names one never matches; in DENY and AUDIT the attribute is dropped, so the rest of the rule
  decides, and a rule left with no L4 constraint matches everything. ztunnel skips a match group
  left empty (`mg.is_empty()` in `rbac.rs`), which makes a DENY with only HTTP attributes a
  no-op (istio/istio#61126); we deny instead, as the brief (§3) requires. A value that cannot be
  parsed (a bad CIDR or port) is treated the same way.
- remoteIpBlocks and `remote.ip` compare against the source IP: without X-Forwarded-For or PROXY
  protocol that is the remote address, as in Envoy's network RBAC filter for sidecar TCP
  traffic. istiod's ambient translation flags them as HTTP-only instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter

from meshway.api.v1 import address_pb2, authorization_pb2
from meshway.identity.spiffe import SpiffeId

DEFAULT_ROOT_NAMESPACE = "istio-system"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_key(ip: IpAddress) -> tuple[int, int]:
    """(family, integer) with IPv4-mapped IPv6 folded to IPv4, as a dual-stack socket reports it."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return 4, int(ip.ipv4_mapped)
    return ip.version, int(ip)


@dataclass(frozen=True, slots=True)
class Connection:
    """What the node proxy knows about an inbound connection when it decides on it.

    `source_identity` is the peer's SPIFFE ID from its mTLS certificate, None for plaintext from
    outside the mesh. `destination_namespace` is the destination workload's; the policies that
    apply are chosen by `applicable_policies`, it is carried so that a decision can be reported.
    """

    source_ip: IpAddress
    source_identity: SpiffeId | None
    destination_ip: IpAddress
    destination_port: int
    destination_namespace: str
    # Derived once per connection so that the checks compare ints and strings only.
    _source: tuple[int, int] = field(init=False, repr=False, compare=False)
    _destination: tuple[int, int] = field(init=False, repr=False, compare=False)
    _principal: str | None = field(init=False, repr=False, compare=False)
    _namespace: str | None = field(init=False, repr=False, compare=False)
    _service_account: tuple[str, str] | None = field(init=False, repr=False, compare=False)
    _trust_domain: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "_source", _ip_key(self.source_ip))
        put(self, "_destination", _ip_key(self.destination_ip))
        peer = self.source_identity
        put(self, "_principal", peer.principal if peer else None)
        put(self, "_namespace", peer.namespace if peer else None)
        put(self, "_service_account", (peer.namespace, peer.service_account) if peer else None)
        put(self, "_trust_domain", peer.trust_domain if peer else None)


@dataclass(frozen=True)
class Decision:
    """The verdict, the "ns/name" of the policy that made it (None for a default), a reason
    for logs and the AUDIT policies that matched."""

    allowed: bool
    policy: str | None
    reason: str
    audited: list[str] = field(default_factory=list)


Check = Callable[[Connection], bool]


class _Unevaluable(Exception):
    """An attribute the node proxy cannot evaluate: L7, or a value it cannot parse."""


@dataclass(frozen=True, slots=True)
class Wildcards:
    """Istio's string patterns, split once: `*` any, `*x` suffix, `x*` prefix, else exact.

    Shared by the node proxy's checks and the waypoint's (`policy/waypoint.py`)."""

    anything: bool
    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]

    @classmethod
    def of(cls, values: Iterable[str], *, lower: bool = False) -> Wildcards:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        anything = False
        for raw in values:
            value = raw.lower() if lower else raw
            if value == "*":
                anything = True
            elif value.startswith("*"):
                suffixes.append(value[1:])
            elif value.endswith("*"):
                prefixes.append(value[:-1])
            else:
                exact.add(value)
        return cls(anything, frozenset(exact), tuple(prefixes), tuple(suffixes))

    @property
    def exact_only(self) -> bool:
        return not (self.anything or self.prefixes or self.suffixes)

    def matches(self, value: str) -> bool:
        return (
            self.anything
            or value in self.exact
            or value.startswith(self.prefixes)
            or value.endswith(self.suffixes)
        )


def _string_check(
    get: Callable[[Connection], str | None], values: Iterable[str], negate: bool
) -> Check:
    """Istio's string match (`Wildcards`); None never matches."""
    patterns = Wildcards.of(values)
    if patterns.exact_only:
        exact_set = patterns.exact

        def check_exact(conn: Connection) -> bool:
            return (get(conn) in exact_set) != negate  # None is in no set of strings

        return check_exact

    matches = patterns.matches

    def check(conn: Connection) -> bool:
        value = get(conn)
        if value is None:
            return negate
        return matches(value) != negate

    return check


_IpTable = tuple[tuple[int, frozenset[int]], ...]


def _ip_tables(values: Iterable[str]) -> dict[int, _IpTable]:
    """Per family, (netmask, network ints) per prefix length: one AND and one set lookup each."""
    groups: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
    for value in values:
        try:
            net = ipaddress.ip_network(value, strict=False)  # a bare IP is a /32 or /128
        except ValueError:
            raise _Unevaluable("invalid IP block") from None
        mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
        if mapped is not None and net.prefixlen >= 96:  # folded like the connection's address
            net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
        groups[net.version].setdefault(int(net.netmask), set()).add(int(net.network_address))
    return {
        family: tuple((mask, frozenset(nets)) for mask, nets in sorted(by_mask.items()))
        for family, by_mask in groups.items()
    }


def _ip_check(
    get: Callable[[Connection], tuple[int, int]], values: Iterable[str], negate: bool
) -> Check:
    tables = _ip_tables(values)
    v4, v6 = tables[4], tables[6]

    def check(conn: Connection) -> bool:
        family, ip = get(conn)
        for mask, networks in v4 if family == 4 else v6:
            if ip & mask in networks:
                return not negate
        return negate

    return check


def _port_check(ports: Iterable[int], negate: bool) -> Check:
    port_set = frozenset(ports)

    def check(conn: Connection) -> bool:
        return (conn.destination_port in port_set) != negate

    return check


def _parse_port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) > 65535:
        raise _Unevaluable("invalid port")
    return int(value)


def _service_account(value: str, policy_namespace: str) -> tuple[str, str]:
    namespace, slash, name = value.partition("/")
    return (namespace, name) if slash else (policy_namespace, value)


def _service_account_check(values: Iterable[str], policy_namespace: str, negate: bool) -> Check:
    """`sa` names a service account of the policy's namespace, `ns/sa` one of any namespace."""
    accounts = frozenset(_service_account(value, policy_namespace) for value in values)

    def check(conn: Connection) -> bool:
        account = conn._service_account
        return (account is not None and account in accounts) != negate

    return check


_get_principal: Callable[[Connection], str | None] = attrgetter("_principal")
_get_namespace: Callable[[Connection], str | None] = attrgetter("_namespace")
_get_trust_domain: Callable[[Connection], str | None] = attrgetter("_trust_domain")
_get_source: Callable[[Connection], tuple[int, int]] = attrgetter("_source")
_get_destination: Callable[[Connection], tuple[int, int]] = attrgetter("_destination")

# What each L4 attribute compares, built from its values, the policy's namespace and negation.
_Builder = Callable[[Sequence[str], str, bool], Check]
_BUILDERS: dict[str, _Builder] = {
    "principal": lambda values, _ns, neg: _string_check(_get_principal, values, neg),
    "namespace": lambda values, _ns, neg: _string_check(_get_namespace, values, neg),
    "trust_domain": lambda values, _ns, neg: _string_check(_get_trust_domain, values, neg),
    "service_account": _service_account_check,
    "source_ip": lambda values, _ns, neg: _ip_check(_get_source, values, neg),
    "destination_ip": lambda values, _ns, neg: _ip_check(_get_destination, values, neg),
    "destination_port": lambda values, _ns, neg: _port_check(map(_parse_port, values), neg),
}

# Source fields (and their not_ forms) by the attribute they compare; None: not visible at L4.
_SOURCE_FIELDS: dict[str, str | None] = {
    "principals": "principal",
    "namespaces": "namespace",
    "service_accounts": "service_account",
    "ip_blocks": "source_ip",
    "remote_ip_blocks": "source_ip",
    "trust_domains": "trust_domain",
    "request_principals": None,
}
_L7_OPERATION_FIELDS = ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths")
_CONDITION_KEYS: dict[str, str] = {
    "source.ip": "source_ip",
    "remote.ip": "source_ip",
    "source.namespace": "namespace",
    "source.principal": "principal",
    "source.serviceAccount": "service_account",
    "destination.ip": "destination_ip",
    "destination.port": "destination_port",
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _field_check(
    attribute: str | None,
    label: str,
    values: Sequence[str],
    namespace: str,
    negate: bool,
    unseen: list[str],
) -> Check | None:
    """The check for one non-empty field, or None (recorded in `unseen`) if L4 cannot see it."""
    if attribute is None:
        unseen.append(label)
        return None
    try:
        return _BUILDERS[attribute](values, namespace, negate)
    except _Unevaluable as exc:
        unseen.append(f"{label} ({exc})")
        return None


def _source_checks(
    source: authorization_pb2.Source, namespace: str, unseen: list[str]
) -> tuple[Check, ...]:
    checks: list[Check] = []
    for name, attribute in _SOURCE_FIELDS.items():
        for field_name, negate in ((name, False), (f"not_{name}", True)):
            values: Sequence[str] = getattr(source, field_name)
            if values:
                check = _field_check(
                    attribute, _camel(field_name), values, namespace, negate, unseen
                )
                if check is not None:
                    checks.append(check)
    return tuple(checks)


def _operation_checks(
    operation: authorization_pb2.Operation, unseen: list[str]
) -> tuple[Check, ...]:
    unseen.extend(_camel(name) for name in _L7_OPERATION_FIELDS if getattr(operation, name))
    checks: list[Check] = []
    if operation.ports:
        checks.append(_port_check(operation.ports, False))
    if operation.not_ports:
        checks.append(_port_check(operation.not_ports, True))
    return tuple(checks)


def _condition_checks(
    condition: authorization_pb2.Condition, namespace: str, unseen: list[str]
) -> list[Check]:
    attribute = _CONDITION_KEYS.get(condition.key)
    label = f"when {condition.key}"
    checks: list[Check] = []
    for values, negate in ((condition.values, False), (condition.not_values, True)):
        if values:
            check = _field_check(attribute, label, values, namespace, negate, unseen)
            if check is not None:
                checks.append(check)
    return checks


def _any_all(groups: tuple[tuple[Check, ...], ...], conn: Connection) -> bool:
    """True if every check of at least one group passes."""
    for checks in groups:
        for check in checks:
            if not check(conn):
                break
        else:
            return True
    return False


def _one_of(groups: Sequence[tuple[Check, ...]]) -> tuple[Check, ...]:
    """OR'ed from (or to) entries as checks to AND into their rule: none for no entries or an
    entry without constraints, the entry's own checks for a single entry (the common case)."""
    if not groups or not all(groups):
        return ()
    if len(groups) == 1:
        return groups[0]
    frozen = tuple(groups)

    def check(conn: Connection) -> bool:
        return _any_all(frozen, conn)

    return (check,)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule as a flat AND of checks, so that it costs one call per constraint."""

    checks: tuple[Check, ...]
    # Attributes the node proxy could not check; in a DENY/AUDIT rule they were treated as matching.
    unseen: tuple[str, ...]


def _compile_rule(rule: authorization_pb2.Rule, namespace: str) -> CompiledRule:
    unseen: list[str] = []
    sources: Iterable[authorization_pb2.Source] = getattr(rule, "from")
    from_checks = _one_of([_source_checks(source, namespace, unseen) for source in sources])
    to_checks = _one_of([_operation_checks(operation, unseen) for operation in rule.to])
    when_checks = tuple(
        check for cond in rule.when for check in _condition_checks(cond, namespace, unseen)
    )
    return CompiledRule(to_checks + from_checks + when_checks, tuple(dict.fromkeys(unseen)))


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """An `Authorization` turned into checks over a `Connection`; build with `compile_policy`."""

    name: str  # "ns/name"
    namespace: str
    scope: authorization_pb2.Scope.ValueType
    action: authorization_pb2.Action.ValueType
    rules: tuple[CompiledRule, ...]
    # ALLOW rules dropped because they need attributes the node proxy cannot check.
    skipped_l7: tuple[str, ...]
    # False for CUSTOM and targetRefs policies: the waypoint's to enforce, not the node proxy's.
    enforced: bool

    def matching_rule(self, conn: Connection) -> CompiledRule | None:
        for rule in self.rules:
            for check in rule.checks:
                if not check(conn):
                    break
            else:
                return rule
        return None

    def matches(self, conn: Connection) -> bool:
        return self.matching_rule(conn) is not None


@lru_cache(maxsize=4096)
def _compile_serialized(data: bytes) -> CompiledPolicy:
    policy = authorization_pb2.Authorization.FromString(data)
    rules: list[CompiledRule] = []
    skipped: list[str] = []
    for message in policy.rules:
        rule = _compile_rule(message, policy.namespace)
        if rule.unseen and policy.action == authorization_pb2.ALLOW:
            skipped.extend(rule.unseen)  # as istiod does for ztunnel: such ALLOW rules never match
            continue
        rules.append(rule)
    return CompiledPolicy(
        name=f"{policy.namespace}/{policy.name}",
        namespace=policy.namespace,
        scope=policy.scope,
        action=policy.action,
        rules=tuple(rules),
        skipped_l7=tuple(dict.fromkeys(skipped)),
        enforced=policy.action != authorization_pb2.CUSTOM
        and policy.scope != authorization_pb2.TARGET_REF,
    )


def compile_policy(policy: authorization_pb2.Authorization) -> CompiledPolicy:
    """Compile once per policy version: the cache is keyed by the message's serialized bytes."""
    return _compile_serialized(policy.SerializeToString(deterministic=True))


def _applies(
    policy: authorization_pb2.Authorization,
    key: str,
    workload: address_pb2.Workload,
    selected: Set[str],
    root_namespace: str,
) -> int | None:
    """The policy's rank (mesh, namespace, workload) if it applies to the workload, else None."""
    scope = policy.scope
    if scope == authorization_pb2.GLOBAL and policy.namespace == root_namespace:
        return 0
    if scope in (authorization_pb2.NAMESPACE, authorization_pb2.GLOBAL):
        # A GLOBAL scope outside the root namespace can only mean its own namespace.
        return 1 if policy.namespace == workload.namespace else None
    if scope == authorization_pb2.WORKLOAD_SELECTOR and key in selected:
        return 2
    return None  # TARGET_REF: for waypoints


def applicable_policies(
    workload: address_pb2.Workload,
    policies: Mapping[str, authorization_pb2.Authorization],
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> list[authorization_pb2.Authorization]:
    """The node-proxy policies of a workload: mesh-wide and namespace ones by name, then the
    selector ones in the workload's order (the first matching DENY names a decision).

    `policies` is keyed by resource name ("ns/name"), which is how `Workload.authorization_policies`
    names the selector policies the control plane resolved. This scans every policy; on the hot
    path use a `PolicyIndex`.
    """
    listed = {name: i for i, name in enumerate(workload.authorization_policies)}
    found: list[tuple[int, int, str, authorization_pb2.Authorization]] = []
    for key, policy in policies.items():
        rank = _applies(policy, key, workload, listed.keys(), root_namespace)
        if rank is not None:
            found.append((rank, listed.get(key, 0) if rank == 2 else 0, key, policy))
    found.sort(key=lambda item: item[:3])
    return [policy for *_, policy in found]


_POLICY_SET_CACHE_SIZE = 4096


class PolicyIndex:
    """The compiled policies of one snapshot, grouped by scope for a per-connection lookup.

    Build a new index when the snapshot changes: compilation is cached per policy version, so
    only the policies that changed are compiled again.
    """

    __slots__ = ("_by_namespace", "_mesh", "_selectable", "_sets", "root_namespace")

    def __init__(
        self,
        policies: Mapping[str, authorization_pb2.Authorization],
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> None:
        self.root_namespace = root_namespace
        mesh: list[CompiledPolicy] = []
        by_namespace: dict[str, list[CompiledPolicy]] = {}
        self._selectable: dict[str, CompiledPolicy] = {}
        for key, policy in sorted(policies.items()):
            scope = policy.scope
            if scope == authorization_pb2.TARGET_REF:
                continue
            compiled = compile_policy(policy)
            if scope == authorization_pb2.WORKLOAD_SELECTOR:
                self._selectable[key] = compiled
            elif scope == authorization_pb2.GLOBAL and policy.namespace == root_namespace:
                mesh.append(compiled)
            else:
                by_namespace.setdefault(policy.namespace, []).append(compiled)
        self._mesh = tuple(mesh)
        self._by_namespace = {ns: tuple(found) for ns, found in by_namespace.items()}
        self._sets: dict[tuple[str, tuple[str, ...]], PolicySet] = {}

    def applicable(self, workload: address_pb2.Workload) -> tuple[CompiledPolicy, ...]:
        """Same set and order as `applicable_policies`, in a few dict lookups."""
        found = self._mesh + self._by_namespace.get(workload.namespace, ())
        if workload.authorization_policies:
            selectable = self._selectable
            found += tuple(
                selectable[name] for name in workload.authorization_policies if name in selectable
            )
        return found

    def policy_set(self, workload: address_pb2.Workload) -> PolicySet:
        """The workload's policies ready to evaluate, memoized per (namespace, selector list)."""
        key = (workload.namespace, tuple(workload.authorization_policies))
        found = self._sets.get(key)
        if found is None:
            if len(self._sets) >= _POLICY_SET_CACHE_SIZE:
                self._sets.clear()  # workloads churned: start over rather than track recency
            found = self._sets[key] = PolicySet.of(self.applicable(workload))
        return found

    def evaluate(self, workload: address_pb2.Workload, conn: Connection) -> Decision:
        return self.policy_set(workload).evaluate(conn)


def _not_enforced_note(ignored: Sequence[CompiledPolicy]) -> str:
    if not ignored:
        return ""
    names = ", ".join(p.name for p in ignored)
    return (
        f" ({names}: CUSTOM and targetRefs policies are enforced by waypoints, not the node proxy)"
    )


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The policies of one workload sorted by what they do, so that deciding walks no more
    than it must: AUDIT (always), DENY (until one matches), then ALLOW (until one matches)."""

    audits: tuple[CompiledPolicy, ...] = ()
    denies: tuple[CompiledPolicy, ...] = ()
    allows: tuple[CompiledPolicy, ...] = ()
    # CUSTOM and targetRefs policies, kept only to say in a reason that they were not enforced.
    ignored: tuple[CompiledPolicy, ...] = ()

    @classmethod
    def of(cls, policies: Iterable[authorization_pb2.Authorization | CompiledPolicy]) -> PolicySet:
        groups: dict[str, list[CompiledPolicy]] = {
            "audits": [],
            "denies": [],
            "allows": [],
            "ignored": [],
        }
        for policy in policies:
            compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)
            if not compiled.enforced:
                groups["ignored"].append(compiled)
            elif compiled.action == authorization_pb2.DENY:
                groups["denies"].append(compiled)
            elif compiled.action == authorization_pb2.ALLOW:
                groups["allows"].append(compiled)
            else:
                groups["audits"].append(compiled)
        return cls(**{name: tuple(found) for name, found in groups.items()})

    def evaluate(self, conn: Connection) -> Decision:
        """DENY first, then ALLOW if any applies; the first matching DENY names the decision."""
        audited = [policy.name for policy in self.audits if policy.matches(conn)]
        for policy in self.denies:
            rule = policy.matching_rule(conn)
            if rule is not None:
                reason = f"denied by {policy.name}"
                if rule.unseen:
                    unseen = ", ".join(rule.unseen)
                    reason += f" (cannot be checked at L4, treated as matching: {unseen})"
                return Decision(False, policy.name, reason, audited)
        if not self.allows:
            if not (self.audits or self.denies or self.ignored):
                return Decision(True, None, "allowed: no authorization policies")
            reason = "allowed: no ALLOW policies" + _not_enforced_note(self.ignored)
            return Decision(True, None, reason, audited)
        for policy in self.allows:
            if policy.matches(conn):
                return Decision(True, policy.name, f"allowed by {policy.name}", audited)
        reason = "no ALLOW policy matched"
        l7 = [f"{p.name}: {', '.join(p.skipped_l7)}" for p in self.allows if p.skipped_l7]
        if l7:
            reason += f" (ALLOW rules that cannot be checked at L4 never match: {'; '.join(l7)})"
        return Decision(False, None, reason, audited)


def evaluate_authorization(
    policies: Iterable[authorization_pb2.Authorization | CompiledPolicy] | PolicySet,
    conn: Connection,
) -> Decision:
    """Decide on one connection under the policies that apply to its destination.

    Messages are compiled through the per-version cache; a `PolicySet` (from
    `PolicyIndex.policy_set`) skips compiling and sorting altogether.
    """
    policy_set = policies if isinstance(policies, PolicySet) else PolicySet.of(policies)
    return policy_set.evaluate(conn)


__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "CompiledPolicy",
    "Connection",
    "Decision",
    "IpAddress",
    "PolicyIndex",
    "PolicySet",
    "applicable_policies",
    "compile_policy",
    "evaluate_authorization",
]
