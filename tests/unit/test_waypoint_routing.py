"""Waypoint routing: attachment (GAMMA), matching, precedence, filters, backends, retries and
timeouts, built from Gateway API YAML as users write it."""

from __future__ import annotations

import random
import textwrap
from collections import Counter
from collections.abc import Callable

import pytest

from meshway.config.loader import parse_documents
from meshway.config.model import GRPCRoute, HTTPRoute
from meshway.waypoint.messages import Request, Response
from meshway.waypoint.routing import (
    NO_TIMEOUTS,
    Backend,
    RetryPolicy,
    RouteMatch,
    RouteTable,
    ServiceRoutes,
    Timeouts,
)

pytestmark = pytest.mark.unit

PARENT = "parentRefs: [{kind: Service, group: '', name: reviews, port: 9080}]"


def route(
    spec: str,
    *,
    name: str = "r",
    namespace: str = "shop",
    kind: str = "HTTPRoute",
    created: str | None = None,
) -> str:
    """One route document; `spec` is the YAML under `spec:`."""
    stamp = f", creationTimestamp: '{created}'" if created else ""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        "apiVersion: gateway.networking.k8s.io/v1\n"
        f"kind: {kind}\n"
        f"metadata: {{name: {name}, namespace: {namespace}{stamp}}}\n"
        f"spec:\n{body}\n"
    )


def build(*docs: str) -> RouteTable:
    parsed = parse_documents("---\n".join(docs), "routes.yaml")
    routes = [doc for doc in parsed if isinstance(doc, HTTPRoute | GRPCRoute)]
    assert len(routes) == len(docs)
    return RouteTable.build(routes)


def reviews(table: RouteTable, port: int = 9080) -> ServiceRoutes:
    routes = table.for_service("shop", "reviews", port)
    assert routes is not None
    return routes


def request(
    path: str = "/",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    authority: str = "reviews.shop:9080",
) -> Request:
    return Request(method, path, authority, headers or [])


def matched(routes: ServiceRoutes, req: Request) -> RouteMatch:
    found = routes.match(req)
    assert found is not None, f"no route for {req.method} {req.path}"
    return found


def backend_of(routes: ServiceRoutes, req: Request) -> str | None:
    """The name of the (single) backend a request is routed to, or None when nothing matched."""
    found = routes.match(req)
    if found is None:
        return None
    picked = found.pick_backend(lambda: 0.0)
    assert picked is not None
    return picked.name


def fixed(value: float) -> Callable[[], float]:
    """A "random" source that always returns `value`."""
    return lambda: value


def rules(*rules_yaml: str) -> str:
    """A spec attached to reviews:9080 with the given rules (each a YAML flow mapping)."""
    return f"{PARENT}\nrules:\n" + "".join(f"  - {r}\n" for r in rules_yaml)


# --------------------------------------------------------------------------- attachment


def test_routes_attach_only_to_service_parents() -> None:
    table = build(
        route(rules("{backendRefs: [{name: v1, port: 80}]}"), name="mesh"),
        route(
            """
            parentRefs: [{name: ingress}]
            rules: [{backendRefs: [{name: v2, port: 80}]}]
            """,
            name="north-south",
        ),
    )
    routes = reviews(table)
    assert routes.routes == ("shop/mesh",)
    assert routes.kind == "HTTPRoute"
    assert table.for_service("shop", "ratings", 9080) is None
    assert table.for_service("other", "reviews", 9080) is None
    assert table.for_service("shop", "ingress", 80) is None


def test_parent_port_limits_a_route_to_that_port() -> None:
    table = build(
        route(rules("{backendRefs: [{name: only-9080, port: 80}]}"), name="a"),
        route(
            """
            parentRefs: [{kind: Service, group: core, name: reviews}]
            rules: [{backendRefs: [{name: every-port, port: 80}]}]
            """,
            name="b",
        ),
    )
    assert reviews(table, 9080).routes == ("shop/a", "shop/b")
    other = reviews(table, 9090)
    assert other.routes == ("shop/b",)
    assert other.port == 9090
    assert backend_of(other, request()) == "every-port"

    only_port = build(route(rules("{backendRefs: [{name: v1, port: 80}]}")))
    assert only_port.for_service("shop", "reviews", 9090) is None


