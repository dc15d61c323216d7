"""The waypoint, end to end in the local runtime: real clients (curl over HTTP/1.1 and HTTP/2,
a grpcio client, an aiohttp WebSocket client) in one pod, real servers (aiohttp, grpcio, a TCP
echo) in others, node proxies on two nodes and a waypoint deployed from a Gateway.

One cluster for the module. Each test applies what it needs and removes it afterwards.
"""

from __future__ import annotations

import collections
import json
import os
import textwrap
import time
from collections.abc import Iterator

import pytest

from .meshcluster import ECHO_SERVER, Cluster, running_cluster
from .waypointkit import (
    APP,
    PY,
    access_log,
    apply_temporarily,
    curl,
    http_service,
    logged,
    shop_with_waypoint,
    waypoint_log,
    workload,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]


MANIFEST = (
    shop_with_waypoint("client", "web", "greeter", "echo")
    + http_service("web", "app: web")
    + http_service("web-v1", "app: web, version: v1")
    + http_service("web-v2", "app: web, version: v2")
    + textwrap.dedent("""\
    apiVersion: v1
    kind: Service
    metadata: {name: greeter, namespace: shop}
    spec:
      selector: {app: greeter}
      ports: [{name: grpc, port: 50051, appProtocol: grpc}]
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: echo, namespace: shop}
    spec:
      selector: {app: echo}
      ports: [{port: 9000}]
    ---
    """)
    + workload("client-0", "node-1", ["sleep", "infinity"])
    + workload("web-v1", "node-2", [PY, APP, "http", "8080", "v1"], ", version: v1")
    + workload("web-v2", "node-2", [PY, APP, "http", "8080", "v2"], ", version: v2")
    + workload("greeter-0", "node-2", [PY, APP, "grpc", "50051"])
    + workload("echo-0", "node-2", ["python3", "-c", ECHO_SERVER])
)

CLIENT = "spiffe://cluster.local/ns/shop/sa/client"
WEB = "http://web.shop.svc.cluster.local"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("waypoint")
    with running_cluster(state, MANIFEST) as cluster:
        cluster.eventually(lambda: "serving HBONE" in waypoint_log(cluster), seconds=40)
        cluster.eventually(lambda: curl(cluster, f"{WEB}/").get("code") == 200, seconds=30)
        yield cluster


def test_http_goes_through_the_waypoint_with_the_client_identity(mesh: Cluster) -> None:
    before = len(access_log(mesh))
    reply = curl(mesh, f"{WEB}/hello?x=1")
    assert reply["code"] == 200, reply
    seen = json.loads(reply["body"])
    assert seen["path"] == "/hello?x=1" and seen["http_version"] == "1.1"
    assert "x-request-id" in seen["headers"]
    entry = logged(mesh, lambda e: e.get("path") == "/hello?x=1", before)
    assert entry["source_principal"] == CLIENT
    assert entry["response_code"] == 200 and entry["method"] == "GET"
    assert entry["destination_principal"] == "spiffe://cluster.local/ns/shop/sa/web"
    assert entry["upstream_host"].endswith(":8080") and entry["response_flags"] == "-"


def test_http2_prior_knowledge_is_served_and_sent_on_as_http1(mesh: Cluster) -> None:
    reply = curl(mesh, f"{WEB}/h2", "--http2-prior-knowledge")
    assert reply["code"] == 200, reply
    assert json.loads(reply["body"])["http_version"] == "1.1"  # the port says appProtocol: http


