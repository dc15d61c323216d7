"""The typed model: identity, serialisation, and each semantic rule with its field path."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import ValidationError

from meshway.config.errors import ConfigError, ConfigIssue
from meshway.config.loader import parse_documents
from meshway.config.model import (
    KINDS,
    AuthorizationPolicy,
    HTTPRoute,
    Namespace,
    Node,
    ObjectKey,
    ObjectMeta,
    PeerAuthentication,
    Service,
    ServicePort,
    ServiceSpec,
    Workload,
    WorkloadSpec,
    duration_seconds,
    kind_for,
)

pytestmark = pytest.mark.unit


def _text(parts: tuple[str, ...]) -> str:
    return "".join(textwrap.dedent(part) for part in parts)


def issues(*parts: str) -> list[ConfigIssue]:
    """The issues of a one-file batch made of `parts` (each dedented on its own)."""
    with pytest.raises(ConfigError) as caught:
        parse_documents(_text(parts), "test.yaml")
    return caught.value.issues


def one_issue(*parts: str) -> ConfigIssue:
    found = issues(*parts)
    assert len(found) == 1, [str(i) for i in found]
    return found[0]


def parse_one(*parts: str) -> object:
    (resource,) = parse_documents(_text(parts), "test.yaml")
    return resource


AP_HEAD = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
"""
ROUTE_HEAD = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
"""
VS_HEAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
"""


# --------------------------------------------------------------------------- identity


def test_key_and_names_for_namespaced_and_cluster_scoped_kinds() -> None:
    workload = Workload(
        metadata=ObjectMeta(name="client"),
        spec=WorkloadSpec(node_name="node-1", command=["sleep", "1"]),
    )
    assert workload.api_version == "meshway.io/v1alpha1"
    assert workload.kind == "Workload"
    assert workload.metadata.namespace == "default"
    assert workload.key == ObjectKey("Workload", "default", "client")
    assert workload.display_name == "default/client"
    assert workload.object_ref == "Workload default/client"

    node = Node(metadata=ObjectMeta(name="node-1"))
    assert node.key == ObjectKey("Node", "", "node-1")
    assert node.display_name == "node-1"
    assert not node.spec.unschedulable


def test_kind_for_accepts_cli_spellings() -> None:
    assert kind_for("Workload") is Workload
    for name in ("workloads", "wl", "workload"):
        assert kind_for(name) is Workload
    assert kind_for("svc") is Service
    assert kind_for("ns") is Namespace
    assert kind_for("ap") is AuthorizationPolicy
    assert kind_for("authorizationpolicies") is AuthorizationPolicy
    assert kind_for("pa") is PeerAuthentication
    assert kind_for("httproutes") is HTTPRoute
    assert kind_for("nodes") is Node
    assert {kind_for(n).KIND for n in ("ra", "gw", "grpcroutes", "dr", "vs", "sa")} == {
        "RequestAuthentication",
        "Gateway",
        "GRPCRoute",
        "DestinationRule",
        "VirtualService",
        "ServiceAccount",
    }
    with pytest.raises(KeyError, match="known kinds: AuthorizationPolicy, DestinationRule"):
        kind_for("pods")


def test_every_kind_declares_its_api() -> None:
    for kind, cls in KINDS.items():
        assert kind == cls.KIND
        assert cls.API_VERSIONS


# --------------------------------------------------------------------------- serialisation


def test_to_dict_uses_yaml_names_and_leaves_out_unset_fields() -> None:
    service = Service(
        metadata=ObjectMeta(name="backend", namespace="shop"),
        spec=ServiceSpec(
            selector={"app": "backend"},
            ports=[ServicePort(name="http", port=8080, target_port="http")],
            cluster_ip="10.96.0.10",
        ),
    )
    assert service.to_dict() == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "backend", "namespace": "shop"},
        "spec": {
            "selector": {"app": "backend"},
            "ports": [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}],
            "clusterIP": "10.96.0.10",
            "type": "ClusterIP",
        },
    }
    assert service.spec_dict()["clusterIP"] == "10.96.0.10"
    assert Namespace(metadata=ObjectMeta(name="shop")).spec_dict() == {}