def test_parent_namespace_defaults_to_the_routes() -> None:
    table = build(
        route(
            """
            parentRefs: [{kind: Service, group: '', name: reviews}]
            rules: [{backendRefs: [{name: v1, port: 80}]}]
            """,
            namespace="books",
        )
    )
    assert table.for_service("books", "reviews", 80) is not None
    assert table.for_service("shop", "reviews", 80) is None


def test_parent_port_name_alone_is_reported_not_attached() -> None:
    table = build(
        route(
            """
            parentRefs: [{kind: Service, group: '', name: reviews, sectionName: http}]
            rules: [{backendRefs: [{name: v1, port: 80}]}]
            """
        )
    )
    assert table.for_service("shop", "reviews", 9080) is None
    assert any("port 'http' without a port number" in p for p in table.problems)


def test_consumer_routes_apply_only_to_their_namespace() -> None:
    table = build(
        route(rules("{backendRefs: [{name: producer, port: 80}]}"), name="producer"),
        route(
            """
            parentRefs: [{kind: Service, group: '', name: reviews, namespace: shop, port: 9080}]
            rules: [{backendRefs: [{name: consumer, port: 80}]}]
            """,
            name="consumer",
            namespace="frontend",
        ),
    )
    for client in (None, "shop", "batch"):
        routes = table.for_service("shop", "reviews", 9080, client)
        assert routes is not None
        assert backend_of(routes, request()) == "producer"
    routes = table.for_service("shop", "reviews", 9080, "frontend")
    assert routes is not None
    assert routes.routes == ("frontend/consumer",)
    found = matched(routes, request())
    picked = found.pick_backend(lambda: 0.0)
    # A backendRef namespace defaults to the route's, not the parent's.
    assert picked is not None and (picked.namespace, picked.name) == ("frontend", "consumer")
    assert picked.hostname == "consumer.frontend.svc.cluster.local"


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("path_match", "path", "expected"),
    [
        ("{type: Exact, value: /api}", "/api", True),
        ("{type: Exact, value: /api}", "/api?page=2", True),
        ("{type: Exact, value: /api}", "/api/", False),
        ("{type: Exact, value: /api}", "/API", False),
        ("{type: PathPrefix, value: /foo}", "/foo", True),
        ("{type: PathPrefix, value: /foo}", "/foo/", True),
        ("{type: PathPrefix, value: /foo}", "/foo/bar", True),
        ("{type: PathPrefix, value: /foo}", "/foo?x=1", True),
        ("{type: PathPrefix, value: /foo}", "/foobar", False),
        ("{type: PathPrefix, value: /foo/}", "/foo", True),
        ("{type: PathPrefix, value: /foo/}", "/foo/bar", True),
        ("{type: PathPrefix, value: /foo/}", "/foobar", False),
        ("{type: PathPrefix, value: /}", "/anything/at/all", True),
        ("{type: RegularExpression, value: '/v[0-9]+/.*'}", "/v2/items", True),
        ("{type: RegularExpression, value: '/v[0-9]+/.*'}", "/api/v2/items", False),
        ("{type: RegularExpression, value: '/v[0-9]+'}", "/v2?q=/v3", True),
    ],
)
def test_path_matching(path_match: str, path: str, expected: bool) -> None:
    routes = reviews(build(route(rules(f"{{matches: [{{path: {path_match}}}]}}"))))
    assert (routes.match(request(path)) is not None) is expected


def test_header_matching() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    "{matches: [{headers: [{name: X-Version, value: v2}, "
                    "{name: x-version, value: ignored}]}], backendRefs: [{name: v2, port: 80}]}",
                    "{matches: [{headers: [{name: x-tags, type: RegularExpression,"
                    " value: 'a,b'}]}], backendRefs: [{name: tags, port: 80}]}",
                    "{matches: [{headers: [{name: Host, value: 'reviews.example:80'}]}],"
                    " backendRefs: [{name: by-host, port: 80}]}",
                )
            )
        )
    )
    # Names are case-insensitive; of two matches on one name only the first counts.
    assert backend_of(routes, request(headers=[("x-version", "v2")])) == "v2"
    # Values are case-sensitive.
    assert backend_of(routes, request(headers=[("x-version", "V2")])) is None
    # Repeated fields are matched as one comma-joined value.
    assert backend_of(routes, request(headers=[("x-tags", "a"), ("x-tags", "b")])) == "tags"
    assert backend_of(routes, request(headers=[("x-tags", "a")])) is None
    # `host` is the request's authority.
    assert backend_of(routes, request(authority="reviews.example:80")) == "by-host"
    assert backend_of(routes, request()) is None


