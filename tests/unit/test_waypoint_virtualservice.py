"""Istio VirtualService `http` routes at the waypoint (`waypoint.virtualservice`): which
VirtualService applies, matching in order, destinations, rewrites, headers, retries, faults
and mirrors, built from YAML as Istio users write it."""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest

from meshway.config.loader import parse_documents
from meshway.config.model import HTTPRoute, VirtualService
from meshway.waypoint.messages import Request, Response
from meshway.waypoint.routing import RouteMatch, RouteTable, ServiceRoutes, Timeouts
from meshway.waypoint.virtualservice import DEFAULT_VS_RETRY, resolve_host, retry_codes

pytestmark = pytest.mark.unit


def vs(spec: str, name: str = "vs", namespace: str = "shop", created: str = "") -> str:
    stamp = f", creationTimestamp: '{created}'" if created else ""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {name}, namespace: {namespace}{stamp}}}\nspec:\n{body}\n"
    )


def build(*docs: str) -> RouteTable:
    parsed = parse_documents("---\n".join(docs), "vs.yaml")
    return RouteTable.build(
        [d for d in parsed if isinstance(d, HTTPRoute)],
        virtual_services=[d for d in parsed if isinstance(d, VirtualService)],
    )


def reviews(t: RouteTable, port: int = 9080, ns: str = "shop") -> ServiceRoutes:
    routes = t.for_service(ns, "reviews", port)
    assert routes is not None
    return routes


def match(
    routes: ServiceRoutes, path: str = "/", method: str = "GET", **headers: str
) -> RouteMatch:
    found = routes.match(
        Request(
            method, path, "reviews:9080", [(k.replace("_", "-"), v) for k, v in headers.items()]
        )
    )
    assert found is not None, path
    return found


def rule_index(routes: ServiceRoutes, path: str, method: str = "GET", **headers: str) -> int | None:
    found = routes.match(
        Request(
            method, path, "reviews:9080", [(k.replace("_", "-"), v) for k, v in headers.items()]
        )
    )
    return found.rule.index if found is not None else None


# --------------------------------------------------------------------------- which applies


def test_hosts_name_services_in_every_form() -> None:
    assert resolve_host("reviews", "shop", "cluster.local") == ("shop", "reviews")
    assert resolve_host("reviews.prod", "shop", "cluster.local") == ("prod", "reviews")
    assert resolve_host("reviews.prod.svc", "shop", "cluster.local") == ("prod", "reviews")
    assert resolve_host("reviews.prod.svc.cluster.local", "shop", "cluster.local") == (
        "prod",
        "reviews",
    )
    assert resolve_host("*.prod.svc.cluster.local", "shop", "cluster.local") is None
    assert resolve_host("api.example.com", "shop", "cluster.local") is None
    t = build(
        vs(
            """
            hosts: [reviews, ratings.prod, details.shop.svc.cluster.local, api.example.com]
            http: [{route: [{destination: {host: reviews}}]}]
            """
        )
    )
    assert t.for_service("shop", "reviews", 9080) is not None
    assert t.for_service("prod", "ratings", 80) is not None
    assert t.for_service("shop", "details", 80) is not None
    assert any("'api.example.com' does not name a Service" in p for p in t.problems)


def test_gateway_only_virtual_services_are_not_for_the_mesh() -> None:
    route = "http: [{route: [{destination: {host: reviews}}]}]"
    t = build(vs(f"hosts: [reviews]\ngateways: [shop/ingress]\n{route}"))
    assert t.for_service("shop", "reviews", 9080) is None
    t = build(vs(f"hosts: [reviews]\ngateways: [shop/ingress, mesh]\n{route}"))
    assert t.for_service("shop", "reviews", 9080) is not None


def test_the_oldest_virtual_service_for_a_host_wins() -> None:
    t = build(
        vs(
            "hosts: [reviews]\nhttp: [{route: [{destination: {host: new}}]}]",
            name="newer",
            created="2026-02-01T00:00:00Z",
        ),
        vs(
            "hosts: [reviews]\nhttp: [{route: [{destination: {host: old}}]}]",
            name="older",
            created="2026-01-01T00:00:00Z",
        ),
    )
    found = match(reviews(t))
    assert found.route == "shop/older"
    assert found.pick_backend(lambda: 0.0).name == "old"  # type: ignore[union-attr]
    assert any("VirtualService shop/newer" in p and "older" in p for p in t.problems)