def test_keyword_fields_use_their_yaml_names() -> None:
    policy = parse_one(
        AP_HEAD,
        """
        spec:
          rules:
            - from: [{source: {namespaces: [shop]}}]
        """,
    )
    assert isinstance(policy, AuthorizationPolicy)
    assert policy.spec.rules[0].from_[0].source.namespaces == ["shop"]
    assert policy.to_dict()["spec"]["rules"] == [{"from": [{"source": {"namespaces": ["shop"]}}]}]


def test_empty_rule_survives_serialisation() -> None:
    """`rules: [{}]` (allow everything) must not turn into `rules: []` (allow nothing)."""
    policy = parse_one(AP_HEAD, "spec: {rules: [{}]}\n")
    assert isinstance(policy, AuthorizationPolicy)
    assert policy.to_dict()["spec"]["rules"] == [{}]


def test_strict_scalars_and_int_or_string() -> None:
    with pytest.raises(ValidationError):
        ServicePort.model_validate({"port": "80"})
    with pytest.raises(ValidationError):
        ServicePort.model_validate({"port": True})
    assert ServicePort.model_validate({"port": 80, "targetPort": 8080}).target_port == 8080
    assert ServicePort.model_validate({"port": 80, "targetPort": "http"}).target_port == "http"
    assert ServicePort.model_validate({"port": 80}).effective_target_port == 80


def test_duration_seconds() -> None:
    assert duration_seconds("10s") == 10
    assert duration_seconds("500ms") == 0.5
    assert duration_seconds("1h30m") == 5400
    assert duration_seconds("1.5s") == 1.5
    with pytest.raises(ValueError, match="invalid duration"):
        duration_seconds("10 seconds")


# --------------------------------------------------------------------------- metadata


def test_invalid_name_and_label_syntax() -> None:
    found = issues(
        """
        apiVersion: v1
        kind: ServiceAccount
        metadata:
          name: Bad_Name
          labels: {"-app": x, ok: "not ok"}
          annotations: {"a/b/c": x}
        """
    )
    by_path = {i.path: i.message for i in found}
    assert "not a valid name" in by_path["metadata.name"]
    assert "key '-app'" in by_path["metadata.labels[-app]"]
    assert "value 'not ok'" in by_path["metadata.labels[ok]"]
    assert "prefix before '/'" in by_path["metadata.annotations[a/b/c]"]


def test_dataplane_mode_typo_is_an_error() -> None:
    issue = one_issue(
        """
        apiVersion: v1
        kind: Namespace
        metadata: {name: shop, labels: {istio.io/dataplane-mode: ambiant}}
        """
    )
    assert issue.path == "metadata.labels[istio.io/dataplane-mode]"
    assert "'ambient', 'none'" in issue.message


def test_service_names_are_dns_1035_labels() -> None:
    issue = one_issue(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: 1backend}
        spec: {ports: [{port: 80}]}
        """
    )
    assert issue.path == "metadata.name"
    assert "starting with a letter" in issue.message


# --------------------------------------------------------------------------- core kinds


def test_service_cluster_ip_and_ports() -> None:
    found = issues(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: backend}
        spec:
          clusterIP: 10.0.0.300
          ports:
            - {name: http, port: 80}
            - {name: http, port: 80}
            - {port: 0}
        """
    )
    by_path = {i.path: i.message for i in found}
    assert "invalid clusterIP" in by_path["spec.clusterIP"]
    assert by_path["spec.ports[2].port"] == "must be at least 1, got 0"


def test_service_duplicate_ports_and_names() -> None:
    found = issues(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: backend}
        spec:
          ports:
            - {name: http, port: 80}
            - {name: http, port: 80}
            - {port: 81}
        """
    )
    by_path = {i.path: i.message for i in found}
    assert "duplicate port name 'http'" in by_path["spec.ports[1].name"]
    assert "duplicate port 80/TCP" in by_path["spec.ports[1].port"]
    assert "required when a Service has several ports" in by_path["spec.ports[2].name"]


def test_headless_service_needs_no_ports() -> None:
    service = parse_one(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: db}
        spec: {clusterIP: "None", selector: {app: db}}
        """
    )
    assert isinstance(service, Service)
    assert service.spec.headless