def test_query_parameter_matching() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    "{matches: [{queryParams: [{name: user, value: 'jane doe'}]}],"
                    " backendRefs: [{name: jane, port: 80}]}",
                    "{matches: [{queryParams: [{name: id, type: RegularExpression,"
                    " value: '[0-9]+'}]}], backendRefs: [{name: numeric, port: 80}]}",
                )
            )
        )
    )
    assert backend_of(routes, request("/?user=jane%20doe")) == "jane"
    assert backend_of(routes, request("/?user=jane%20doe&user=john")) == "jane"
    assert backend_of(routes, request("/?user=john&user=jane%20doe")) is None
    assert backend_of(routes, request("/?id=42")) == "numeric"
    assert backend_of(routes, request("/?id=42x")) is None
    assert backend_of(routes, request("/")) is None


def test_method_matching_and_or_between_matches() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    "{matches: [{method: POST, path: {type: Exact, value: /orders}},"
                    " {method: DELETE}], backendRefs: [{name: writes, port: 80}]}"
                )
            )
        )
    )
    assert backend_of(routes, request("/orders", "POST")) == "writes"
    assert backend_of(routes, request("/anything", "DELETE")) == "writes"
    assert backend_of(routes, request("/orders", "GET")) is None
    assert backend_of(routes, request("/other", "POST")) is None


def test_no_matching_rule_is_none_for_a_404() -> None:
    routes = reviews(build(route(rules("{matches: [{path: {type: Exact, value: /a}}]}"))))
    assert routes.match(request("/b")) is None


# --------------------------------------------------------------------------- precedence


def test_precedence_between_rules_of_one_route() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    "{backendRefs: [{name: catch-all, port: 80}]}",
                    "{matches: [{path: {value: /a}}], backendRefs: [{name: prefix-a, port: 80}]}",
                    "{matches: [{path: {type: RegularExpression, value: '/a/.*'}}],"
                    " backendRefs: [{name: regex, port: 80}]}",
                    "{matches: [{path: {value: /a/b}}],"
                    " backendRefs: [{name: prefix-ab, port: 80}]}",
                    "{matches: [{path: {type: Exact, value: /a/b}}],"
                    " backendRefs: [{name: exact, port: 80}]}",
                    "{matches: [{path: {value: /a}, headers: [{name: h1, value: x}]}],"
                    " backendRefs: [{name: one-header, port: 80}]}",
                    "{matches: [{path: {value: /a}, headers: [{name: h1, value: x},"
                    " {name: h2, value: x}]}], backendRefs: [{name: two-headers, port: 80}]}",
                    "{matches: [{path: {value: /a}, method: PUT}],"
                    " backendRefs: [{name: method, port: 80}]}",
                    "{matches: [{path: {value: /a}, queryParams: [{name: q, value: x}]}],"
                    " backendRefs: [{name: query, port: 80}]}",
                    "{matches: [{path: {value: /a}, headers: [{name: h1, value: x}],"
                    " queryParams: [{name: q, value: x}]}],"
                    " backendRefs: [{name: header-and-query, port: 80}]}",
                    "{matches: [{path: {value: /a}}],"
                    " backendRefs: [{name: second-prefix-a, port: 80}]}",
                )
            )
        )
    )
    both = [("h1", "x"), ("h2", "x")]
    assert backend_of(routes, request("/a/b")) == "exact"
    assert backend_of(routes, request("/a/b/c")) == "prefix-ab"
    # Prefix over regex (implementation-specific; Istio's order).
    assert backend_of(routes, request("/a/c")) == "prefix-a"
    assert backend_of(routes, request("/z")) == "catch-all"
    # A method outranks header and query matches; more headers outrank fewer; headers
    # outrank query parameters.
    assert backend_of(routes, request("/a", "PUT", both)) == "method"
    assert backend_of(routes, request("/a?q=x", headers=both)) == "two-headers"
    assert backend_of(routes, request("/a?q=x", headers=[("h1", "x")])) == "header-and-query"
    assert backend_of(routes, request("/a", headers=[("h1", "x")])) == "one-header"
    assert backend_of(routes, request("/a?q=x")) == "query"
    # On a full tie the first rule wins.
    assert backend_of(routes, request("/a")) == "prefix-a"


