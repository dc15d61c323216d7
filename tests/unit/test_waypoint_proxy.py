"""The waypoint's data path without processes: which tunnels it accepts, how it picks
endpoints and what it logs."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import uuid

import pytest

from meshway.api.v1 import address_pb2
from meshway.identity.spiffe import SpiffeId
from meshway.node.state import ProxyState
from meshway.telemetry.metrics import WaypointMetrics
from meshway.waypoint.messages import Request
from meshway.waypoint.proxy import (
    AccessLog,
    Target,
    WaypointDataPath,
    request_id,
    upstream_http2,
)
from meshway.waypoint.traffic import HashKey
from meshway.waypoint.upstream import UpstreamPool
from meshway.xds.client import Update
from meshway.xds.types import ADDRESS_TYPE

pytestmark = pytest.mark.unit

WAYPOINT = "shop/waypoint.shop.svc.cluster.local"


def _ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _service(name: str, vip: str, waypoint: str | None) -> address_pb2.Address:
    svc = address_pb2.Service(
        name=name,
        namespace="shop",
        hostname=f"{name}.shop.svc.cluster.local",
        addresses=[address_pb2.NetworkAddress(address=_ip(vip))],
        ports=[address_pb2.ServicePort(service_port=80, target_port=8080, app_protocol="http")],
    )
    if waypoint:
        svc.waypoint.service = waypoint
    return address_pb2.Address(service=svc)


def _workload(name: str, ip: str, service: str) -> address_pb2.Address:
    wl = address_pb2.Workload(
        uid=f"shop/{name}",
        name=name,
        namespace="shop",
        addresses=[_ip(ip)],
        service_account=name,
        trust_domain="cluster.local",
        tunnel_protocol=address_pb2.HBONE,
    )
    wl.services[f"shop/{service}.shop.svc.cluster.local"].ports.append(
        address_pb2.PortMapping(service_port=80, target_port=8080)
    )
    return address_pb2.Address(workload=wl)


def datapath() -> WaypointDataPath:
    state = ProxyState("node-1")
    resources = {
        "shop/web.shop.svc.cluster.local": _service("web", "10.96.0.10", WAYPOINT),
        "shop/db.shop.svc.cluster.local": _service("db", "10.96.0.11", None),
        "shop/api.shop.svc.cluster.local": _service("api", "10.96.0.12", "shop/other.shop.svc.x"),
        "shop/web-1": _workload("web-1", "10.244.1.2", "web"),
        "shop/web-2": _workload("web-2", "10.244.1.3", "web"),
    }
    state.apply(Update(ADDRESS_TYPE, "1", resources, frozenset()))

    async def never(_: object) -> object:
        raise AssertionError("no upstream in these tests")

    return WaypointDataPath(
        ("shop", "waypoint"),
        WAYPOINT,
        state,
        WaypointMetrics(),
        UpstreamPool(never),  # type: ignore[arg-type]
    )


def test_only_destinations_that_use_this_waypoint_are_accepted() -> None:
    dp = datapath()
    web = dp.destination("10.96.0.10", 80)
    assert web is not None and web.service is not None and web.app_protocol == "http"
    assert dp.destination("10.96.0.11", 80) is None  # no waypoint: not ours to serve
    assert dp.destination("10.96.0.12", 80) is None  # another waypoint's
    assert dp.destination("10.96.0.10", 81) is None  # not a port of the service
    assert dp.destination("10.244.1.2", 8080) is None  # the workload does not use it
    assert dp.destination("192.0.2.1", 80) is None  # unknown: never an open relay


def test_endpoints_are_picked_on_target_ports() -> None:
    dp = datapath()
    web = dp.destination("10.96.0.10", 80)
    assert web is not None
    key = HashKey(None, "10.244.0.9")
    picked = [dp.pick_endpoint(Target(web.service, None, 80), key) for _ in range(50)]
    assert {(e.ip, e.port) for e in picked if e} == {("10.244.1.2", 8080), ("10.244.1.3", 8080)}
    assert dp.pick_endpoint(Target(web.service, None, 443), key) is None
    # Without a DestinationRule: LEAST_REQUEST, Istio's default.
    dp.traffic.active[("10.244.1.2", 8080)] = 3
    picks = [dp.pick_endpoint(Target(web.service, None, 80), key) for _ in range(20)]
    assert {(e.ip, e.port) for e in picks if e} == {("10.244.1.3", 8080)}


def test_upstream_protocol_follows_the_port_then_the_client() -> None:
    h2 = Request("GET", "/", "a", protocol="HTTP/2")
    h1 = Request("GET", "/", "a")
    assert upstream_http2("grpc", h1) and not upstream_http2("http", h2)
    assert upstream_http2("", h2) and not upstream_http2("", h1)


def test_request_ids_are_version_4_uuids_and_differ() -> None:
    ids = {request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids)


async def test_access_log_batches_lines() -> None:
    out = io.StringIO()
    log = AccessLog(out)
    log.write(json.dumps({"a": 1}))
    log.write(json.dumps({"a": 2}))
    assert out.getvalue() == ""  # nothing written until the flush timer fires
    await asyncio.sleep(AccessLog.FLUSH_SECONDS * 2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert [json.loads(line.split("meshway.access: ", 1)[1])["a"] for line in lines] == [1, 2]


async def test_mirror_copies_only_whole_small_bodies_and_leaves_the_request_intact() -> None:
    from meshway.waypoint.messages import Body
    from meshway.waypoint.proxy import Downstream
    from meshway.waypoint.routing import Mirror

    dp = datapath()
    dest = dp.destination("10.96.0.10", 80)
    assert dest is not None
    down = Downstream(SpiffeId("cluster.local", "shop", "client"), "10.244.0.9", None, dest)
    mirror = (Mirror("shop", "db", 80, "db.shop.svc.cluster.local", 1.0),)

    def sent(outcome: str) -> float:
        return dp.metrics.mirrors.labels(outcome=outcome)._value.get()

    big = Body()
    big.put_nowait(b"x" * 100_000)
    big.end()
    request = Request("POST", "/", "web", [], big)
    await dp._mirror(down, request, mirror)
    assert request.body is big and big.buffered == 100_000  # not read: forwarded whole
    assert sent("body_not_copied") == 1

    streaming = Body()  # no length, still arriving: not waited for
    request = Request("POST", "/", "web", [], streaming)
    await dp._mirror(down, request, mirror)
    assert request.body is streaming and sent("body_not_copied") == 2

    request = Request("POST", "/", "web", [("x-a", "1")], Body.of(b"small"))
    await dp._mirror(down, request, mirror)
    assert await request.body.read_all() == b"small"  # the primary still has its body
    await asyncio.sleep(0.05)
    assert sent("no_endpoint") == 1  # the copy went its own way (db has no endpoint here)


async def test_a_tunnels_requests_follow_each_configuration_change() -> None:
    """A tunnel keeps what applies to its requests (its Plan) between requests; a new route
    table, state or tracer must reach the requests that follow on the same tunnel."""
    import yaml

    from meshway.config.model import HTTPRoute
    from meshway.waypoint.messages import Body, Response
    from meshway.waypoint.proxy import Downstream
    from meshway.waypoint.routing import RouteTable

    dp = datapath()

    async def upstream(*_: object) -> Response:
        return Response(200, [], Body.of(b"ok"))

    dp.upstream.request = upstream  # type: ignore[method-assign]
    dp.access_log_enabled = False
    dest = dp.destination("10.96.0.10", 80)
    assert dest is not None
    down = Downstream(SpiffeId("cluster.local", "shop", "client"), "10.244.0.9", None, dest)

    async def status() -> int:
        response = await dp.serve(down, Request("GET", "/", "web", [], Body.of(b"")))
        await response.body.read_all()
        return response.status

    assert await status() == 200
    only_api = HTTPRoute.model_validate(
        yaml.safe_load(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
            "metadata: {name: web, namespace: shop}\n"
            "spec:\n  parentRefs: [{group: '', kind: Service, name: web, port: 80}]\n"
            "  rules: [{matches: [{path: {type: PathPrefix, value: /api}}],"
            " backendRefs: [{name: web, port: 80}]}]"
        )
    )
    dp.update(routes=RouteTable.build([only_api], "cluster.local"))
    assert await status() == 404  # the same tunnel sees the new route table
    dp.update(routes=RouteTable.build([], "cluster.local"))
    assert await status() == 200

    started: list[object] = []

    class Tracer:
        def destination(self, _: object) -> str:
            return "traced"

        def start(self, _down: object, _request: object, traced: object) -> None:
            started.append(traced)

    dp.tracer = Tracer()  # type: ignore[assignment]
    assert await status() == 200 and started == ["traced"]
    dp.tracer = None
    assert await status() == 200 and started == ["traced"]