def test_workload_port_names_unique() -> None:
    issue = one_issue(
        """
        apiVersion: meshway.io/v1alpha1
        kind: Workload
        metadata: {name: w}
        spec:
          nodeName: node-1
          command: [server]
          ports: [{name: http, containerPort: 8080}, {name: http, containerPort: 9090}]
        """
    )
    assert issue.path == "spec.ports[1].name"
    assert "duplicate port name 'http'" in issue.message


def test_workload_requires_a_command() -> None:
    issue = one_issue(
        """
        apiVersion: meshway.io/v1alpha1
        kind: Workload
        metadata: {name: w}
        spec: {nodeName: node-1, command: []}
        """
    )
    assert (issue.path, issue.message) == ("spec.command", "must not be empty")


# --------------------------------------------------------------------------- security


def test_bad_cidr_in_ip_blocks() -> None:
    issue = one_issue(
        AP_HEAD,
        """
        spec:
          rules:
            - from:
                - source: {ipBlocks: ["10.0.0.0/8", "10.0.0.0/33"], remoteIpBlocks: ["1.2.3.4"]}
        """,
    )
    assert issue.path == "spec.rules[0].from[0].source.ipBlocks[1]"
    assert "invalid IP address or CIDR '10.0.0.0/33'" in issue.message
    assert issue.object == "AuthorizationPolicy shop/p"


def test_selector_and_target_refs_are_exclusive() -> None:
    issue = one_issue(
        AP_HEAD,
        """
        spec:
          selector: {matchLabels: {app: backend}}
          targetRefs: [{kind: Service, group: "", name: backend}]
        """,
    )
    assert issue.path == "spec.targetRefs"
    assert "selector and targetRefs cannot both be set" in issue.message


def test_custom_action_needs_provider_and_provider_needs_custom() -> None:
    issue = one_issue(AP_HEAD, "spec: {action: CUSTOM, rules: [{}]}\n")
    assert (issue.path, issue.message) == ("spec.provider", "action CUSTOM requires provider.name")
    issue = one_issue(AP_HEAD, "spec: {action: ALLOW, provider: {name: ext-authz}}\n")
    assert issue.path == "spec.provider"
    assert "only allowed with action CUSTOM" in issue.message


def test_custom_action_cannot_match_on_identities() -> None:
    found = issues(
        AP_HEAD,
        """
        spec:
          action: CUSTOM
          provider: {name: ext-authz}
          rules:
            - from: [{source: {namespaces: [shop]}}]
              when: [{key: "request.auth.claims[group]", values: [admin]}]
        """,
    )
    assert [(i.path, i.message) for i in found] == [
        ("spec.rules[0].from[0].source.namespaces", "not supported with action CUSTOM"),
        ("spec.rules[0].when[0].key", "not supported with action CUSTOM"),
    ]


def test_deny_without_rules_is_rejected() -> None:
    issue = one_issue(AP_HEAD, "spec: {action: DENY}\n")
    assert issue.path == "spec.rules"
    assert "never matches" in issue.message


def test_operation_ports_are_digit_strings_in_range() -> None:
    found = issues(
        AP_HEAD, 'spec: {rules: [{to: [{operation: {ports: ["8080", "70000", "http"]}}]}]}\n'
    )
    paths = [i.path for i in found]
    assert paths == [
        "spec.rules[0].to[0].operation.ports[1]",
        "spec.rules[0].to[0].operation.ports[2]",
    ]
    assert "between 1 and 65535" in found[0].message


def test_service_accounts_cannot_be_combined_with_principals() -> None:
    issue = one_issue(
        AP_HEAD,
        """
        spec:
          rules: [{from: [{source: {principals: [a], serviceAccounts: [shop/frontend]}}]}]
        """,
    )
    assert issue.path == "spec.rules[0].from[0].source.serviceAccounts"


def test_condition_needs_values_and_a_known_key() -> None:
    found = issues(AP_HEAD, "spec: {rules: [{when: [{key: source.colour}]}]}\n")
    assert [(i.path, i.message) for i in found] == [
        ("spec.rules[0].when[0].key", "unknown condition key 'source.colour'"),
        ("spec.rules[0].when[0].values", "set values or notValues"),
    ]


def test_target_ref_rules() -> None:
    found = issues(
        AP_HEAD,
        """
        spec:
          targetRefs: [{kind: Service, name: backend, group: apps, namespace: other}]
        """,
    )
    assert {i.path for i in found} == {"spec.targetRefs[0].namespace", "spec.targetRefs[0].group"}