def test_each_match_of_a_rule_has_its_own_precedence() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    "{matches: [{path: {type: Exact, value: /x}}, {path: {value: /}}],"
                    " backendRefs: [{name: first, port: 80}]}",
                    "{matches: [{path: {value: /y}}], backendRefs: [{name: second, port: 80}]}",
                )
            )
        )
    )
    assert backend_of(routes, request("/x")) == "first"
    assert backend_of(routes, request("/y/z")) == "second"
    assert backend_of(routes, request("/other")) == "first"


def test_precedence_between_routes_oldest_then_alphabetical() -> None:
    same = "{matches: [{path: {value: /}}], backendRefs: [{name: NAME, port: 80}]}"

    def named(name: str, created: str | None) -> str:
        return route(rules(same.replace("NAME", name)), name=name, created=created)

    older = build(
        named("a-newer", "2024-05-01T10:00:01Z"), named("z-older", "2024-05-01T10:00:00Z")
    )
    assert reviews(older).routes == ("shop/z-older", "shop/a-newer")
    assert backend_of(reviews(older), request()) == "z-older"

    tie = build(named("b", "2024-05-01T10:00:00Z"), named("a", "2024-05-01T10:00:00Z"))
    assert backend_of(reviews(tie), request()) == "a"

    untimed = build(named("b", None), named("c", "2024-05-01T10:00:00Z"), named("a", None))
    assert reviews(untimed).routes == ("shop/c", "shop/a", "shop/b")

    # Specificity still comes before age.
    specific = build(
        named("old", "2020-01-01T00:00:00Z"),
        route(
            rules("{matches: [{path: {value: /api}}], backendRefs: [{name: new, port: 80}]}"),
            name="new",
            created="2024-01-01T00:00:00Z",
        ),
    )
    assert backend_of(reviews(specific), request("/api/v1")) == "new"


# --------------------------------------------------------------------------- filters


def test_request_and_response_header_modifiers() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    """{filters: [
                        {type: RequestHeaderModifier, requestHeaderModifier: {
                          set: [{name: X-Env, value: prod}, {name: Host, value: reviews.v2}],
                          add: [{name: X-Trace, value: waypoint}],
                          remove: [X-Debug]}},
                        {type: ResponseHeaderModifier, responseHeaderModifier: {
                          set: [{name: Cache-Control, value: no-store}],
                          add: [{name: Set-Cookie, value: b=2}], remove: [Server]}}],
                      backendRefs: [{name: v1, port: 80}]}"""
                )
            )
        )
    )
    req = request(
        headers=[("x-env", "dev"), ("x-env", "qa"), ("x-trace", "client"), ("x-debug", "1")]
    )
    found = matched(routes, req)
    assert found.apply_request_filters(req) is None
    assert sorted(req.headers) == [("x-env", "prod"), ("x-trace", "client,waypoint")]
    assert req.authority == "reviews.v2"

    response = Response(200, [("server", "app"), ("set-cookie", "a=1")])
    found.apply_response_filters(response)
    assert sorted(response.headers) == [
        ("cache-control", "no-store"),
        ("set-cookie", "a=1"),
        ("set-cookie", "b=2"),
    ]


def test_url_rewrite_hostname_and_full_path() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    "{matches: [{path: {type: Exact, value: /old}}], filters: [{type: URLRewrite,"
                    " urlRewrite: {hostname: new.example, path: {type: ReplaceFullPath,"
                    " replaceFullPath: /new}}}], backendRefs: [{name: v1, port: 80}]}"
                )
            )
        )
    )
    req = request("/old?keep=1")
    assert matched(routes, req).apply_request_filters(req) is None
    assert (req.authority, req.path) == ("new.example", "/new?keep=1")


# The table from the Gateway API's HTTPPathModifier.ReplacePrefixMatch documentation.
@pytest.mark.parametrize(
    ("path", "prefix", "replacement", "expected"),
    [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/foo/bar?q=1", "/foo", "/xyz", "/xyz/bar?q=1"),
        ("/foo", "/", "/xyz", "/xyz/foo"),
    ],
)
def test_url_rewrite_replace_prefix_match(
    path: str, prefix: str, replacement: str, expected: str
) -> None:
    routes = reviews(
        build(
            route(
                rules(
                    f"{{matches: [{{path: {{value: '{prefix}'}}}}], filters: [{{type: URLRewrite,"
                    f" urlRewrite: {{path: {{type: ReplacePrefixMatch,"
                    f" replacePrefixMatch: '{replacement}'}}}}}}],"
                    " backendRefs: [{name: v1, port: 80}]}"
                )
            )
        )
    )
    req = request(path)
    assert matched(routes, req).apply_request_filters(req) is None
    assert req.path == expected


