"""L7 authorization at the waypoint: which targetRefs policies apply, and what they match."""

from __future__ import annotations

import ipaddress

import pytest

from meshway.api.v1 import authorization_pb2 as pb
from meshway.identity.spiffe import SpiffeId
from meshway.policy.authorization import Connection, evaluate_authorization
from meshway.policy.requestauth import RequestAuth
from meshway.policy.waypoint import (
    RequestContext,
    WaypointPolicyIndex,
    normalize_path,
    normalize_target,
)

pytestmark = pytest.mark.unit

CLIENT = SpiffeId("cluster.local", "shop", "client")
OTHER = SpiffeId("cluster.local", "other", "robot")
GATEWAY = ("shop", "waypoint")
GATEWAY_GROUP = "gateway.networking.k8s.io"


def request(
    method: str = "GET",
    target: str = "/",
    *,
    identity: SpiffeId | None = CLIENT,
    host: str = "web.shop.svc.cluster.local",
    headers: list[tuple[str, str]] | None = None,
    port: int = 80,
    auth: RequestAuth | None = None,
) -> RequestContext:
    return RequestContext(
        ipaddress.ip_address("10.0.0.5"),
        identity,
        ipaddress.ip_address("10.96.0.10"),
        port,
        method,
        target,
        host,
        headers or [],
        auth,
    )


def policy(
    name: str,
    action: pb.Action.ValueType,
    *rules: pb.Rule,
    target: tuple[str, str, str] = ("", "Service", "web"),
    namespace: str = "shop",
) -> pb.Authorization:
    group, kind, target_name = target
    return pb.Authorization(
        name=name,
        namespace=namespace,
        scope=pb.TARGET_REF,
        action=action,
        rules=list(rules),
        target_refs=[pb.TargetRef(group=group, kind=kind, name=target_name)],
    )


def rule(
    *,
    principals: list[str] | None = None,
    namespaces: list[str] | None = None,
    methods: list[str] | None = None,
    paths: list[str] | None = None,
    not_paths: list[str] | None = None,
    hosts: list[str] | None = None,
    ports: list[int] | None = None,
    when: list[pb.Condition] | None = None,
    request_principals: list[str] | None = None,
) -> pb.Rule:
    out = pb.Rule()
    if principals or namespaces or request_principals:
        getattr(out, "from").append(
            pb.Source(
                principals=principals or [],
                namespaces=namespaces or [],
                request_principals=request_principals or [],
            )
        )
    if methods or paths or not_paths or hosts or ports:
        out.to.append(
            pb.Operation(
                methods=methods or [],
                paths=paths or [],
                not_paths=not_paths or [],
                hosts=hosts or [],
                ports=ports or [],
            )
        )
    out.when.extend(when or [])
    return out


def from_source(**fields: list[str]) -> pb.Rule:
    """A rule with one `from` entry (`from` is a Python keyword, hence the helper)."""
    out = pb.Rule()
    getattr(out, "from").append(pb.Source(**fields))
    return out


def decide(policies: list[pb.Authorization], ctx: RequestContext, service: str = "web") -> bool:
    return WaypointPolicyIndex(policies, GATEWAY).policy_set("shop", service).evaluate(ctx).allowed


def test_no_policy_allows() -> None:
    assert decide([], request())


def test_allow_by_method_and_path_denies_the_rest() -> None:
    allow = policy("l7", pb.ALLOW, rule(methods=["GET"], paths=["/public/*", "/health"]))
    assert decide([allow], request("GET", "/public/a?x=1"))  # the query string is not the path
    assert decide([allow], request("GET", "/health"))
    assert not decide([allow], request("POST", "/public/a"))
    assert not decide([allow], request("GET", "/private"))
    assert not decide([allow], request("get", "/health"))  # methods are case-sensitive


def test_paths_are_normalized_before_matching() -> None:
    deny = policy("no-admin", pb.DENY, rule(paths=["/admin*"]))
    assert not decide([deny], request("GET", "/public/../admin/users"))
    assert not decide([deny], request("GET", "//admin"))
    assert decide([deny], request("GET", "/public/admin"))
    assert normalize_path("/a/./b/../c/?q=1") == "/a/c/"