def test_canary_split_90_10_over_500_requests(mesh: Cluster) -> None:
    route = textwrap.dedent("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: web-split, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
          rules:
          - backendRefs:
            - {name: web-v1, port: 80, weight: 90}
            - {name: web-v2, port: 80, weight: 10}
        """)
    with apply_temporarily(mesh, route):
        out = mesh.exec(
            "shop/client-0", "curl", "-s", "-w", "\\n", "--max-time", "60", f"{WEB}/split/[1-500]"
        )
    versions = collections.Counter(json.loads(line)["version"] for line in out.splitlines())
    assert sum(versions.values()) == 500
    share = versions["v2"] / 500
    # 10 % expected; the binomial standard deviation over 500 draws is 1.3 %: ±4 % is 3 sigma.
    assert 0.06 <= share <= 0.14, versions


def test_header_match_routes_to_a_version(mesh: Cluster) -> None:
    route = textwrap.dedent("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: web-headers, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web}]
          rules:
          - matches: [{headers: [{name: x-canary, value: "yes"}]}]
            backendRefs: [{name: web-v2, port: 80}]
            filters:
            - type: ResponseHeaderModifier
              responseHeaderModifier: {add: [{name: x-routed, value: canary}]}
          - matches: [{path: {type: PathPrefix, value: /old}}]
            filters:
            - type: RequestRedirect
              requestRedirect:
                path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
                statusCode: 301
          - backendRefs: [{name: web-v1, port: 80}]
            filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: x-from-route, value: stable}]}
        """)
    with apply_temporarily(mesh, route):
        for _ in range(5):
            canary = curl(mesh, f"{WEB}/", "-H", "x-canary: yes")
            assert canary["code"] == 200 and json.loads(canary["body"])["version"] == "v2"
            assert canary["headers"].get("x-routed") == "canary"
            stable = curl(mesh, f"{WEB}/")
            assert json.loads(stable["body"])["version"] == "v1"
            assert json.loads(stable["body"])["headers"]["x-from-route"] == "stable"
        moved = curl(mesh, f"{WEB}/old/page")
        assert moved["code"] == 301
        assert moved["headers"]["location"].endswith("/new/page")


def test_request_timeout_against_a_slow_backend(mesh: Cluster) -> None:
    route = textwrap.dedent("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: web-timeout, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web}]
          rules:
          - matches: [{path: {type: Exact, value: /slow}}]
            timeouts: {request: 500ms}
            backendRefs: [{name: web, port: 80}]
        """)
    with apply_temporarily(mesh, route):
        started = time.monotonic()
        reply = curl(mesh, f"{WEB}/slow")
        elapsed = time.monotonic() - started
    assert reply["code"] == 504, reply
    assert "upstream request timeout" in reply["body"]
    assert elapsed < 2.0  # the backend takes 2 s; the route gave up at 0.5 s
    entry = logged(mesh, lambda e: e.get("path") == "/slow")
    assert entry["response_flags"] == "UT"


def test_retries_on_a_failing_backend_only_for_idempotent_requests(mesh: Cluster) -> None:
    route = textwrap.dedent("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: web-retry, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web}]
          rules:
          - matches: [{path: {type: PathPrefix, value: /flaky}}]
            retry: {codes: [503], attempts: 3, backoff: 10ms}
            backendRefs: [{name: web-v1, port: 80}]
          - matches: [{path: {type: PathPrefix, value: /upload}}]
            retry: {codes: [503], attempts: 3, backoff: 10ms}
            backendRefs: [{name: web-v1, port: 80}]
        """)
    upload = mesh.state / "upload.bin"
    upload.write_bytes(os.urandom(300 * 1024))
    with apply_temporarily(mesh, route):
        ok = curl(mesh, f"{WEB}/flaky/get-{time.time_ns()}")
        posted = curl(mesh, f"{WEB}/flaky/post-{time.time_ns()}", "-X", "POST", "-d", "x")
        # A chunked body larger than what retries keep is streamed through whole, not retried.
        chunked = curl(
            mesh, f"{WEB}/upload", "-H", "Transfer-Encoding: chunked",
            "--data-binary", f"@{upload}",
        )  # fmt: skip
    assert chunked["code"] == 200 and json.loads(chunked["body"])["body_bytes"] == 300 * 1024
    assert ok["code"] == 200 and "ok after 3 tries" in ok["body"], ok
    assert posted["code"] == 503, posted  # POST is not idempotent: not retried
    entry = logged(mesh, lambda e: "/flaky/get-" in (e.get("path") or ""))
    assert entry["attempts"] == 3


def test_l7_authorization_by_method_and_path(mesh: Cluster) -> None:
    policy = textwrap.dedent("""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: web-l7, namespace: shop}
        spec:
          targetRefs: [{kind: Service, group: "", name: web}]
          action: ALLOW
          rules:
          - from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]
            to: [{operation: {methods: [GET], paths: ["/public/*", "/health"]}}]
        """)
    with apply_temporarily(mesh, policy):
        allowed = curl(mesh, f"{WEB}/public/page")
        wrong_method = curl(mesh, f"{WEB}/public/page", "-X", "POST", "-d", "x")
        wrong_path = curl(mesh, f"{WEB}/private")
    assert allowed["code"] == 200, allowed
    assert wrong_method["code"] == 403 and wrong_method["body"] == "RBAC: access denied"
    assert wrong_path["code"] == 403
    assert curl(mesh, f"{WEB}/private")["code"] == 200  # policy removed