@pytest.mark.parametrize(
    ("redirect", "port", "location", "status"),
    [
        ("{}", 9080, "http://reviews.shop:9080/a/b?q=1", 302),
        ("{scheme: https}", 9080, "https://reviews.shop/a/b?q=1", 302),
        ("{scheme: https, port: 8443}", 9080, "https://reviews.shop:8443/a/b?q=1", 302),
        ("{scheme: http}", 9080, "http://reviews.shop/a/b?q=1", 302),
        ("{hostname: example.com, statusCode: 301}", 80, "http://example.com/a/b?q=1", 301),
        (
            "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}, statusCode: 308}",
            9080,
            "http://reviews.shop:9080/v2/b?q=1",
            308,
        ),
        (
            "{path: {type: ReplaceFullPath, replaceFullPath: /moved}}",
            9080,
            "http://reviews.shop:9080/moved?q=1",
            302,
        ),
    ],
)
def test_request_redirect_location(redirect: str, port: int, location: str, status: int) -> None:
    table = build(
        route(
            f"""
            parentRefs: [{{kind: Service, group: '', name: reviews}}]
            rules:
              - matches: [{{path: {{value: /a}}}}]
                filters: [{{type: RequestRedirect, requestRedirect: {redirect}}}]
            """
        )
    )
    req = request("/a/b?q=1")
    answer = matched(reviews(table, port), req).apply_request_filters(req)
    assert answer is not None
    assert answer.status == status
    assert answer.header("location") == location


def test_redirect_keeps_an_ipv6_host_bracketed() -> None:
    routes = reviews(
        build(route(rules("{filters: [{type: RequestRedirect, requestRedirect: {port: 8080}}]}")))
    )
    req = request("/x", authority="[fd00::1]:9080")
    answer = matched(routes, req).apply_request_filters(req)
    assert answer is not None
    assert answer.header("location") == "http://[fd00::1]:8080/x"


def test_extension_ref_filter_answers_500() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    "{filters: [{type: ExtensionRef, extensionRef: {group: example.com,"
                    " kind: Auth, name: a}}], backendRefs: [{name: v1, port: 80}]}"
                )
            )
        )
    )
    req = request()
    answer = matched(routes, req).apply_request_filters(req)
    assert answer is not None and answer.status == 500


def test_request_mirrors_are_exposed() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    """{filters: [
                        {type: RequestMirror, requestMirror: {
                          backendRef: {name: shadow, port: 80}, percent: 50}},
                        {type: RequestMirror, requestMirror: {
                          backendRef: {name: audit, namespace: sec, port: 81},
                          fraction: {numerator: 1, denominator: 4}}},
                        {type: RequestMirror, requestMirror: {backendRef: {name: all, port: 82}}}],
                      backendRefs: [{name: v1, port: 80, filters: [
                        {type: RequestMirror, requestMirror: {backendRef: {name: v1-shadow,
                         port: 80}}}]}]}"""
                )
            )
        )
    )
    found = matched(routes, request())
    described = [(m.namespace, m.name, m.port, m.fraction) for m in found.mirrors]
    assert described == [
        ("shop", "shadow", 80, 0.5),
        ("sec", "audit", 81, 0.25),
        ("shop", "all", 82, 1.0),
    ]
    found.pick_backend(lambda: 0.0)
    assert [m.name for m in found.mirrors][-1] == "v1-shadow"


def test_backend_filters_apply_only_to_the_picked_backend() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    """{backendRefs: [
                        {name: v1, port: 80, filters: [{type: RequestHeaderModifier,
                          requestHeaderModifier: {set: [{name: x-backend, value: v1}]}}]},
                        {name: v2, port: 80, filters: [{type: ResponseHeaderModifier,
                          responseHeaderModifier: {set: [{name: x-served-by, value: v2}]}}]}]}"""
                )
            )
        )
    )
    first, second = request(), request()
    match_v1, match_v2 = matched(routes, first), matched(routes, second)
    picked = match_v1.pick_backend(lambda: 0.1)
    assert picked is not None and picked.name == "v1"
    assert match_v1.apply_backend_filters(first) is None
    assert first.headers == [("x-backend", "v1")]
    response_v1 = Response(200)
    match_v1.apply_response_filters(response_v1)
    assert response_v1.headers == []

    picked = match_v2.pick_backend(lambda: 0.9)
    assert picked is not None and picked.name == "v2"
    assert match_v2.apply_backend_filters(second) is None
    assert second.headers == []
    response_v2 = Response(200)
    match_v2.apply_response_filters(response_v2)
    assert response_v2.headers == [("x-served-by", "v2")]