def test_http_routes_win_over_virtual_services() -> None:
    http_route = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        "metadata: {name: r, namespace: shop}\n"
        "spec:\n  parentRefs: [{kind: Service, group: '', name: reviews, port: 9080}]\n"
        "  rules: [{backendRefs: [{name: from-route, port: 9080}]}]\n"
    )
    t = build(http_route, vs("hosts: [reviews]\nhttp: [{route: [{destination: {host: x}}]}]"))
    assert match(reviews(t)).pick_backend(lambda: 0.0).name == "from-route"  # type: ignore[union-attr]
    assert any("which win over VirtualServices" in p for p in t.problems)


# --------------------------------------------------------------------------- matching


def test_first_matching_route_wins_in_order() -> None:
    t = build(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {prefix: /}}]
              route: [{destination: {host: reviews, subset: v1}}]
            - match: [{uri: {exact: /specific}}]
              route: [{destination: {host: reviews, subset: v2}}]
            """
        )
    )
    # Unlike HTTPRoute precedence, the longer exact match does not win: order does.
    assert rule_index(reviews(t), "/specific") == 0


def test_uri_matches_and_ignore_uri_case() -> None:
    t = build(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {exact: /Exact}}]
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /API/}, ignoreUriCase: true}]
              route: [{destination: {host: reviews}}]
            - match: [{uri: {regex: '/v[0-9]+/items'}}]
              route: [{destination: {host: reviews}}]
            """
        )
    )
    r = reviews(t)
    assert rule_index(r, "/Exact") == 0
    assert rule_index(r, "/exact") is None
    assert rule_index(r, "/Exact?x=1") == 0  # the query is not part of the uri
    assert rule_index(r, "/api/things") == 1 and rule_index(r, "/Api/x") == 1
    assert rule_index(r, "/v12/items") == 2
    assert rule_index(r, "/v12/items/more") is None  # a regex matches the whole path


def test_header_query_method_and_without_headers() -> None:
    t = build(
        vs(
            """
            hosts: [reviews]
            http:
            - match:
              - headers: {end-user: {exact: jason}, x-canary: {}}
              route: [{destination: {host: reviews}}]
            - match:
              - queryParams: {debug: {regex: '1|true'}}
                method: {exact: POST}
              route: [{destination: {host: reviews}}]
            - match:
              - withoutHeaders: {x-internal: {}}
                uri: {prefix: /public}
              route: [{destination: {host: reviews}}]
            """
        )
    )
    r = reviews(t)
    assert rule_index(r, "/", end_user="jason", x_canary="") == 0
    assert rule_index(r, "/", end_user="jason") is None  # x-canary must be present
    assert rule_index(r, "/?debug=true", method="POST") == 1
    assert rule_index(r, "/?debug=true") is None
    assert rule_index(r, "/public/a") == 2
    assert rule_index(r, "/public/a", x_internal="1") is None


def test_source_matches_never_match_and_are_reported() -> None:
    t = build(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{sourceLabels: {app: web}}]
              route: [{destination: {host: reviews, subset: v2}}]
            - route: [{destination: {host: reviews}}]
            """
        )
    )
    assert rule_index(reviews(t), "/") == 1
    assert any("sourceLabels/sourceNamespace are not honoured" in p for p in t.problems)


def test_match_port_limits_a_route_to_that_port() -> None:
    t = build(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{port: 8080}]
              route: [{destination: {host: reviews}}]
            """
        )
    )
    assert reviews(t, 8080).match(Request("GET", "/", "r")) is not None
    assert reviews(t, 9080).match(Request("GET", "/", "r")) is None


# --------------------------------------------------------------------------- destinations


