"""L7 authorization at the waypoint: which targetRefs policies apply, and what they match."""

from __future__ import annotations

import ipaddress

import pytest

from meshway.api.v1 import authorization_pb2 as pb
from meshway.identity.spiffe import SpiffeId
from meshway.policy.waypoint import RequestContext, WaypointPolicyIndex, normalize_path

pytestmark = pytest.mark.unit

CLIENT = SpiffeId("cluster.local", "shop", "client")
OTHER = SpiffeId("cluster.local", "other", "robot")
GATEWAY = ("shop", "waypoint")


def request(
    method: str = "GET",
    target: str = "/",
    *,
    identity: SpiffeId | None = CLIENT,
    host: str = "web.shop.svc.cluster.local",
    headers: list[tuple[str, str]] | None = None,
    port: int = 80,
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
    jwt_allow = policy("jwt", pb.ALLOW, rule(request_principals=["issuer/subject"]))
    assert not decide([jwt_allow], request())  # an ALLOW rule we cannot check never matches
    jwt_deny = policy("jwt-deny", pb.DENY, rule(request_principals=["*"], paths=["/x"]))
    assert not decide([jwt_deny], request(target="/x"))  # DENY: treated as matching
    assert decide([jwt_deny], request(target="/y"))  # ... but the rest of the rule still counts
    custom = policy("ext", pb.CUSTOM, rule())
    assert not decide([custom], request())


GATEWAY_GROUP = "gateway.networking.k8s.io"