def test_suffix_wildcard_and_not_paths() -> None:
    allow = policy("png", pb.ALLOW, rule(paths=["*.png"]))
    assert decide([allow], request(target="/img/cat.png"))
    assert not decide([allow], request(target="/img/cat.jpg"))
    deny = policy("all-but-health", pb.DENY, rule(not_paths=["/health"]))
    assert decide([deny], request(target="/health"))
    assert not decide([deny], request(target="/other"))


def test_hosts_match_with_or_without_port_case_insensitively() -> None:
    allow = policy("host", pb.ALLOW, rule(hosts=["web.shop.svc.cluster.local"]))
    assert decide([allow], request(host="WEB.shop.svc.cluster.local:80"))
    assert not decide([allow], request(host="evil.example"))


def test_ports_and_header_conditions() -> None:
    when = [pb.Condition(key="request.headers[X-Team]", values=["blue", "gr*"])]
    allow = policy("hdr", pb.ALLOW, rule(ports=[80], when=when))
    assert decide([allow], request(headers=[("x-team", "green")]))
    assert not decide([allow], request(headers=[("x-team", "red")]))
    assert not decide([allow], request(headers=[]))
    assert not decide([allow], request(headers=[("x-team", "blue")], port=8080))


def test_principals_and_namespaces_of_the_original_client() -> None:
    allow = policy("who", pb.ALLOW, rule(principals=["cluster.local/ns/shop/sa/client"]))
    assert decide([allow], request())
    assert not decide([allow], request(identity=OTHER))
    assert not decide([allow], request(identity=None))
    by_ns = policy("ns", pb.ALLOW, rule(namespaces=["other"]))
    assert decide([by_ns], request(identity=OTHER))
    assert not decide([by_ns], request())


def test_deny_is_evaluated_before_allow_and_audit_changes_nothing() -> None:
    allow = policy("allow-all-get", pb.ALLOW, rule(methods=["GET"]))
    deny = policy("deny-secret", pb.DENY, rule(paths=["/secret"]))
    audit = policy("audit", pb.AUDIT, rule(paths=["/secret", "/a"]))
    ctx = request(target="/secret")
    decision = WaypointPolicyIndex([allow, deny, audit], GATEWAY).policy_set("shop", "web")
    result = decision.evaluate(ctx)
    assert not result.allowed and result.policy == "shop/deny-secret"
    audited = decision.evaluate(request(target="/a"))
    assert audited.allowed and audited.audited == ["shop/audit"]


def test_which_policies_a_waypoint_enforces() -> None:
    other_service = policy("other", pb.DENY, rule(), target=("", "Service", "api"))
    on_gateway = policy(
        "gw", pb.DENY, rule(paths=["/gw"]), target=(GATEWAY_GROUP, "Gateway", "waypoint")
    )
    other_ns = policy("elsewhere", pb.DENY, rule(), namespace="other")
    mesh_wide = policy(
        "all-waypoints",
        pb.DENY,
        rule(paths=["/mesh"]),
        target=(GATEWAY_GROUP, "GatewayClass", "istio-waypoint"),
        namespace="istio-system",
    )
    selector = pb.Authorization(
        name="sel", namespace="shop", scope=pb.WORKLOAD_SELECTOR, action=pb.DENY, rules=[rule()]
    )
    policies = [other_service, on_gateway, other_ns, mesh_wide, selector]
    assert decide(policies, request(target="/fine"))  # none of the catch-alls apply to web
    assert not decide(policies, request(target="/gw"))
    assert not decide(policies, request(target="/mesh"))
    assert not decide(policies, request(target="/fine"), service="api")


def test_unevaluable_attributes_fail_closed() -> None:
    sni = [pb.Condition(key="connection.sni", values=["web.example"])]
    sni_allow = policy("sni", pb.ALLOW, rule(when=sni))
    assert not decide([sni_allow], request())  # an ALLOW rule we cannot check never matches
    sni_deny = policy("sni-deny", pb.DENY, rule(when=sni, paths=["/x"]))
    assert not decide([sni_deny], request(target="/x"))  # DENY: treated as matching
    assert decide([sni_deny], request(target="/y"))  # ... but the rest of the rule still counts
    custom = policy("ext", pb.CUSTOM, rule())
    assert not decide([custom], request())