# --------------------------------------------------------------------------- backends


def test_weighted_backends_follow_their_weights() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    "{backendRefs: [{name: stable, port: 80, weight: 90},"
                    " {name: canary, port: 80, weight: 10}, {name: drained, port: 80, weight: 0}]}"
                )
            )
        )
    )
    rng = random.Random(1234)
    found = matched(routes, request())
    picks: Counter[str] = Counter()
    for _ in range(10_000):
        picked = found.pick_backend(rng.random)
        assert picked is not None
        picks[picked.name] += 1
    assert 8_800 <= picks["stable"] <= 9_200
    assert 800 <= picks["canary"] <= 1_200
    assert picks["drained"] == 0
    # The weight-0 backend is still a valid backend, just never drawn.
    assert [b.name for b in found.rule.backends] == ["stable", "canary", "drained"]
    assert found.pick_backend(lambda: 0.0) == Backend(
        "shop", "stable", 80, 90, "stable.shop.svc.cluster.local"
    )
    edges = [found.pick_backend(fixed(r)) for r in (0.8999, 0.9, 0.999999)]
    assert [b.name if b else None for b in edges] == ["stable", "canary", "canary"]


def test_no_backend_when_all_weights_are_zero_or_none_are_listed() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    "{matches: [{path: {value: /zero}}], backendRefs: [{name: a, port: 80,"
                    " weight: 0}]}",
                    "{matches: [{path: {value: /none}}]}",
                )
            )
        )
    )
    assert matched(routes, request("/zero")).pick_backend() is None
    assert matched(routes, request("/none")).pick_backend() is None


def test_an_invalid_backend_keeps_its_share_of_traffic() -> None:
    table = build(
        route(
            rules(
                "{backendRefs: [{name: good, port: 80},"
                " {group: multicluster.x-k8s.io, kind: ServiceImport, name: remote, port: 80}]}"
            )
        )
    )
    assert any("ServiceImport" in p for p in table.problems)
    found = matched(reviews(table), request())
    assert [b.name for b in found.rule.backends] == ["good"]
    rng = random.Random(99)
    misses = sum(found.pick_backend(rng.random) is None for _ in range(10_000))
    assert 4_800 <= misses <= 5_200


def test_backend_replace_prefix_match_without_a_prefix_rule_is_invalid() -> None:
    table = build(
        route(
            rules(
                "{matches: [{path: {type: Exact, value: /a}}], backendRefs: ["
                "{name: rewritten, port: 80, filters: [{type: URLRewrite, urlRewrite: {path:"
                " {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]}"
            )
        )
    )
    assert any("ReplacePrefixMatch" in p for p in table.problems)
    found = matched(reviews(table), request("/a"))
    assert found.rule.backends == ()
    assert found.pick_backend(lambda: 0.0) is None


# --------------------------------------------------------------------------- timeouts, retries


@pytest.mark.parametrize(
    ("timeouts", "expected"),
    [
        ("{request: 10s}", Timeouts(10.0, None)),
        ("{request: 1m30s, backendRequest: 500ms}", Timeouts(90.0, 0.5)),
        ("{request: 0s, backendRequest: 2s}", Timeouts(None, 2.0)),
        ("{backendRequest: 0s}", Timeouts(None, None)),
    ],
)
def test_timeouts(timeouts: str, expected: Timeouts) -> None:
    routes = reviews(build(route(rules(f"{{timeouts: {timeouts}}}"))))
    assert matched(routes, request()).rule.timeouts == expected


def test_no_timeouts_and_no_retry_by_default() -> None:
    rule = matched(reviews(build(route(rules("{}")))), request()).rule
    assert rule.timeouts is NO_TIMEOUTS
    assert rule.retry is None