def test_grpc_unary_streaming_and_status(mesh: Cluster) -> None:
    out = mesh.exec("shop/client-0", PY, APP, "grpc-client", "greeter.shop.svc.cluster.local:50051")
    result = json.loads(out)
    assert result["say"] == "hello mesh"
    assert result["count"] == ["0", "1", "2", "3"]
    assert result["fail"] == ["NOT_FOUND", "no such thing"]
    assert logged(mesh, lambda e: e.get("path") == "/demo.Echo/Fail")["protocol"] == "grpc"


def test_websocket_passes_through(mesh: Cluster) -> None:
    out = mesh.exec("shop/client-0", PY, APP, "ws-client", f"{WEB}/ws")
    replies = json.loads(out)
    assert len(replies) == 3 and replies[0].endswith(":one") and replies[2].endswith(":three")


def test_opaque_tcp_through_the_waypoint(mesh: Cluster) -> None:
    before = len(access_log(mesh))
    out = mesh.exec(
        "shop/client-0", "python3", "-c",
        "import socket; s = socket.create_connection(('echo.shop.svc.cluster.local', 9000), 5);"
        " s.sendall(b'\\x00\\x01binary'); print(s.recv(100)); s.close()",
    )  # fmt: skip
    assert "binary" in out
    mesh.eventually(lambda: any(e.get("protocol") == "tcp" for e in access_log(mesh)[before:]))


def test_request_metrics_with_waypoint_reporter(mesh: Cluster) -> None:
    curl(mesh, f"{WEB}/metrics-probe")
    status = mesh.status()
    pods = status.get("pods") or {}
    ip = next(p["ip"] for key, p in pods.items() if key == "shop/waypoint")
    text = mesh.exec("shop/client-0", "curl", "-s", f"http://{ip}:15020/metrics")
    lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    assert any(
        'reporter="waypoint"' in ln
        and f'source_principal="{CLIENT}"' in ln
        and 'destination_service="web.shop.svc.cluster.local"' in ln
        and 'response_code="200"' in ln
        and 'request_protocol="http"' in ln
        for ln in lines
    ), lines[:5]
    assert "istio_request_duration_milliseconds_bucket{" in text
    assert "istio_request_bytes_bucket{" in text and "istio_response_bytes_bucket{" in text


def test_removing_the_waypoint_label_sends_traffic_direct(mesh: Cluster) -> None:
    namespace = textwrap.dedent("""\
        apiVersion: v1
        kind: Namespace
        metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
        """)
    restored = textwrap.dedent("""\
        apiVersion: v1
        kind: Namespace
        metadata:
          name: shop
          labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
        """)
    try:
        mesh.apply(namespace)
        time.sleep(1.0)
        before = len(access_log(mesh))
        reply = curl(mesh, f"{WEB}/direct")
        assert reply["code"] == 200
        time.sleep(0.5)  # longer than the access log's batching
        assert not [e for e in access_log(mesh)[before:] if e.get("path") == "/direct"]
    finally:
        mesh.apply(restored)
        time.sleep(1.0)
    reply = curl(mesh, f"{WEB}/again")
    assert reply["code"] == 200
    assert logged(mesh, lambda e: e.get("path") == "/again")


def test_selector_policies_stay_at_the_node_proxy_which_sees_the_waypoint(mesh: Cluster) -> None:
    """A `selector` policy is enforced by the destination's node proxy, and the identity it
    sees is the waypoint's, not the client's (BRIEF §3): allowing only the waypoint keeps the
    path open; allowing only the client closes it."""

    def selector_policy(principal: str) -> str:
        return textwrap.dedent(f"""\
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {{name: web-l4, namespace: shop}}
            spec:
              selector: {{matchLabels: {{app: web}}}}
              action: ALLOW
              rules: [{{from: [{{source: {{principals: ["{principal}"]}}}}]}}]
            """)

    with apply_temporarily(mesh, selector_policy("cluster.local/ns/shop/sa/waypoint")):
        assert curl(mesh, f"{WEB}/via-waypoint")["code"] == 200
    with apply_temporarily(mesh, selector_policy("cluster.local/ns/shop/sa/client")):
        refused = curl(mesh, f"{WEB}/l4-denied")
    assert refused["code"] == 503, refused
    entry = logged(mesh, lambda e: e.get("path") == "/l4-denied")
    assert entry["response_flags"] in ("UF", "URX")
    assert curl(mesh, f"{WEB}/after")["code"] == 200