def test_target_refs_kinds_groups_and_namespaces() -> None:
    def applies(target: tuple[str, str, str], namespace: str = "shop") -> bool:
        deny = policy("p", pb.DENY, rule(), target=target, namespace=namespace)
        return not decide([deny], request())

    assert applies(("core", "Service", "web"))
    assert not applies(("apps", "Service", "web"))  # not the core group
    assert not applies(("", "Gateway", "waypoint"))  # a Gateway is in the Gateway API group
    assert not applies((GATEWAY_GROUP, "Gateway", "other-waypoint"))
    assert not applies((GATEWAY_GROUP, "Gateway", "waypoint"), namespace="other")
    # Only the root namespace may attach to every waypoint through their GatewayClass.
    assert applies((GATEWAY_GROUP, "GatewayClass", "istio-waypoint"), namespace="istio-system")
    assert not applies((GATEWAY_GROUP, "GatewayClass", "istio-waypoint"))
    assert not applies((GATEWAY_GROUP, "GatewayClass", "other-class"), namespace="istio-system")
    cross_namespace = policy("p", pb.DENY, rule(), namespace="other")
    cross_namespace.target_refs[0].namespace = "shop"  # a policy cannot reach into another ns
    assert decide([cross_namespace], request())


def test_decisions_name_the_policy_and_say_why() -> None:
    allow = policy("get-only", pb.ALLOW, rule(methods=["GET"]))
    index = WaypointPolicyIndex([allow], GATEWAY)
    allowed = index.policy_set("shop", "web").evaluate(request("GET"))
    assert (allowed.allowed, allowed.policy) == (True, "shop/get-only")
    denied = index.policy_set("shop", "web").evaluate(request("POST"))
    assert (denied.allowed, denied.policy) == (False, None)
    assert "shop/get-only" in denied.reason
    assert index.policy_set("shop", "api").empty  # the policy targets web only
    custom = policy("ext-authz", pb.CUSTOM, rule(methods=["GET"]))
    verdict = WaypointPolicyIndex([custom, allow], GATEWAY).policy_set("shop", "web")
    decision = verdict.evaluate(request("GET"))
    assert (decision.allowed, decision.policy) == (False, "shop/ext-authz")
    assert "not supported" in decision.reason


def test_host_wildcards_and_not_hosts() -> None:
    suffix = policy("suffix", pb.ALLOW, rule(hosts=["*.shop.svc.cluster.local"]))
    assert decide([suffix], request(host="web.shop.svc.cluster.local:8080"))
    assert not decide([suffix], request(host="web.other.svc.cluster.local"))
    with_port = policy("port", pb.ALLOW, rule(hosts=["web.shop.svc.cluster.local:*"]))
    assert decide([with_port], request(host="web.shop.svc.cluster.local:80"))
    assert not decide([with_port], request(host="web.shop.svc.cluster.local"))
    not_hosts = pb.Rule(to=[pb.Operation(not_hosts=["web", "web.shop.svc.cluster.local"])])
    deny = policy("foreign-host", pb.DENY, not_hosts)
    assert decide([deny], request(host="Web:8080"))
    assert not decide([deny], request(host="evil.example"))


def test_methods_and_not_methods() -> None:
    deny = policy("read-only", pb.DENY, pb.Rule(to=[pb.Operation(not_methods=["GET", "HEAD"])]))
    assert decide([deny], request("HEAD"))
    assert not decide([deny], request("DELETE"))
    assert not decide([deny], request("head"))  # case-sensitive, so not HEAD


def test_header_conditions_name_case_presence_and_not_values() -> None:
    present = policy(
        "has-token",
        pb.ALLOW,
        rule(when=[pb.Condition(key="request.headers[X-Token]", values=["*"])]),
    )
    assert decide([present], request(headers=[("x-token", "")]))
    assert not decide([present], request(headers=[("x-other", "1")]))
    no_debug = pb.Condition(key="request.headers[x-debug]", not_values=["off", "n*"])
    deny = policy("debug", pb.DENY, rule(paths=["/api/*"], when=[no_debug]))
    assert decide([deny], request(target="/api/a", headers=[("x-debug", "no")]))
    assert not decide([deny], request(target="/api/a", headers=[("x-debug", "on")]))
    assert decide([deny], request(target="/other", headers=[("x-debug", "on")]))