def test_weights_subsets_and_ports() -> None:
    t = build(
        vs(
            """
            hosts: [reviews]
            http:
            - route:
              - destination: {host: reviews, subset: v1}
                weight: 75
              - destination: {host: ratings.prod, subset: v2, port: {number: 8080}}
                weight: 25
            """
        )
    )
    found = match(reviews(t))
    picks = Counter()
    for i in range(100):
        backend = found.pick_backend(lambda i=i: i / 100)  # type: ignore[misc]
        assert backend is not None
        picks[(backend.namespace, backend.name, backend.subset, backend.port)] += 1
    assert picks == {("shop", "reviews", "v1", 9080): 75, ("prod", "ratings", "v2", 8080): 25}
    # Without a port, a destination gets the port the request was sent to.
    other = match(reviews(t, 7000)).pick_backend(lambda: 0.0)
    assert other is not None and other.port == 7000


def test_rewrite_prefix_or_whole_path_and_authority() -> None:
    t = build(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {prefix: /old}}, {uri: {exact: /legacy}}]
              rewrite: {uri: /new, authority: reviews-v2.shop}
              route: [{destination: {host: reviews}}]
            """
        )
    )
    r = reviews(t)
    for path, expected in (("/old/a?q=1", "/new/a?q=1"), ("/legacy", "/new")):
        request = Request("GET", path, "reviews:9080")
        found = r.match(request)
        assert found is not None
        assert found.apply_request_filters(request) is None
        assert (request.path, request.authority) == (expected, "reviews-v2.shop")


def test_headers_per_route_and_per_destination() -> None:
    t = build(
        vs(
            """
            hosts: [reviews]
            http:
            - headers:
                request: {set: {X-Env: prod}, add: {x-tag: a}, remove: [x-secret]}
                response: {set: {x-served-by: waypoint}, remove: [server]}
              route:
              - destination: {host: reviews}
                headers:
                  request: {set: {x-dest: reviews}}
                  response: {add: {x-dest: reviews}}
            """
        )
    )
    request = Request("GET", "/", "r", [("x-secret", "s"), ("x-tag", "z")])
    found = reviews(t).match(request)
    assert found is not None
    found.apply_request_filters(request)
    assert found.pick_backend(lambda: 0.0) is not None
    found.apply_backend_filters(request)
    assert sorted(request.headers) == [("x-dest", "reviews"), ("x-env", "prod"), ("x-tag", "z,a")]
    response = Response(200, [("server", "app")])
    found.apply_response_filters(response)
    assert response.headers == [("x-served-by", "waypoint"), ("x-dest", "reviews")]


def test_timeout_retries_fault_and_mirror() -> None:
    t = build(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {prefix: /a}}]
              timeout: 3s
              retries: {attempts: 4, perTryTimeout: 500ms, retryOn: 'gateway-error,429'}
              fault:
                delay: {fixedDelay: 200ms, percentage: {value: 50}}
                abort: {httpStatus: 503, percentage: {value: 30}}
              mirror: {host: reviews-shadow, port: {number: 9090}}
              mirrorPercentage: {value: 10}
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /b}}]
              retries: {attempts: 0}
              mirror: {host: reviews-shadow}
              route: [{destination: {host: reviews}}]
            - route: [{destination: {host: reviews}}]
            """
        )
    )
    r = reviews(t)
    a = match(r, "/a")
    assert a.rule.timeouts == Timeouts(3.0, 0.5)
    assert a.rule.retry is not None and a.rule.retry.attempts == 4
    assert a.rule.retry.codes == {502, 503, 504, 429}
    assert a.fault is not None
    assert (a.fault.delay, a.fault.delay_fraction) == (0.2, 0.5)
    assert (a.fault.abort_status, a.fault.abort_fraction) == (503, 0.3)
    (mirror,) = a.mirrors
    assert (mirror.name, mirror.port, mirror.fraction) == ("reviews-shadow", 9090, 0.1)
    b = match(r, "/b")
    assert b.rule.retry is None and b.fault is None
    assert [(m.port, m.fraction) for m in b.mirrors] == [(9080, 1.0)]
    rest = match(r, "/c")
    assert rest.rule.retry == DEFAULT_VS_RETRY and rest.rule.timeouts == Timeouts()
    assert retry_codes("5xx,retriable-4xx") == frozenset({409, *range(500, 600)})
