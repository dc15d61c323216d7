"""L4 authorization at the node proxy: which policies apply and what they decide."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import pytest

from meshway.api.v1 import address_pb2, authorization_pb2
from meshway.identity.spiffe import SpiffeId
from meshway.policy import (
    CompiledPolicy,
    Connection,
    Decision,
    PolicyIndex,
    PolicySet,
    applicable_policies,
    compile_policy,
    evaluate_authorization,
)

pytestmark = pytest.mark.unit

ALLOW = authorization_pb2.ALLOW
DENY = authorization_pb2.DENY
AUDIT = authorization_pb2.AUDIT
CUSTOM = authorization_pb2.CUSTOM

FRONTEND = "cluster.local/ns/web/sa/frontend"
BATCH = "cluster.local/ns/jobs/sa/batch"
OTHER_TD = "other.example/ns/web/sa/frontend"


def rule(
    frm: Sequence[dict[str, Any]] = (),
    to: Sequence[dict[str, Any]] = (),
    when: Sequence[dict[str, Any]] = (),
) -> authorization_pb2.Rule:
    return authorization_pb2.Rule(
        **{"from": [authorization_pb2.Source(**src) for src in frm]},
        to=[authorization_pb2.Operation(**op) for op in to],
        when=[authorization_pb2.Condition(**cond) for cond in when],
    )


def policy(
    name: str,
    action: authorization_pb2.Action.ValueType = ALLOW,
    rules: Sequence[authorization_pb2.Rule] = (),
    namespace: str = "shop",
    scope: authorization_pb2.Scope.ValueType = authorization_pb2.WORKLOAD_SELECTOR,
) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(
        name=name, namespace=namespace, scope=scope, action=action, rules=rules
    )


def conn(
    identity: str | None = FRONTEND,
    src: str = "10.0.0.5",
    dst: str = "10.0.1.7",
    port: int = 8080,
) -> Connection:
    return Connection(
        source_ip=ipaddress.ip_address(src),
        source_identity=SpiffeId.parse(f"spiffe://{identity}") if identity else None,
        destination_ip=ipaddress.ip_address(dst),
        destination_port=port,
        destination_namespace="shop",
    )


PLAINTEXT = conn(identity=None)


def allows(pol: authorization_pb2.Authorization, connection: Connection) -> bool:
    return evaluate_authorization([pol], connection).allowed


def matches(source: dict[str, Any], connection: Connection) -> bool:
    """Whether an ALLOW policy with one rule `from: [source]` lets the connection in."""
    return allows(policy("p", rules=[rule(frm=[source])]), connection)


# --- the decision -----------------------------------------------------------------------------


def test_no_policies_allow() -> None:
    assert evaluate_authorization([], conn()) == Decision(
        True, None, "allowed: no authorization policies", []
    )
    assert evaluate_authorization([], PLAINTEXT).allowed


def test_allow_match_and_no_match() -> None:
    pol = policy("allow-frontend", rules=[rule(frm=[{"principals": [FRONTEND]}])])
    assert evaluate_authorization([pol], conn()) == Decision(
        True, "shop/allow-frontend", "allowed by shop/allow-frontend", []
    )
    assert evaluate_authorization([pol], conn(BATCH)) == Decision(
        False, None, "no ALLOW policy matched", []
    )


def test_any_allow_policy_may_match() -> None:
    web = policy("web", rules=[rule(frm=[{"namespaces": ["web"]}])])
    jobs = policy("jobs", rules=[rule(frm=[{"namespaces": ["jobs"]}])])
    decision = evaluate_authorization([web, jobs], conn(BATCH))
    assert decision.allowed
    assert decision.policy == "shop/jobs"


def test_deny_is_evaluated_before_allow() -> None:
    allow_all = policy("allow-all", rules=[rule()])
    deny = policy("deny-frontend", DENY, [rule(frm=[{"principals": [FRONTEND]}])])
    decision = evaluate_authorization([allow_all, deny], conn())
    assert decision == Decision(False, "shop/deny-frontend", "denied by shop/deny-frontend", [])
    assert evaluate_authorization([allow_all, deny], conn(BATCH)).policy == "shop/allow-all"


def test_deny_without_match_and_without_allow_policies_allows() -> None:
    deny = policy("deny-batch", DENY, [rule(frm=[{"principals": [BATCH]}])])
    decision = evaluate_authorization([deny], conn())
    assert decision == Decision(True, None, "allowed: no ALLOW policies", [])
    assert not evaluate_authorization([deny], conn(BATCH)).allowed


def test_first_matching_deny_names_the_decision() -> None:
    first = policy("a", DENY, [rule()])
    second = policy("b", DENY, [rule()])
    assert evaluate_authorization([first, second], conn()).policy == "shop/a"


def test_audit_never_changes_the_decision() -> None:
    audit = policy("audit-all", AUDIT, [rule()])
    audit_batch = policy("audit-batch", AUDIT, [rule(frm=[{"principals": [BATCH]}])])
    allow_batch = policy("allow-batch", rules=[rule(frm=[{"principals": [BATCH]}])])
    deny_all = policy("deny-all", DENY, [rule()])

    only_audit = evaluate_authorization([audit, audit_batch], conn())
    assert only_audit == Decision(True, None, "allowed: no ALLOW policies", ["shop/audit-all"])

    denied = evaluate_authorization([audit, allow_batch], conn())
    assert not denied.allowed
    assert denied.audited == ["shop/audit-all"]

    allowed = evaluate_authorization([audit, audit_batch, allow_batch], conn(BATCH))
    assert allowed.allowed
    assert allowed.audited == ["shop/audit-all", "shop/audit-batch"]

    assert evaluate_authorization([deny_all, audit], conn()).audited == ["shop/audit-all"]


def test_custom_is_not_enforced_by_the_node_proxy() -> None:
    ext = policy("ext-authz", CUSTOM, [rule()])
    decision = evaluate_authorization([ext], conn())
    assert decision.allowed
    assert decision.policy is None
    assert "shop/ext-authz" in decision.reason
    assert "waypoint" in decision.reason
    # Next to an ALLOW policy it changes nothing either.
    allow = policy("allow-batch", rules=[rule(frm=[{"principals": [BATCH]}])])
    assert not evaluate_authorization([ext, allow], conn()).allowed


def test_target_ref_policies_are_ignored_even_if_passed() -> None:
    waypoint = policy("l7", DENY, [rule()], scope=authorization_pb2.TARGET_REF)
    decision = evaluate_authorization([waypoint], conn())
    assert decision.allowed
    assert "shop/l7" in decision.reason


# --- rules ------------------------------------------------------------------------------------


def test_policy_without_rules_matches_nothing() -> None:
    assert not allows(policy("allow-nothing"), conn())
    assert not allows(policy("allow-nothing"), PLAINTEXT)
    assert allows(policy("deny-nothing", DENY), conn())


def test_empty_rule_matches_everything() -> None:
    assert allows(policy("allow-all", rules=[rule()]), conn())
    assert allows(policy("allow-all", rules=[rule()]), PLAINTEXT)
    assert not allows(policy("deny-all", DENY, [rule()]), conn())
    assert not allows(policy("deny-all", DENY, [rule()]), PLAINTEXT)


def test_rules_from_and_to_entries_are_ored_fields_anded() -> None:
    # Two rules: either one.
    two_rules = policy(
        "p", rules=[rule(frm=[{"namespaces": ["web"]}]), rule(frm=[{"namespaces": ["jobs"]}])]
    )
    assert allows(two_rules, conn(FRONTEND))
    assert allows(two_rules, conn(BATCH))
    assert not allows(two_rules, conn("cluster.local/ns/ops/sa/x"))
    # Two from entries: either one; from AND to.
    ored = policy(
        "p",
        rules=[rule(frm=[{"namespaces": ["web"]}, {"namespaces": ["jobs"]}], to=[{"ports": [80]}])],
    )
    assert allows(ored, conn(BATCH, port=80))
    assert not allows(ored, conn(BATCH, port=81))
    # Two fields in one source: both.
    anded = {"namespaces": ["web"], "ip_blocks": ["10.0.0.0/24"]}
    assert matches(anded, conn(FRONTEND, src="10.0.0.9"))
    assert not matches(anded, conn(FRONTEND, src="10.9.0.9"))
    assert not matches(anded, conn(BATCH, src="10.0.0.9"))


# --- source fields ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "identity", "expected"),
    [
        (FRONTEND, FRONTEND, True),
        (FRONTEND, BATCH, False),
        ("*", FRONTEND, True),
        ("*", None, False),
        ("cluster.local/ns/web/*", FRONTEND, True),
        ("cluster.local/ns/web/*", BATCH, False),
        ("*/sa/frontend", FRONTEND, True),
        ("*/sa/frontend", OTHER_TD, True),
        ("*/sa/frontend", BATCH, False),
        ("cluster.local/ns/*/sa/frontend", FRONTEND, False),  # only a leading or trailing *
    ],
)
def test_principals(pattern: str, identity: str | None, expected: bool) -> None:
    assert matches({"principals": [pattern]}, conn(identity)) is expected


def test_not_principals() -> None:
    assert not matches({"not_principals": [FRONTEND]}, conn(FRONTEND))
    assert matches({"not_principals": [FRONTEND]}, conn(BATCH))
    assert not matches({"not_principals": ["*"]}, conn(FRONTEND))


@pytest.mark.parametrize(
    ("source", "identity", "expected"),
    [
        ({"namespaces": ["web"]}, FRONTEND, True),
        ({"namespaces": ["web"]}, BATCH, False),
        ({"namespaces": ["jobs", "web"]}, FRONTEND, True),
        ({"namespaces": ["we*"]}, FRONTEND, True),
        ({"namespaces": ["*obs"]}, BATCH, True),
        ({"namespaces": ["*"]}, BATCH, True),
        ({"not_namespaces": ["web"]}, FRONTEND, False),
        ({"not_namespaces": ["web"]}, BATCH, True),
        ({"namespaces": ["w*"], "not_namespaces": ["web"]}, FRONTEND, False),
    ],
)
def test_namespaces(source: dict[str, Any], identity: str, expected: bool) -> None:
    assert matches(source, conn(identity)) is expected


def test_service_accounts_short_form_is_in_the_policys_namespace() -> None:
    local = conn("cluster.local/ns/shop/sa/cart")
    assert matches({"service_accounts": ["cart"]}, local)
    assert not matches({"service_accounts": ["frontend"]}, conn(FRONTEND))  # web, not shop
    assert not matches({"service_accounts": ["cart"]}, conn("cluster.local/ns/web/sa/cart"))


def test_service_accounts_long_form_and_negation() -> None:
    assert matches({"service_accounts": ["web/frontend"]}, conn(FRONTEND))
    assert matches({"service_accounts": ["web/frontend"]}, conn(OTHER_TD))  # any trust domain
    assert not matches({"service_accounts": ["web/frontend"]}, conn(BATCH))
    assert not matches({"not_service_accounts": ["web/frontend"]}, conn(FRONTEND))
    assert matches({"not_service_accounts": ["web/frontend"]}, conn(BATCH))


@pytest.mark.parametrize(
    ("blocks", "src", "expected"),
    [
        (["10.0.0.0/24"], "10.0.0.5", True),
        (["10.0.0.0/24"], "10.0.1.5", False),
        (["10.0.0.5"], "10.0.0.5", True),
        (["10.0.0.5"], "10.0.0.6", False),
        (["10.0.0.7/24"], "10.0.0.200", True),  # host bits are ignored, as Envoy does
        (["0.0.0.0/0"], "192.168.1.1", True),
        (["0.0.0.0/0"], "fd00::1", False),  # an IPv4 block never matches an IPv6 source
        (["fd00::/64"], "fd00::1234", True),
        (["fd00::/64"], "fd00:0:0:1::1", False),
        (["fd00::1"], "fd00::1", True),
        (["fd00::1"], "fd00::2", False),
        (["192.168.0.0/16", "fd00::/8"], "fd12::1", True),
        (["10.0.0.0/24"], "::ffff:10.0.0.9", True),  # IPv4-mapped, as a dual-stack socket says
        (["::ffff:10.0.0.0/120"], "10.0.0.9", True),
    ],
)
def test_ip_blocks(blocks: list[str], src: str, expected: bool) -> None:
    assert matches({"ip_blocks": blocks}, conn(src=src)) is expected
    # At L4 there is no X-Forwarded-For: the remote IP is the source IP.
    assert matches({"remote_ip_blocks": blocks}, conn(src=src)) is expected
    assert matches({"not_ip_blocks": blocks}, conn(src=src)) is not expected
    assert matches({"not_remote_ip_blocks": blocks}, conn(src=src)) is not expected


def test_ip_blocks_do_not_need_an_identity() -> None:
    assert matches({"ip_blocks": ["10.0.0.0/8"]}, PLAINTEXT)
    assert not matches({"not_ip_blocks": ["10.0.0.0/8"]}, PLAINTEXT)


def test_trust_domains() -> None:
    assert matches({"trust_domains": ["cluster.local"]}, conn(FRONTEND))
    assert not matches({"trust_domains": ["cluster.local"]}, conn(OTHER_TD))
    assert not matches({"not_trust_domains": ["cluster.local"]}, conn(FRONTEND))
    assert matches({"not_trust_domains": ["cluster.local"]}, conn(OTHER_TD))


@pytest.mark.parametrize(
    "source",
    [
        {"principals": ["*"]},
        {"principals": [FRONTEND]},
        {"namespaces": ["*"]},
        {"service_accounts": ["web/frontend"]},
        {"trust_domains": ["cluster.local"]},
    ],
)
def test_identity_fields_never_match_plaintext(source: dict[str, Any]) -> None:
    assert not matches(source, PLAINTEXT)
    assert matches(source, conn(FRONTEND))
    # A DENY that requires an identity does not catch plaintext either.
    assert allows(policy("d", DENY, [rule(frm=[source])]), PLAINTEXT)


@pytest.mark.parametrize(
    "source",
    [
        {"not_principals": [FRONTEND]},
        {"not_principals": ["*"]},
        {"not_namespaces": ["web"]},
        {"not_service_accounts": ["web/frontend"]},
        {"not_trust_domains": ["cluster.local"]},
    ],
)
def test_negated_identity_fields_match_plaintext(source: dict[str, Any]) -> None:
    """ztunnel (rbac.rs tests) and Envoy: without an identity nothing is in the list."""
    assert matches(source, PLAINTEXT)
    # The usual "deny plaintext" policy: DENY notPrincipals ["*"].
    deny_plaintext = policy("strict", DENY, [rule(frm=[{"not_principals": ["*"]}])])
    assert not allows(deny_plaintext, PLAINTEXT)
    assert allows(deny_plaintext, conn(FRONTEND))


# --- operation fields -------------------------------------------------------------------------


def test_ports_and_not_ports() -> None:
    to_ports = policy("p", rules=[rule(to=[{"ports": [80, 8080]}])])
    assert allows(to_ports, conn(port=8080))
    assert not allows(to_ports, conn(port=9090))
    not_ports = policy("p", rules=[rule(to=[{"not_ports": [9090]}])])
    assert allows(not_ports, conn(port=8080))
    assert not allows(not_ports, conn(port=9090))
    deny_port = policy("d", DENY, [rule(to=[{"ports": [9090]}])])
    assert not allows(deny_port, conn(identity=None, port=9090))
    assert not evaluate_authorization([deny_port], conn(port=9090)).allowed
    assert evaluate_authorization([deny_port], conn(port=8080)).allowed


# --- attributes the node proxy cannot see -----------------------------------------------------


@pytest.mark.parametrize(
    "l7_rule",
    [
        rule(to=[{"methods": ["GET"]}]),
        rule(to=[{"ports": [8080], "paths": ["/api/*"]}]),
        rule(to=[{"hosts": ["shop.example"]}]),
        rule(to=[{"not_methods": ["DELETE"]}]),
        rule(frm=[{"request_principals": ["*"]}]),
        rule(frm=[{"principals": [FRONTEND], "not_request_principals": ["x/y"]}]),
        rule(when=[{"key": "request.headers[x-user]", "values": ["alice"]}]),
        rule(when=[{"key": "connection.sni", "values": ["shop.example"]}]),
        rule(when=[{"key": "request.auth.claims[iss]", "values": ["x"]}]),
        rule(when=[{"key": "experimental.envoy.filters.a.b[c]", "values": ["x"]}]),
    ],
)
def test_allow_rule_with_l7_attributes_never_matches(l7_rule: authorization_pb2.Rule) -> None:
    pol = policy("allow-l7", rules=[l7_rule])
    decision = evaluate_authorization([pol], conn())
    assert not decision.allowed
    assert decision.reason.startswith("no ALLOW policy matched")
    assert "shop/allow-l7" in decision.reason


def test_allow_with_l7_rule_still_allows_through_its_l4_rules() -> None:
    pol = policy(
        "mixed",
        rules=[rule(to=[{"methods": ["GET"]}]), rule(frm=[{"principals": [BATCH]}])],
    )
    assert allows(pol, conn(BATCH))
    decision = evaluate_authorization([pol], conn(FRONTEND))
    assert not decision.allowed
    assert "methods" in decision.reason


@pytest.mark.parametrize(
    "l7_rule",
    [
        rule(to=[{"methods": ["POST"]}]),
        rule(to=[{"not_paths": ["/healthz"]}]),
        rule(frm=[{"not_request_principals": ["*"]}]),  # istio/istio#61126: ztunnel lets it pass
        rule(when=[{"key": "request.headers[x-user]", "values": ["mallory"]}]),
        rule(when=[{"key": "connection.sni", "not_values": ["shop.example"]}]),
    ],
)
def test_deny_with_only_l7_attributes_denies_everything(l7_rule: authorization_pb2.Rule) -> None:
    pol = policy("deny-l7", DENY, [l7_rule])
    for connection in (conn(), conn(BATCH), PLAINTEXT):
        decision = evaluate_authorization([pol], connection)
        assert not decision.allowed
        assert decision.policy == "shop/deny-l7"
        assert "cannot be checked at L4" in decision.reason


def test_deny_with_l7_attributes_keeps_its_l4_constraints() -> None:
    pol = policy(
        "deny-post-from-batch",
        DENY,
        [rule(frm=[{"principals": [BATCH]}], to=[{"methods": ["POST"], "ports": [8080]}])],
    )
    decision = evaluate_authorization([pol], conn(BATCH))
    assert not decision.allowed
    assert "methods" in decision.reason
    assert allows(pol, conn(FRONTEND))
    assert allows(pol, conn(BATCH, port=9090))


def test_audit_treats_l7_attributes_as_matching() -> None:
    audit = policy("audit-get", AUDIT, [rule(to=[{"methods": ["GET"]}])])
    assert evaluate_authorization([audit], conn()).audited == ["shop/audit-get"]


def test_unparsable_values_fail_closed() -> None:
    bad_allow = policy("bad", rules=[rule(frm=[{"ip_blocks": ["10.0.0.300/8"]}])])
    decision = evaluate_authorization([bad_allow], conn())
    assert not decision.allowed
    assert "invalid IP block" in decision.reason
    bad_deny = policy("bad", DENY, [rule(frm=[{"not_ip_blocks": ["nonsense"]}])])
    assert not allows(bad_deny, conn())
    bad_port = policy("bad", rules=[rule(when=[{"key": "destination.port", "values": ["http"]}])])
    assert not allows(bad_port, conn())


# --- when -------------------------------------------------------------------------------------


def test_when_source_ip_and_destination_port() -> None:
    pol = policy(
        "p",
        rules=[
            rule(
                when=[
                    {"key": "source.ip", "values": ["10.0.0.0/24", "fd00::/64"]},
                    {"key": "destination.port", "values": ["8080", "8443"]},
                ]
            )
        ],
    )
    assert allows(pol, conn(src="10.0.0.9", port=8443))
    assert allows(pol, conn(src="fd00::9", port=8080))
    assert not allows(pol, conn(src="10.0.9.9", port=8080))  # all conditions must hold
    assert not allows(pol, conn(src="10.0.0.9", port=9090))
    assert allows(pol, PLAINTEXT)  # source.ip needs no identity


def test_when_not_values() -> None:
    pol = policy(
        "p",
        rules=[
            rule(
                when=[
                    {"key": "destination.port", "not_values": ["15000"]},
                    {"key": "source.ip", "values": ["10.0.0.0/8"], "not_values": ["10.0.0.5"]},
                ]
            )
        ],
    )
    assert allows(pol, conn(src="10.0.0.6"))
    assert not allows(pol, conn(src="10.0.0.5"))
    assert not allows(pol, conn(src="10.0.0.6", port=15000))


def test_when_identity_and_destination_keys() -> None:
    def when(key: str, values: list[str]) -> authorization_pb2.Authorization:
        return policy("p", rules=[rule(when=[{"key": key, "values": values}])])

    assert allows(when("source.principal", ["cluster.local/ns/web/*"]), conn(FRONTEND))
    assert not allows(when("source.principal", ["*"]), PLAINTEXT)
    assert allows(when("source.namespace", ["jobs"]), conn(BATCH))
    assert not allows(when("source.namespace", ["jobs"]), conn(FRONTEND))
    assert allows(when("source.serviceAccount", ["web/frontend"]), conn(FRONTEND))
    assert allows(when("remote.ip", ["10.0.0.5"]), conn(src="10.0.0.5"))
    assert allows(when("destination.ip", ["10.0.1.0/24"]), conn(dst="10.0.1.7"))
    assert not allows(when("destination.ip", ["10.0.2.0/24"]), conn(dst="10.0.1.7"))


def test_deny_when_request_header_denies_everything() -> None:
    pol = policy(
        "deny-hdr",
        DENY,
        [rule(when=[{"key": "request.headers[x-user]", "values": ["mallory"]}])],
    )
    assert not allows(pol, conn())
    assert "request.headers[x-user]" in evaluate_authorization([pol], conn()).reason


# --- which policies apply ---------------------------------------------------------------------


def workload(
    namespace: str = "shop", selected: Sequence[str] = ("shop/select-cart",)
) -> address_pb2.Workload:
    return address_pb2.Workload(
        uid=f"{namespace}/cart-1",
        name="cart-1",
        namespace=namespace,
        authorization_policies=list(selected),
    )


def snapshot(root: str = "istio-system") -> dict[str, authorization_pb2.Authorization]:
    scope = authorization_pb2
    policies = [
        policy("select-cart", rules=[rule()]),
        policy("select-other", rules=[rule()]),  # a selector that does not pick cart-1
        policy("ns-wide", DENY, [rule()], scope=scope.NAMESPACE),
        policy("ns-wide", rules=[rule()], namespace="web", scope=scope.NAMESPACE),
        policy("mesh-wide", AUDIT, [rule()], namespace=root, scope=scope.GLOBAL),
        policy("root-ns-only", rules=[rule()], namespace=root, scope=scope.NAMESPACE),
        policy("waypoint", DENY, [rule()], scope=scope.TARGET_REF),
        policy("web-select", rules=[rule()], namespace="web"),
    ]
    return {f"{p.namespace}/{p.name}": p for p in policies}


def names(found: Sequence[authorization_pb2.Authorization | CompiledPolicy]) -> list[str]:
    return [p.name if isinstance(p, CompiledPolicy) else f"{p.namespace}/{p.name}" for p in found]


def test_applicable_policies_by_scope() -> None:
    found = applicable_policies(workload(), snapshot())
    assert names(found) == ["istio-system/mesh-wide", "shop/ns-wide", "shop/select-cart"]


def test_applicable_policies_of_another_namespace() -> None:
    found = applicable_policies(workload("web", ["web/web-select"]), snapshot())
    assert names(found) == ["istio-system/mesh-wide", "web/ns-wide", "web/web-select"]


def test_applicable_policies_in_the_root_namespace_and_a_custom_root() -> None:
    in_root = applicable_policies(workload("istio-system", []), snapshot())
    assert names(in_root) == ["istio-system/mesh-wide", "istio-system/root-ns-only"]
    custom = snapshot(root="mesh-root")
    found = applicable_policies(workload(), custom, root_namespace="mesh-root")
    assert names(found) == ["mesh-root/mesh-wide", "shop/ns-wide", "shop/select-cart"]
    # With the default root, a GLOBAL policy elsewhere only covers its own namespace.
    assert "mesh-root/mesh-wide" not in names(applicable_policies(workload(), custom))


def test_unknown_selector_names_are_skipped() -> None:
    found = applicable_policies(workload(selected=["shop/gone", "shop/select-cart"]), snapshot())
    assert names(found)[-1] == "shop/select-cart"


def test_policy_index_matches_applicable_policies() -> None:
    policies = snapshot()
    index = PolicyIndex(policies)
    for wl in (workload(), workload("web", ["web/web-select"]), workload("istio-system", [])):
        assert names(index.applicable(wl)) == names(applicable_policies(wl, policies))


def test_policy_index_evaluates_a_workloads_policies() -> None:
    index = PolicyIndex(snapshot())
    decision = index.evaluate(workload(), conn())
    assert decision == Decision(
        False, "shop/ns-wide", "denied by shop/ns-wide", ["istio-system/mesh-wide"]
    )
    web = index.evaluate(workload("web", ["web/web-select"]), conn())
    assert web.allowed
    assert web.policy == "web/ns-wide"


def test_evaluation_accepts_messages_and_compiled_policies_alike() -> None:
    pol = policy("p", rules=[rule(frm=[{"namespaces": ["web"]}])])
    assert evaluate_authorization([pol], conn()) == evaluate_authorization(
        [compile_policy(pol)], conn()
    )


def test_compilation_is_cached_per_policy_version() -> None:
    pol = policy("p", rules=[rule(frm=[{"ip_blocks": ["10.0.0.0/8"]}])])
    first = compile_policy(pol)
    assert compile_policy(authorization_pb2.Authorization.FromString(pol.SerializeToString())) is (
        first
    )
    pol.rules[0].to.add(ports=[80])
    changed = compile_policy(pol)
    assert changed is not first
    assert not changed.matches(conn(port=8080))
    assert first.matches(conn(port=8080))


def test_policy_set_sorts_by_action_and_is_reused_per_selection() -> None:
    index = PolicyIndex(snapshot())
    policy_set = index.policy_set(workload())
    assert [p.name for p in policy_set.audits] == ["istio-system/mesh-wide"]
    assert [p.name for p in policy_set.denies] == ["shop/ns-wide"]
    assert [p.name for p in policy_set.allows] == ["shop/select-cart"]
    assert index.policy_set(workload()) is policy_set
    assert index.policy_set(workload(selected=[])) is not policy_set
    assert evaluate_authorization(policy_set, conn()) == index.evaluate(workload(), conn())


def test_empty_policy_set_allows() -> None:
    assert PolicySet().evaluate(conn()) == Decision(
        True, None, "allowed: no authorization policies", []
    )
    empty = PolicyIndex({}).evaluate(workload(), PLAINTEXT)
    assert empty.allowed
