"""Fault injection at the waypoint, end to end with real traffic: an HTTPRoute's FaultInjection
filter aborting and delaying its share of requests, a gRPC abort, and an Istio VirtualService
with a `fault` and a route to a DestinationRule subset. Shares are checked against three standard
deviations of the binomial distribution; the access log must carry Envoy's DI/FI flags."""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from .meshcluster import Cluster, running_cluster
from .waypointkit import (
    APP,
    PY,
    access_log,
    apply_temporarily,
    http_service,
    shop_with_waypoint,
    workload,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]

MANIFEST = (
    shop_with_waypoint("client", "web", "greeter")
    + http_service("web", "app: web")
    + textwrap.dedent("""\
    apiVersion: v1
    kind: Service
    metadata: {name: greeter, namespace: shop}
    spec:
      selector: {app: greeter}
      ports: [{name: grpc, port: 50051, appProtocol: grpc}]
    ---
    """)
    + workload("client-0", "node-1", ["sleep", "infinity"])
    + workload("web-0", "node-2", [PY, APP, "http", "8080", "web-0"], ", version: v1")
    + workload("web-1", "node-2", [PY, APP, "http", "8080", "web-1"], ", version: v2")
    + workload("greeter-0", "node-2", [PY, APP, "grpc", "50051"])
)
WEB = "http://web.shop.svc.cluster.local"
GREETER = "greeter.shop.svc.cluster.local:50051"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("faults")
    with running_cluster(state, MANIFEST) as cluster:
        cluster.eventually(
            lambda: (
                {r["version"] for r in hits(cluster, f"{WEB}/warm", 20, 4)} == {"web-0", "web-1"}
            ),
            seconds=60,
        )
        cluster.eventually(
            lambda: grpc_says(cluster, 1) == [["OK", "hello mesh"]],
            seconds=60,
        )
        yield cluster


def hits(cluster: Cluster, url: str, total: int, concurrency: int) -> list[Any]:
    out = cluster.exec("shop/client-0", PY, APP, "hits", url, str(total), str(concurrency))
    results: list[Any] = json.loads(out)
    return results


def grpc_says(cluster: Cluster, total: int) -> list[list[str]]:
    out = cluster.exec("shop/client-0", PY, APP, "grpc-says", GREETER, str(total), check=False)
    try:
        results: list[list[str]] = json.loads(out)
    except ValueError:
        return []
    return results


def within_3_sigma(count: int, total: int, p: float) -> bool:
    return abs(count - total * p) <= 3 * math.sqrt(total * p * (1 - p))


def fault_injection(name: str, spec: str) -> str:
    return (
        "apiVersion: meshway.io/v1alpha1\nkind: FaultInjection\n"
        f"metadata: {{name: {name}, namespace: shop}}\nspec:\n"
        + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
        + "\n---\n"
    )


