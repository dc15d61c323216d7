"""Request tracing at the waypoint, end to end: a Telemetry and a MeshConfig applied, an OTLP
receiver running as a pod, a client sending W3C and B3 contexts; the receiver gets the
waypoint's spans with the right parents, and the backend the waypoint's span as its parent."""

from __future__ import annotations

import json
import os
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .meshcluster import Cluster, running_cluster
from .waypointkit import (
    APP,
    PY,
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

RECEIVER = str(Path(__file__).parent / "apps" / "otlp_receiver.py")
WEB = "http://web.shop.svc.cluster.local"

# The receiver lives outside the mesh, in its own namespace, as a collector usually does.
OBSERVABILITY = textwrap.dedent(f"""\
    apiVersion: v1
    kind: Namespace
    metadata: {{name: observability}}
    ---
    apiVersion: v1
    kind: Namespace
    metadata: {{name: istio-system}}
    ---
    apiVersion: v1
    kind: ServiceAccount
    metadata: {{name: collector, namespace: observability}}
    ---
    apiVersion: v1
    kind: Service
    metadata: {{name: collector, namespace: observability}}
    spec:
      selector: {{app: collector}}
      ports: [{{name: otlp-http, port: 4318, targetPort: 4318, appProtocol: http}}]
    ---
    apiVersion: meshway.io/v1alpha1
    kind: Workload
    metadata: {{name: collector-0, namespace: observability, labels: {{app: collector}}}}
    spec:
      serviceAccountName: collector
      nodeName: node-1
      command: {json.dumps([PY, RECEIVER, "4318"])}
    ---
    """)

TRACING = textwrap.dedent("""\
    apiVersion: meshway.io/v1alpha1
    kind: MeshConfig
    metadata: {name: mesh}
    spec:
      extensionProviders:
      - name: otel
        opentelemetry:
          service: collector.observability.svc.cluster.local
          port: 4318
          http: {path: /v1/traces, timeout: 5s}
    ---
    apiVersion: telemetry.istio.io/v1
    kind: Telemetry
    metadata: {name: mesh-default, namespace: istio-system}
    spec:
      tracing:
      - providers: [{name: otel}]
        randomSamplingPercentage: 100
    ---
    """)

MANIFEST = (
    shop_with_waypoint("client", "web")
    + http_service("web", "app: web")
    + workload("client-0", "node-1", ["sleep", "infinity"])
    + workload("web-0", "node-2", [PY, APP, "http", "8080", "web-0"])
    + OBSERVABILITY
    + TRACING
)


def spans(cluster: Cluster) -> list[dict[str, Any]]:
    out = cluster.exec(
        "observability/collector-0",
        "curl",
        "-s",
        "--max-time",
        "5",
        "http://127.0.0.1:4318/spans",
        check=False,
    )
    try:
        found: list[dict[str, Any]] = json.loads(out)
    except ValueError:
        return []
    return found


def span_of(cluster: Cluster, trace_id: str) -> dict[str, Any]:
    """The waypoint's span in trace `trace_id`, waiting for its batch (1 s) to arrive."""
    found: dict[str, Any] = cluster.eventually(
        lambda: next((s for s in spans(cluster) if s["trace_id"] == trace_id), None),
        seconds=20,
    )
    return found


def new_ids() -> tuple[str, str]:
    return uuid.uuid4().hex, uuid.uuid4().hex[:16]


def echoed(response: dict[str, Any]) -> dict[str, str]:
    """The request headers the backend received (l7app echoes them)."""
    assert response["code"] == 200, response
    headers: dict[str, str] = json.loads(response["body"])["headers"]
    return headers


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("tracing")
    with running_cluster(state, MANIFEST) as cluster:
        cluster.eventually(lambda: "serving HBONE" in waypoint_log(cluster), seconds=40)
        cluster.eventually(lambda: curl(cluster, f"{WEB}/").get("code") == 200, seconds=30)
        cluster.eventually(lambda: "exports to http://" in waypoint_log(cluster), seconds=20)
        yield cluster


def test_w3c_parent_and_child_links(mesh: Cluster) -> None:
    trace, parent = new_ids()
    response = curl(
        mesh,
        f"{WEB}/w3c?x=1",
        "-H",
        f"traceparent: 00-{trace}-{parent}-01",
        "-H",
        "tracestate: client=1",
        "-H",
        "baggage: user=alice",
    )
    upstream = echoed(response)
    span = span_of(mesh, trace)
    # The waypoint's span is the client's child...
    assert span["parent_span_id"] == parent
    assert span["kind"] == 2  # SPAN_KIND_SERVER
    assert span["name"] == "web.shop.svc.cluster.local:80/*"
    attrs = span["attributes"]
    assert attrs["http.method"] == "GET" and attrs["http.status_code"] == "200"
    assert attrs["http.url"] == "http://web.shop.svc.cluster.local/w3c?x=1"
    assert attrs["upstream_cluster"] == "web.shop.svc.cluster.local"
    assert attrs["source_principal"] == "spiffe://cluster.local/ns/shop/sa/client"
    assert attrs["destination_principal"] == "spiffe://cluster.local/ns/shop/sa/web"
    assert attrs["guid:x-request-id"] == upstream["x-request-id"]
    assert span["resource"]["service.name"] == "waypoint.shop"
    # ...and the backend's parent.
    assert upstream["traceparent"] == f"00-{trace}-{span['span_id']}-01"
    assert upstream["tracestate"] == "client=1" and upstream["baggage"] == "user=alice"
    # The access log names the same trace.
    entry = logged(mesh, lambda e: e.get("path") == "/w3c?x=1")
    assert entry["trace_id"] == trace


def test_b3_parent_and_child_links(mesh: Cluster) -> None:
    trace, parent = new_ids()
    upstream = echoed(
        curl(
            mesh,
            f"{WEB}/b3",
            "-H",
            f"x-b3-traceid: {trace}",
            "-H",
            f"x-b3-spanid: {parent}",
            "-H",
            "x-b3-sampled: 1",
        )
    )
    span = span_of(mesh, trace)
    assert span["parent_span_id"] == parent
    assert upstream["x-b3-traceid"] == trace
    assert upstream["x-b3-spanid"] == span["span_id"]
    assert upstream["x-b3-parentspanid"] == parent
    assert upstream["traceparent"] == f"00-{trace}-{span['span_id']}-01"

    trace, parent = new_ids()  # the single-header form
    upstream = echoed(curl(mesh, f"{WEB}/b3-single", "-H", f"b3: {trace}-{parent}-1"))
    span = span_of(mesh, trace)
    assert span["parent_span_id"] == parent
    assert upstream["b3"] == f"{trace}-{span['span_id']}-1-{parent}"


def test_unsampled_parent_produces_no_span(mesh: Cluster) -> None:
    unsampled, parent = new_ids()
    upstream = echoed(curl(mesh, f"{WEB}/quiet", "-H", f"traceparent: 00-{unsampled}-{parent}-00"))
    assert upstream["traceparent"] == f"00-{unsampled}-{parent}-00"  # passed through as is
    # A sampled request sent after it: once its span is in, the unsampled one would be too.
    sampled, parent = new_ids()
    echoed(curl(mesh, f"{WEB}/loud", "-H", f"traceparent: 00-{sampled}-{parent}-01"))
    span_of(mesh, sampled)
    assert not [s for s in spans(mesh) if s["trace_id"] == unsampled]


def test_requests_without_context_start_traces_at_the_waypoint(mesh: Cluster) -> None:
    upstream = echoed(curl(mesh, f"{WEB}/root"))
    version, trace, span_id, flags = upstream["traceparent"].split("-")
    assert version == "00" and flags == "01"  # 100 % sampling
    span = span_of(mesh, trace)
    assert span["span_id"] == span_id and span["parent_span_id"] == ""


def service_telemetry(spec: str) -> str:
    return (
        textwrap.dedent("""\
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata: {name: web, namespace: shop}
        spec:
          targetRefs: [{group: "", kind: Service, name: web}]
        """)
        + textwrap.indent(textwrap.dedent(spec), "  ")
        + "---\n"
    )


def test_a_service_telemetry_overrides_the_mesh_one_live(mesh: Cluster) -> None:
    """targetRefs to the Service: spans stop (propagation goes on), then come back when the
    Telemetry is deleted, without restarting anything."""
    quiet = service_telemetry("tracing: [{disableSpanReporting: true}]\n")
    with apply_temporarily(mesh, quiet):
        trace, parent = new_ids()
        upstream = echoed(curl(mesh, f"{WEB}/off", "-H", f"traceparent: 00-{trace}-{parent}-01"))
        _, same_trace, own_span, flags = upstream["traceparent"].split("-")
        # Still sampled and still the waypoint's own span id for the backend, but no export.
        assert same_trace == trace and own_span != parent and flags == "01"
    after, parent = new_ids()
    echoed(curl(mesh, f"{WEB}/on", "-H", f"traceparent: 00-{after}-{parent}-01"))
    span_of(mesh, after)  # back after the deletion; the earlier span would be in by now
    assert not [s for s in spans(mesh) if s["trace_id"] == trace]


def test_random_sampling_percentage_of_real_traffic(mesh: Cluster) -> None:
    """randomSamplingPercentage 25 on requests without a context: about 50 of 200 traced."""
    with apply_temporarily(mesh, service_telemetry("tracing: [{randomSamplingPercentage: 25}]\n")):
        before = {s["trace_id"] for s in spans(mesh)}
        out = mesh.exec("shop/client-0", PY, APP, "hits", f"{WEB}/sampled", "200", "4")
        assert [r["code"] for r in json.loads(out)] == [200] * 200
        marker, parent = new_ids()  # sent last, sampled by its parent: the batch has arrived
        echoed(curl(mesh, f"{WEB}/marker", "-H", f"traceparent: 00-{marker}-{parent}-01"))
        span_of(mesh, marker)
    new = [
        s
        for s in spans(mesh)
        if s["trace_id"] not in before and s["attributes"].get("http.url", "").endswith("/sampled")
    ]
    print(f"randomSamplingPercentage 25: {len(new)} of 200 requests traced")
    # Binomial(200, 0.25): mean 50, standard deviation 6.1; 4 sigma either way.
    assert 25 <= len(new) <= 75, len(new)
    assert all(s["parent_span_id"] == "" for s in new)