def test_source_ip_and_service_accounts_of_the_original_client() -> None:
    blocks = from_source(ip_blocks=["10.0.0.0/24"])
    assert decide([policy("net", pb.ALLOW, blocks)], request(identity=None))
    accounts = from_source(service_accounts=["client", "other/robot"])
    by_account = policy("sa", pb.ALLOW, accounts)
    assert decide([by_account], request())  # "client" is in the policy's namespace
    assert decide([by_account], request(identity=OTHER))
    assert not decide([by_account], request(identity=SpiffeId("cluster.local", "other", "x")))
    not_principals = from_source(not_principals=["*/ns/shop/sa/client"])
    deny = policy("not-client", pb.DENY, not_principals)
    assert decide([deny], request())
    assert not decide([deny], request(identity=None))  # plaintext has no principal to be


def test_node_proxy_still_fails_closed_on_l7_attributes() -> None:
    """The node proxy cannot see HTTP: the same rules that the waypoint decides per request
    deny at L4 (ALLOW never matches, DENY matches everything)."""
    conn = Connection(
        ipaddress.ip_address("10.0.0.5"),
        CLIENT,
        ipaddress.ip_address("10.96.0.10"),
        80,
        "shop",
    )
    get_only, no_admin = rule(methods=["GET"]), rule(paths=["/admin*"])
    for action, l7_rule in ((pb.ALLOW, get_only), (pb.DENY, no_admin)):
        selected = pb.Authorization(
            name="l4", namespace="shop", scope=pb.WORKLOAD_SELECTOR, action=action, rules=[l7_rule]
        )
        decision = evaluate_authorization([selected], conn)
        assert not decision.allowed
        # The waypoint leaves selector policies to the node proxy ...
        assert WaypointPolicyIndex([selected], GATEWAY).policy_set("shop", "web").empty
        # ... and decides the same rules per request when they are attached with targetRefs.
        assert decide([policy("l7", action, l7_rule)], request("GET", "/public"))
    # A targetRefs policy is the waypoint's: the node proxy does not enforce it.
    attached = policy("l7", pb.DENY, no_admin)
    assert evaluate_authorization([attached], conn).allowed


@pytest.mark.parametrize(
    "target",
    ["/admin/x/..", "/admin/.", "/public/%2e%2e/admin/users", "/public/%2E%2E/admin/", "//admin/"],
)
def test_dot_segments_and_encoded_dots_cannot_get_past_a_deny(target: str) -> None:
    deny = policy("no-admin", pb.DENY, rule(paths=["/admin/*"]))
    assert not decide([deny], request(target=target)), normalize_path(target)


def test_the_forwarded_target_is_the_checked_one() -> None:
    assert normalize_target("/public/../admin?x=/..") == "/admin?x=/.."
    assert normalize_target("/plain?q=1") == "/plain?q=1"
    assert normalize_target("http://h:80/a/./b") == "http://h:80/a/b"
    assert normalize_target("*") == "*"


# -- JWT: request principals and request.auth.* ---------------------------------------------

ALICE = RequestAuth(
    "https://issuer.example",
    "alice",
    {
        "iss": "https://issuer.example",
        "sub": "alice",
        "aud": ["shop", "web"],
        "azp": "frontend-app",
        "groups": ["staff", "admin"],
        "tier": "gold",
        "realm_access": {"roles": ["buyer"], "level": "3"},
        "verified": True,
    },
)
BOB = RequestAuth("https://issuer.example", "bob", {"sub": "bob", "groups": "staff", "aud": "x"})


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> pb.Rule:
    return rule(when=[pb.Condition(key=key, values=values or [], not_values=not_values or [])])


def test_request_principals_exact_prefix_suffix_and_any() -> None:
    def allowed(values: list[str], auth: RequestAuth | None) -> bool:
        allow = policy("jwt", pb.ALLOW, rule(request_principals=values))
        return decide([allow], request(auth=auth))

    assert allowed(["https://issuer.example/alice"], ALICE)
    assert not allowed(["https://issuer.example/alice"], BOB)
    assert allowed(["https://issuer.example/*"], BOB)
    assert allowed(["*/alice"], ALICE)
    assert not allowed(["*/alice"], BOB)
    assert allowed(["*"], BOB)
    assert not allowed(["*"], None)  # no verified token: no request principal


def test_not_request_principals_lets_requests_without_a_token_match() -> None:
    deny_anonymous = policy(
        "deny", pb.DENY, pb.Rule(**{"from": [pb.Source(not_request_principals=["*"])]})
    )
    assert not decide([deny_anonymous], request())
    assert decide([deny_anonymous], request(auth=BOB))