def test_port_level_mtls_requires_a_selector() -> None:
    issue = one_issue(
        """
        apiVersion: security.istio.io/v1beta1
        kind: PeerAuthentication
        metadata: {name: default, namespace: shop}
        spec:
          mtls: {mode: STRICT}
          portLevelMtls: {8080: {mode: DISABLE}}
        """
    )
    assert issue.path == "spec.portLevelMtls"
    assert "selector" in issue.message


def test_port_level_mtls_accepts_string_keys_from_json() -> None:
    policy = parse_one(
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: backend, namespace: shop}
        spec:
          selector: {matchLabels: {app: backend}}
          portLevelMtls: {"8080": {mode: DISABLE}, 9090: {mode: STRICT}}
        """
    )
    assert isinstance(policy, PeerAuthentication)
    assert set(policy.spec.port_level_mtls) == {8080, 9090}
    issue = one_issue(
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: backend, namespace: shop}
        spec:
          selector: {matchLabels: {app: backend}}
          portLevelMtls: {"http": {mode: DISABLE}}
        """
    )
    assert issue.path == "spec.portLevelMtls[http]"


def test_jwt_rule_needs_issuer_or_jwks_uri() -> None:
    found = issues(
        """
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: jwt, namespace: shop}
        spec:
          jwtRules:
            - audiences: [""]
              jwks: "not json"
        """
    )
    by_path = {i.path: i.message for i in found}
    assert by_path["spec.jwtRules[0].issuer"] == "set issuer or jwksUri"
    assert "not valid JSON" in by_path["spec.jwtRules[0].jwks"]
    assert by_path["spec.jwtRules[0].audiences[0]"] == "must not be an empty string"


def test_jwks_uri_is_http_https_or_an_absolute_file_url() -> None:
    def jwks_uri_issue(uri: str) -> str | None:
        text = _text(
            (
                f"""
                apiVersion: security.istio.io/v1
                kind: RequestAuthentication
                metadata: {{name: jwt, namespace: shop}}
                spec:
                  jwtRules: [{{issuer: "https://issuer.example", jwksUri: "{uri}"}}]
                """,
            )
        )
        try:
            parse_documents(text, "test.yaml")
        except ConfigError as exc:
            by_path = {i.path: i.message for i in exc.issues}
            return by_path["spec.jwtRules[0].jwksUri"]
        return None

    assert jwks_uri_issue("https://issuer.example/.well-known/jwks.json") is None
    assert jwks_uri_issue("http://jwks.auth.svc.cluster.local:8080/jwks.json") is None
    assert jwks_uri_issue("file:///etc/meshway/jwks.json") is None
    assert "file:///absolute/path" in (jwks_uri_issue("file://host/etc/jwks.json") or "")
    assert "file:///absolute/path" in (jwks_uri_issue("file:jwks.json") or "")
    assert "http(s)://host/ or file:///path" in (jwks_uri_issue("ftp://x/jwks.json") or "")


# --------------------------------------------------------------------------- Gateway API


def test_bad_regex_in_http_route_matches() -> None:
    found = issues(
        ROUTE_HEAD,
        """
        spec:
          rules:
            - matches:
                - path: {type: RegularExpression, value: "/api/(v1"}
                  headers: [{type: RegularExpression, name: x-user, value: "[a-"}]
                  queryParams: [{type: RegularExpression, name: q, value: "*"}]
        """,
    )
    by_path = {i.path: i.message for i in found}
    prefix = "spec.rules[0].matches[0]"
    assert "invalid regular expression '/api/(v1': missing )" in by_path[f"{prefix}.path.value"]
    assert "unterminated character set" in by_path[f"{prefix}.headers[0].value"]
    assert "nothing to repeat" in by_path[f"{prefix}.queryParams[0].value"]


def test_http_route_weight_out_of_range() -> None:
    issue = one_issue(
        ROUTE_HEAD,
        """
        spec:
          rules:
            - backendRefs:
                - {name: v1, port: 80, weight: 1000001}
        """,
    )
    assert issue.path == "spec.rules[0].backendRefs[0].weight"
    assert issue.message == "must be at most 1000000, got 1000001"