def test_retry_policy_from_the_route() -> None:
    routes = reviews(
        build(
            route(
                rules(
                    "{matches: [{path: {value: /set}}],"
                    " retry: {codes: [502, 503], attempts: 3, backoff: 100ms}}",
                    "{matches: [{path: {value: /defaults}}], retry: {}}",
                    "{matches: [{path: {value: /off}}], retry: {attempts: 0, codes: [503]}}",
                )
            )
        )
    )
    assert matched(routes, request("/set")).rule.retry == RetryPolicy(3, frozenset({502, 503}), 0.1)
    assert matched(routes, request("/defaults")).rule.retry == RetryPolicy(2, frozenset(), 0.025)
    off = matched(routes, request("/off")).rule.retry
    assert off is not None
    assert not off.should_retry("GET", 503, 1)
    assert not off.should_retry("POST", None, 1, body_sent=False)


@pytest.mark.parametrize(
    ("method", "status", "attempt", "body_sent", "expected"),
    [
        ("GET", 503, 1, True, True),
        ("GET", 503, 2, True, True),
        ("GET", 503, 3, True, False),  # two retries already made
        ("GET", 500, 1, True, False),  # not a listed code
        ("POST", 503, 1, True, False),  # the upstream answered: POST may have acted
        ("PATCH", 503, 1, True, False),
        ("PUT", 503, 1, True, True),
        ("DELETE", 503, 1, True, True),
        ("HEAD", 503, 1, True, True),
        ("POST", None, 1, False, True),  # never reached the upstream: safe for any method
        ("POST", None, 1, True, False),  # reset after sending: maybe processed
        ("GET", None, 1, True, True),
        ("GET", None, 0, False, False),
    ],
)
def test_should_retry(
    method: str, status: int | None, attempt: int, body_sent: bool, expected: bool
) -> None:
    policy = RetryPolicy(2, frozenset({502, 503}), 0.025)
    assert policy.should_retry(method, status, attempt, body_sent=body_sent) is expected


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(10, frozenset({503}), 0.1)
    no_jitter = [policy.backoff_for(n, lambda: 0.0) for n in range(1, 7)]
    assert no_jitter == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.backoff_for(1, lambda: 1.0) == pytest.approx(0.15)
    assert policy.backoff_for(9, lambda: 1.0) == pytest.approx(1.0)


# --------------------------------------------------------------------------- GRPCRoute


def grpc_route(rules_yaml: str, name: str = "g", parent: str = PARENT) -> str:
    return route(
        f"{parent}\nrules:\n{textwrap.indent(rules_yaml, '  ')}", name=name, kind="GRPCRoute"
    )


def grpc_request(path: str, headers: list[tuple[str, str]] | None = None) -> Request:
    req = request(path, "POST", [("content-type", "application/grpc"), *(headers or [])])
    req.protocol = "HTTP/2"
    return req


def test_grpc_method_matching_and_precedence() -> None:
    table = build(
        grpc_route(
            """
            - backendRefs: [{name: catch-all, port: 80}]
            - matches: [{method: {service: shop.Cart}}]
              backendRefs: [{name: cart, port: 80}]
            - matches: [{method: {service: shop.Cart, method: Checkout}}]
              backendRefs: [{name: checkout, port: 80}]
            - matches: [{method: {method: Health}}]
              backendRefs: [{name: health, port: 80}]
            - matches: [{method: {type: RegularExpression, service: 'shop\\.v[0-9]+\\..*'}}]
              backendRefs: [{name: versioned, port: 80}]
            - matches: [{method: {service: shop.Cart}, headers: [{name: x-canary, value: 'on'}]}]
              backendRefs: [{name: cart-canary, port: 80}]
            """
        )
    )
    routes = reviews(table)
    assert routes.kind == "GRPCRoute"
    assert backend_of(routes, grpc_request("/shop.Cart/Checkout")) == "checkout"
    assert backend_of(routes, grpc_request("/shop.Cart/Add")) == "cart"
    assert backend_of(routes, grpc_request("/shop.Cart/Add", [("x-canary", "on")])) == "cart-canary"
    assert backend_of(routes, grpc_request("/any.Service/Health")) == "health"
    assert backend_of(routes, grpc_request("/shop.v2.Orders/List")) == "versioned"
    assert backend_of(routes, grpc_request("/shop.Orders/List")) == "catch-all"
    found = matched(routes, grpc_request("/shop.Cart/Add"))
    assert found.rule.grpc
    assert found.rule.retry is None and found.rule.timeouts is NO_TIMEOUTS