def test_claims_conditions_with_lists_nested_claims_and_not_values() -> None:
    def allowed(r: pb.Rule, auth: RequestAuth | None) -> bool:
        return decide([policy("claims", pb.ALLOW, r)], request(auth=auth))

    admins = when("request.auth.claims[groups]", ["admin"])
    assert allowed(admins, ALICE)  # a list claim: one element is enough
    assert not allowed(admins, BOB)  # "staff" only (a string claim)
    assert not allowed(admins, None)
    assert allowed(when("request.auth.claims[groups]", ["sta*"]), BOB)
    assert allowed(when("request.auth.claims[realm_access][roles]", ["buyer"]), ALICE)
    assert allowed(when("request.auth.claims[realm_access][level]", ["3"]), ALICE)
    assert not allowed(when("request.auth.claims[realm_access][roles]", ["seller"]), ALICE)
    assert not allowed(when("request.auth.claims[tier][gold]", ["gold"]), ALICE)  # not an object
    assert not allowed(when("request.auth.claims[missing]", ["x"]), ALICE)
    assert allowed(when("request.auth.claims[verified]", ["true"]), ALICE)
    not_admin = when("request.auth.claims[groups]", not_values=["admin"])
    assert not allowed(not_admin, ALICE)
    assert allowed(not_admin, BOB)
    assert allowed(not_admin, None)  # no claims at all: not "admin"


def test_auth_principal_audiences_and_presenter_conditions() -> None:
    def allowed(r: pb.Rule, auth: RequestAuth | None) -> bool:
        return decide([policy("auth", pb.ALLOW, r)], request(auth=auth))

    assert allowed(when("request.auth.principal", ["https://issuer.example/alice"]), ALICE)
    assert not allowed(when("request.auth.principal", ["https://issuer.example/alice"]), BOB)
    assert allowed(when("request.auth.audiences", ["web"]), ALICE)
    assert not allowed(when("request.auth.audiences", ["web"]), BOB)
    assert allowed(when("request.auth.presenter", ["frontend-*"]), ALICE)
    assert not allowed(when("request.auth.presenter", ["frontend-*"]), BOB)
    assert not allowed(when("request.auth.audiences", ["web"]), None)


def test_a_malformed_claims_key_fails_closed() -> None:
    allow = policy("bad", pb.ALLOW, when("request.auth.claims[groups", ["admin"]))
    assert not decide([allow], request(auth=ALICE))


def test_the_decision_for_requests_without_a_token_is_known_only_when_it_cannot_differ() -> None:
    """`unauthenticated` skips evaluation for requests without a verified JWT: it must be set
    for DENY/AUDIT sets that need a token to match, and agree with evaluating each request."""
    claim = when("request.auth.claims[groups]", ["blocked"])
    principal = rule(request_principals=["*"])
    cases = {
        "deny on a claim": ([policy("d", pb.DENY, claim)], True),
        "deny on a principal": ([policy("d", pb.DENY, principal)], True),
        "audit on a claim": ([policy("a", pb.AUDIT, claim)], True),
        "deny without rules": ([policy("d", pb.DENY)], True),
        "deny on a claim or a path": ([policy("d", pb.DENY, claim, rule(paths=["/x"]))], False),
        "deny on not a claim": (
            [policy("d", pb.DENY, when("request.auth.claims[groups]", not_values=["ok"]))],
            False,
        ),
        "deny on not a principal": (
            [policy("d", pb.DENY, from_source(not_request_principals=["*"]))],
            False,
        ),
        "deny on a malformed claim (fails closed)": (
            [policy("d", pb.DENY, when("request.auth.claims[groups", ["x"]))],
            False,
        ),
        "allow on a claim": ([policy("a", pb.ALLOW, claim)], False),
        "deny on a claim, allow a path": (
            [policy("d", pb.DENY, claim), policy("a", pb.ALLOW, rule(paths=["/ok"]))],
            False,
        ),
    }
    for name, (policies, known) in cases.items():
        policy_set = WaypointPolicyIndex(policies, GATEWAY).policy_set("shop", "web")
        assert (policy_set.unauthenticated is not None) == known, name
        for target in ("/", "/x", "/ok"):
            evaluated = policy_set.evaluate(request(target=target))
            if known:
                assert policy_set.unauthenticated is not None
                assert policy_set.unauthenticated.allowed == evaluated.allowed, (name, target)