def test_redirect_and_rewrite_in_one_rule() -> None:
    issue = one_issue(
        ROUTE_HEAD,
        """
        spec:
          rules:
            - filters:
                - {type: RequestRedirect, requestRedirect: {scheme: https}}
                - {type: URLRewrite, urlRewrite: {hostname: example.com}}
        """,
    )
    assert issue.path == "spec.rules[0].filters"
    assert "cannot be used together" in issue.message


def test_filter_type_must_match_its_field() -> None:
    found = issues(
        ROUTE_HEAD,
        """
        spec:
          rules:
            - filters:
                - {type: RequestHeaderModifier, urlRewrite: {hostname: example.com}}
        """,
    )
    assert {(i.path, i.message) for i in found} == {
        (
            "spec.rules[0].filters[0].requestHeaderModifier",
            "required when type is RequestHeaderModifier",
        ),
        ("spec.rules[0].filters[0].urlRewrite", "not allowed when type is RequestHeaderModifier"),
    }


def test_backend_request_timeout_within_request_timeout() -> None:
    issue = one_issue(
        ROUTE_HEAD, "spec: {rules: [{timeouts: {request: 1s, backendRequest: 2s}}]}\n"
    )
    assert issue.path == "spec.rules[0].timeouts.backendRequest"
    assert "must not be longer than request (1s)" in issue.message
    bad = one_issue(ROUTE_HEAD, "spec: {rules: [{timeouts: {request: 10 seconds}}]}\n")
    assert bad.path == "spec.rules[0].timeouts.request"
    assert "invalid duration" in bad.message


def test_replace_prefix_match_needs_a_path_prefix_match() -> None:
    issue = one_issue(
        ROUTE_HEAD,
        """
        spec:
          rules:
            - matches: [{path: {type: Exact, value: /old}}]
              filters:
                - type: URLRewrite
                  urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
        """,
    )
    assert issue.path == "spec.rules[0].filters[0]"


def test_gamma_parent_and_service_backend_rules() -> None:
    found = issues(
        ROUTE_HEAD,
        """
        spec:
          parentRefs: [{kind: Service, name: backend}]
          rules: [{backendRefs: [{name: backend-v1}]}]
        """,
    )
    by_path = {i.path: i.message for i in found}
    assert "core group" in by_path["spec.parentRefs[0].group"]
    assert by_path["spec.rules[0].backendRefs[0].port"] == "required when referencing a Service"


def test_http_route_defaults_match_the_gateway_api() -> None:
    route = parse_one(ROUTE_HEAD, "spec: {rules: [{backendRefs: [{name: b, port: 80}]}]}\n")
    assert isinstance(route, HTTPRoute)
    rule = route.spec.rules[0]
    assert (rule.matches[0].path.type, rule.matches[0].path.value) == ("PathPrefix", "/")
    assert rule.backend_refs[0].weight == 1
    assert rule.backend_refs[0].kind == "Service"


def test_grpc_route_regex_and_method_names() -> None:
    found = issues(
        """
        apiVersion: gateway.networking.k8s.io/v1
        kind: GRPCRoute
        metadata: {name: g, namespace: shop}
        spec:
          rules:
            - matches:
                - method: {type: RegularExpression, service: "shop.(Cart"}
                - method: {service: "shop/Cart"}
                - method: {}
        """
    )
    by_path = {i.path: i.message for i in found}
    prefix = "spec.rules[0].matches"
    assert "invalid regular expression" in by_path[f"{prefix}[0].method.service"]
    assert "invalid gRPC service name" in by_path[f"{prefix}[1].method.service"]
    assert by_path[f"{prefix}[2].method"] == "set service, method or both"


def test_gateway_listener_rules() -> None:
    found = issues(
        """
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: services}}
        spec:
          gatewayClassName: istio-waypoint
          listeners:
            - {name: mesh, port: 15008, protocol: HBONE}
            - {name: mesh, port: 443, protocol: HTTPS}
        """
    )
    by_path = {i.path: i.message for i in found}
    assert (
        "'service', 'workload', 'all', 'none'" in by_path["metadata.labels[istio.io/waypoint-for]"]
    )
    assert by_path["spec.listeners[1].tls"] == "required with protocol HTTPS"