def test_grpc_method_match_needs_a_grpc_path() -> None:
    routes = reviews(
        build(
            grpc_route(
                """
                - matches: [{method: {service: shop.Cart}}]
                  backendRefs: [{name: cart, port: 80}]
                """
            )
        )
    )
    assert routes.match(grpc_request("/shop.Cart")) is None
    assert routes.match(grpc_request("/shop.Cart/Add/extra")) is None
    assert routes.match(request("/index.html")) is None


def test_grpc_route_wins_over_http_route_on_the_same_port() -> None:
    table = build(
        route(rules("{backendRefs: [{name: http-backend, port: 80}]}"), name="web"),
        grpc_route(
            "- backendRefs: [{name: grpc-backend, port: 80}]\n",
            parent="parentRefs: [{kind: Service, group: '', name: reviews, port: 9080}]",
        ),
        route(
            """
            parentRefs: [{kind: Service, group: '', name: reviews, port: 8080}]
            rules: [{backendRefs: [{name: http-only, port: 80}]}]
            """,
            name="admin",
        ),
    )
    on_9080 = reviews(table, 9080)
    assert (on_9080.kind, on_9080.routes) == ("GRPCRoute", ("shop/g",))
    assert backend_of(on_9080, request("/page")) == "grpc-backend"
    on_8080 = reviews(table, 8080)
    assert (on_8080.kind, on_8080.routes) == ("HTTPRoute", ("shop/admin",))


def test_grpc_request_header_modifier() -> None:
    routes = reviews(
        build(
            grpc_route(
                """
                - filters: [{type: RequestHeaderModifier,
                             requestHeaderModifier: {add: [{name: x-via, value: waypoint}]}}]
                  backendRefs: [{name: cart, port: 80}]
                """
            )
        )
    )
    req = grpc_request("/shop.Cart/Add")
    assert matched(routes, req).apply_request_filters(req) is None
    assert ("x-via", "waypoint") in req.headers


def test_which_matches_need_no_look_at_the_request_and_which_chains_can_act() -> None:
    """A rule matching everything is taken without reading the request, and a filter chain
    that cannot act (0 % mirror, a fault that never fires) is skipped by the proxy: both are
    worked out when routes are built, and must be right."""
    table = build(
        route(
            f"""
            {PARENT}
            rules:
            - matches: [{{path: {{type: PathPrefix, value: /}}}}]
              filters:
              - type: RequestMirror
                requestMirror: {{backendRef: {{name: ratings, port: 9080}}, percent: 0}}
              backendRefs: [{{name: reviews, port: 9080}}]
            """,
            name="quiet",
        ),
        route(
            f"""
            {PARENT}
            rules:
            - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
              filters:
              - type: RequestHeaderModifier
                requestHeaderModifier: {{set: [{{name: x-v, value: "2"}}]}}
              backendRefs: [{{name: reviews, port: 9080}}]
            - matches: [{{headers: [{{name: x-canary, value: "1"}}]}}]
              backendRefs:
              - name: reviews
                port: 9080
                filters:
                - type: RequestMirror
                  requestMirror: {{backendRef: {{name: ratings, port: 9080}}, percent: 5}}
            """,
            name="busy",
        ),
    )
    routes = reviews(table)
    by_path = {req: matched(routes, request(*req)) for req in [("/",), ("/v2/x",)]}
    canary = matched(routes, request("/", headers=[("x-canary", "1")]))
    assert by_path[("/",)].route == "shop/quiet" and by_path[("/",)].rule.filters.passive
    assert by_path[("/v2/x",)].route == "shop/busy"
    assert not by_path[("/v2/x",)].rule.filters.passive  # a header modifier acts
    assert canary.route == "shop/busy" and canary.rule.filters.passive
    backend = canary.pick_backend()
    assert backend is not None and not backend.filters.passive  # a 5 % mirror can fire
    kinds = sorted(matcher.always for matcher, _, _ in routes._entries)
    assert kinds == [False, False, True]  # only PathPrefix "/" with nothing else


def test_a_fault_that_can_fire_makes_a_chain_act() -> None:
    from meshway.waypoint.faults import Fault
    from meshway.waypoint.routing import FilterChain

    assert FilterChain(fault=Fault(delay=1.0, delay_fraction=0.0)).passive
    assert not FilterChain(fault=Fault(delay=1.0, delay_fraction=0.1)).passive
    assert not FilterChain(fault=Fault(abort_status=503, abort_fraction=0.3)).passive