def web_route(fault: str, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {{name: web, namespace: shop}}
        spec:
          parentRefs: [{{kind: Service, group: "", name: web, port: 80}}]
          rules:
          - filters:
            - type: ExtensionRef
              extensionRef: {{group: meshway.io, kind: FaultInjection, name: {fault}}}
            backendRefs: [{{name: web, port: 80}}]
        """) + textwrap.indent(extra, "    ")


def entries(cluster: Cluster, path: str, total: int) -> list[dict[str, Any]]:
    """The access-log entries of the `total` requests to `path`, once all are written."""
    found: list[dict[str, Any]] = cluster.eventually(
        lambda: (
            got
            if len(got := [e for e in access_log(cluster) if e.get("path") == path]) >= total
            else None
        ),
        seconds=10,
    )
    return found


def test_abort_share_through_an_http_route_filter(mesh: Cluster) -> None:
    config = fault_injection(
        "flaky", "abort: {httpStatus: 503, percentage: {value: 30}}"
    ) + web_route("flaky")
    total = 400
    with apply_temporarily(mesh, config):
        results = hits(mesh, f"{WEB}/abort", total, 8)
    aborted = [r for r in results if r["code"] == 503]
    assert len(aborted) + sum(r["code"] == 200 for r in results) == total, results[:5]
    assert within_3_sigma(len(aborted), total, 0.3), len(aborted)
    assert all(r["body"] == "fault filter abort" and r["version"] is None for r in aborted)
    log = entries(mesh, "/abort", total)
    flagged = [e for e in log if e["response_flags"] == "FI"]
    assert len(flagged) == len(aborted)
    assert all(e["response_code"] == 503 and e["upstream_host"] is None for e in flagged)
    assert all(e["response_flags"] == "-" for e in log if e["response_code"] == 200)


def test_delay_share_and_the_delay_is_not_in_the_route_timeout(mesh: Cluster) -> None:
    config = fault_injection(
        "slow", "delay: {fixedDelay: 200ms, percentage: {value: 50}}"
    ) + web_route("slow")
    total = 200
    with apply_temporarily(mesh, config):
        results = hits(mesh, f"{WEB}/delay", total, 8)
    assert all(r["code"] == 200 for r in results), [r for r in results if r["code"] != 200][:3]
    # 200 ms against a few ms without the delay: 120 ms lies well between the two.
    slow = sum(r["ms"] >= 120 for r in results)
    assert within_3_sigma(slow, total, 0.5), slow
    log = entries(mesh, "/delay", total)
    delayed = [e for e in log if e["response_flags"] == "DI"]
    assert all(e["duration_ms"] >= 199 for e in delayed)
    assert abs(len(delayed) - slow) <= 3, (len(delayed), slow)

    # Envoy's fault filter runs before the router: a 300 ms delay does not eat into a 250 ms
    # request timeout.
    config = fault_injection(
        "slow", "delay: {fixedDelay: 300ms, percentage: {value: 100}}"
    ) + web_route("slow", "timeouts: {request: 250ms}\n")
    with apply_temporarily(mesh, config):
        results = hits(mesh, f"{WEB}/delay-timeout", 10, 2)
    assert [r["code"] for r in results] == [200] * 10
    assert all(r["ms"] >= 290 for r in results)


def test_grpc_abort_returns_the_grpc_status(mesh: Cluster) -> None:
    config = fault_injection(
        "grpc-down", "abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}"
    ) + textwrap.dedent("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: GRPCRoute
        metadata: {name: greeter, namespace: shop}
        spec:
          parentRefs: [{kind: Service, group: "", name: greeter, port: 50051}]
          rules:
          - matches: [{method: {service: demo.Echo, method: Say}}]
            filters:
            - type: ExtensionRef
              extensionRef: {group: meshway.io, kind: FaultInjection, name: grpc-down}
            backendRefs: [{name: greeter, port: 50051}]
        """)
    with apply_temporarily(mesh, config):
        results = grpc_says(mesh, 10)
    assert results == [["UNAVAILABLE", "fault filter abort"]] * 10
    log = [e for e in access_log(mesh) if e.get("path") == "/demo.Echo/Say"]
    assert sum(e["response_flags"] == "FI" and e["protocol"] == "grpc" for e in log) >= 10
    assert grpc_says(mesh, 1) == [["OK", "hello mesh"]]  # the route and its fault are gone


def test_virtual_service_fault_and_subset_route(mesh: Cluster) -> None:
    config = textwrap.dedent("""\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: shop}
        spec:
          host: web
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: shop}
        spec:
          hosts: [web.shop.svc.cluster.local]
          http:
          - name: canary
            match: [{uri: {prefix: /v2}}]
            fault:
              abort: {httpStatus: 418, percentage: {value: 50}}
            route: [{destination: {host: web, subset: v2}}]
          - route: [{destination: {host: web, subset: v1}}]
        """)
    total = 200
    with apply_temporarily(mesh, config):
        canary = hits(mesh, f"{WEB}/v2/items", total, 8)
        stable = hits(mesh, f"{WEB}/other", 40, 4)
    teapots = [r for r in canary if r["code"] == 418]
    assert within_3_sigma(len(teapots), total, 0.5), len(teapots)
    assert {r["version"] for r in canary if r["code"] != 418} == {"web-1"}  # subset v2 only
    assert all(r["code"] == 200 for r in canary if r["code"] != 418)
    assert {(r["code"], r["version"]) for r in stable} == {(200, "web-0")}  # subset v1
    log = entries(mesh, "/v2/items", total)
    assert sum(e["response_flags"] == "FI" for e in log) == len(teapots)
    assert {e["route_name"] for e in log} == {"shop/web"}