# --------------------------------------------------------------------------- Istio networking


def test_virtual_service_weights_must_add_up_to_100() -> None:
    issue = one_issue(
        VS_HEAD,
        """
        spec:
          hosts: [backend]
          http:
            - route:
                - destination: {host: backend, subset: v1}
                  weight: 90
                - destination: {host: backend, subset: v2}
                  weight: 20
        """,
    )
    assert issue.path == "spec.http[0].route"
    assert issue.message == "total destination weight 110 != 100"


def test_virtual_service_single_destination_without_weight_is_fine() -> None:
    parse_one(VS_HEAD, "spec: {hosts: [backend], http: [{route: [{destination: {host: b}}]}]}\n")
    issue = one_issue(
        VS_HEAD
        + "spec: {hosts: [backend], http: [{route: [{destination: {host: b}, weight: 50}]}]}\n"
    )
    assert issue.message == "total destination weight 50 != 100"


def test_virtual_service_bad_regex() -> None:
    issue = one_issue(
        VS_HEAD,
        """
        spec:
          hosts: [backend]
          http:
            - match: [{headers: {x-user: {regex: "(admin"}}}]
              route: [{destination: {host: backend}}]
        """,
    )
    assert issue.path == "spec.http[0].match[0].headers[x-user].regex"
    assert "invalid regular expression '(admin'" in issue.message


def test_destination_rule_rules() -> None:
    found = issues(
        """
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: backend, namespace: shop}
        spec:
          host: backend
          trafficPolicy:
            loadBalancer:
              consistentHash: {httpHeaderName: x-user, useSourceIp: true}
            outlierDetection: {maxEjectionPercent: 150}
          subsets:
            - {name: v1, labels: {version: v1}}
            - {name: V2, labels: {version: v2}}
        """
    )
    by_path = {i.path: i.message for i in found}
    assert "set exactly one of" in by_path["spec.trafficPolicy.loadBalancer.consistentHash"]
    assert by_path["spec.trafficPolicy.outlierDetection.maxEjectionPercent"] == (
        "must be at most 100, got 150"
    )
    assert "not a valid DNS label" in by_path["spec.subsets[1].name"]


def test_destination_rule_subset_names_unique() -> None:
    issue = one_issue(
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: backend, namespace: shop}
        spec:
          host: backend
          subsets: [{name: v1}, {name: v1}]
        """
    )
    assert (issue.path, issue.message) == ("spec.subsets[1].name", "duplicate subset 'v1'")


def test_every_authorization_field_of_the_brief_round_trips() -> None:
    """BRIEF §3 names these fields; each must exist in the typed model (and survive to_dict)."""
    policy = parse_one(
        AP_HEAD,
        """\
        spec:
          action: DENY
          rules:
          - from:
            - source:
                principals: [cluster.local/ns/a/sa/b]
                notPrincipals: [cluster.local/ns/a/sa/c]
                requestPrincipals: [issuer/subject]
                notRequestPrincipals: [issuer/other]
                namespaces: [a]
                notNamespaces: [b]
                ipBlocks: [10.0.0.0/8]
                notIpBlocks: [10.1.0.0/16]
                remoteIpBlocks: [192.0.2.0/24]
                notRemoteIpBlocks: [192.0.2.7]
                trustDomains: [cluster.local]
                notTrustDomains: [evil.example]
            - source: {serviceAccounts: [x], notServiceAccounts: [other/y]}
            to:
            - operation:
                hosts: [a.example]
                notHosts: [b.example]
                ports: ["80"]
                notPorts: ["81"]
                methods: [GET]
                notMethods: [DELETE]
                paths: [/api/*]
                notPaths: [/api/admin]
            when:
            - key: request.headers[x-env]
              values: [prod]
              notValues: [dev]
        """,
    )
    assert isinstance(policy, AuthorizationPolicy)
    sources = [f["source"] for f in policy.to_dict()["spec"]["rules"][0]["from"]]
    assert sources[0]["trustDomains"] == ["cluster.local"]
    assert sources[0]["notTrustDomains"] == ["evil.example"]
    assert len(sources[0]) + len(sources[1]) == 14
    operation = policy.to_dict()["spec"]["rules"][0]["to"][0]["operation"]
    assert len(operation) == 8
