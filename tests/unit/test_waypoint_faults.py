"""Fault injection at the waypoint: the FaultInjection model, its ExtensionRef resolution,
the draws (seeded), the data path's answers and flags, and how a change reaches the routes."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from meshway.api.v1 import route_pb2
from meshway.config.errors import ConfigError
from meshway.config.loader import parse_documents
from meshway.config.model import KINDS, FaultInjection, GRPCRoute, HTTPRoute, Resource
from meshway.controlplane.translate import MeshSettings, MeshTranslator
from meshway.identity.spiffe import SpiffeId
from meshway.waypoint.faults import Fault, compile_fault, inject, merge_flags
from meshway.waypoint.messages import Request
from meshway.waypoint.proxy import AccessLog, Downstream, WaypointDataPath
from meshway.waypoint.routing import RouteTable
from meshway.xds.client import Update
from meshway.xds.types import ROUTE_TYPE, check_route

from .test_waypoint_proxy import datapath

pytestmark = pytest.mark.unit


def fault_doc(spec: str, name: str = "flaky", namespace: str = "shop") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        "apiVersion: meshway.io/v1alpha1\nkind: FaultInjection\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{body}\n"
    )


def fault_issues(spec: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_documents(fault_doc(spec), "faults.yaml")
    return [f"{i.path}: {i.message}" for i in caught.value.issues]


def http_route(rule: str, name: str = "r", namespace: str = "shop") -> str:
    return (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        "spec:\n  parentRefs: [{kind: Service, group: '', name: web, port: 80}]\n"
        f"  rules:\n  - {rule}\n"
    )


def table(*docs: str) -> RouteTable:
    parsed = parse_documents("---\n".join(docs), "routes.yaml")
    routes = [d for d in parsed if isinstance(d, HTTPRoute | GRPCRoute)]
    faults = [d for d in parsed if isinstance(d, FaultInjection)]
    return RouteTable.build(routes, faults=faults)


def fixed(*values: float) -> Callable[[], float]:
    it = iter(values)
    return lambda: next(it)


FLAKY = fault_doc("abort: {httpStatus: 503, percentage: {value: 30}}")
EXT_REF = "{type: ExtensionRef, extensionRef: {group: meshway.io, kind: FaultInjection, name: %s}}"
WEB = "{name: web, port: 80}"


# --------------------------------------------------------------------------- model


def test_fault_injection_parses_like_istios_http_fault_injection() -> None:
    (fi,) = parse_documents(
        fault_doc(
            """
            delay: {fixedDelay: 200ms, percentage: {value: 50}}
            abort: {grpcStatus: UNAVAILABLE, percentage: {value: 12.5}}
            """
        ),
        "f.yaml",
    )
    assert isinstance(fi, FaultInjection)
    fault = compile_fault(fi.spec)
    assert (fault.delay, fault.delay_fraction) == (0.2, 0.5)
    assert (fault.abort_grpc, fault.abort_status, fault.abort_fraction) == (14, None, 0.125)
    assert KINDS["FaultInjection"] is FaultInjection


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("delay: {fixedDelay: 5}", "delay"),  # not a string
        ("delay: {fixedDelay: 5x}", "invalid duration"),
        ("delay: {fixedDelay: 100us, percentage: {value: 1}}", "at least 1ms"),
        ("abort: {httpStatus: 503, grpcStatus: UNAVAILABLE}", "exactly one"),
        ("abort: {percentage: {value: 10}}", "exactly one"),
        ("abort: {httpStatus: 503, percentage: {value: 101}}", "percentage.value: must be at most"),
        ("abort: {httpStatus: 503, percentage: {value: -1}}", "percentage.value: must be at least"),
        ("abort: {httpStatus: 99}", "httpStatus: must be at least 200"),
        ("abort: {grpcStatus: NOPE}", "grpcStatus: unknown gRPC status"),
        ("delay: {fixedDelay: 1s, percent: 150}", "percent: must be at most 100"),
        ("{}", "set delay, abort or both"),
    ],
)
def test_fault_injection_validation(spec: str, expected: str) -> None:
    found = fault_issues(spec)
    assert any(expected in issue for issue in found), found


def test_a_missing_percentage_faults_nothing_as_in_istio() -> None:
    (fi,) = parse_documents(fault_doc("abort: {httpStatus: 500}\ndelay: {fixedDelay: 1s}"), "f")
    assert isinstance(fi, FaultInjection)
    fault = compile_fault(fi.spec)
    assert fault.delay_fraction == 0 and fault.abort_fraction == 0
    assert fault.draw_delay(lambda: 0.0) is None and fault.draw_abort(lambda: 0.0) is None
    # The deprecated integer `percent` of a delay still counts.
    (old,) = parse_documents(fault_doc("delay: {fixedDelay: 1s, percent: 40}"), "f")
    assert isinstance(old, FaultInjection)
    assert compile_fault(old.spec).delay_fraction == 0.4


# --------------------------------------------------------------------------- draws


def test_seeded_draws_hit_their_share() -> None:
    fault = Fault(delay=0.1, delay_fraction=0.5, abort_status=503, abort_fraction=0.3)
    rand = random.Random(6).random
    n = 10_000
    aborted = sum(fault.draw_abort(rand) is not None for _ in range(n))
    delayed = sum(fault.draw_delay(rand) is not None for _ in range(n))
    for count, p in ((aborted, 0.3), (delayed, 0.5)):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= 3 * sigma, (count, p)
    # Same seed, same draws: a unit test can say which requests are faulted.
    again = random.Random(6).random
    assert [fault.draw_abort(again) is not None for _ in range(20)] == [
        fault.draw_abort(r) is not None for r in [random.Random(6).random] for _ in range(20)
    ]


async def test_delay_comes_first_and_abort_is_drawn_on_its_own() -> None:
    fault = Fault(delay=0.001, delay_fraction=0.5, abort_status=418, abort_fraction=0.5)
    assert await inject(fault, fixed(0.9, 0.9)) == ("", None)
    flags, answer = await inject(fault, fixed(0.1, 0.9))
    assert (flags, answer) == ("DI", None)
    flags, answer = await inject(fault, fixed(0.9, 0.1))
    assert flags == "FI" and answer is not None and answer.status == 418
    flags, answer = await inject(fault, fixed(0.1, 0.1))
    assert flags == "DI,FI" and answer is not None
    assert answer.body.read_nowait() == b"fault filter abort"


def test_grpc_abort_is_trailers_only() -> None:
    answer = Fault(abort_grpc=14, abort_fraction=1.0).abort_response()
    assert answer.status == 200
    assert answer.header("content-type") == "application/grpc"
    assert answer.header("grpc-status") == "14"
    assert answer.header("grpc-message") == "fault filter abort"


def test_flags_merge_in_envoys_order() -> None:
    assert merge_flags("-", "DI") == "DI"
    assert merge_flags("UT", "DI") == "UT,DI"
    assert merge_flags("-", "DI,FI") == "DI,FI"
    assert merge_flags("URX", "DI") == "DI,URX"
    assert merge_flags("DC", "") == "DC"


# --------------------------------------------------------------------------- resolution


def test_extension_ref_resolves_to_the_fault_injection_in_the_routes_namespace() -> None:
    t = table(FLAKY, http_route(f"{{filters: [{EXT_REF % 'flaky'}], backendRefs: [{WEB}]}}"))
    routes = t.for_service("shop", "web", 80)
    assert routes is not None
    match = routes.match(Request("GET", "/", "web"))
    assert match is not None and match.fault is not None
    assert (match.fault.abort_status, match.fault.abort_fraction) == (503, 0.3)
    assert match.fault.source == "FaultInjection shop/flaky"
    assert not t.problems


def test_unresolvable_extension_ref_answers_500_and_is_reported() -> None:
    other_ns = fault_doc("abort: {httpStatus: 503}", namespace="other")
    t = table(other_ns, http_route(f"{{filters: [{EXT_REF % 'flaky'}], backendRefs: [{WEB}]}}"))
    routes = t.for_service("shop", "web", 80)
    assert routes is not None
    match = routes.match(Request("GET", "/", "web"))
    assert match is not None and match.fault is None
    answer = match.apply_request_filters(Request("GET", "/", "web"))
    assert answer is not None and answer.status == 500
    assert any("FaultInjection shop/flaky not found" in p for p in t.problems)
    # Another kind is not skipped either.
    unknown = "{type: ExtensionRef, extensionRef: {group: example.com, kind: Thing, name: x}}"
    t = table(http_route(f"{{filters: [{unknown}], backendRefs: [{WEB}]}}"))
    match = t.for_service("shop", "web", 80).match(Request("GET", "/", "web"))  # type: ignore[union-attr]
    assert match is not None
    answer = match.apply_request_filters(Request("GET", "/", "web"))
    assert answer is not None and answer.status == 500


def test_backend_ref_fault_applies_to_that_backend_only() -> None:
    backends = (
        f"[{{name: web, port: 80, weight: 1, filters: [{EXT_REF % 'flaky'}]}}, "
        "{name: api, port: 80, weight: 1}]"
    )
    t = table(FLAKY, http_route(f"{{backendRefs: {backends}}}"))
    routes = t.for_service("shop", "web", 80)
    assert routes is not None
    match = routes.match(Request("GET", "/", "web"))
    assert match is not None and match.fault is None
    assert match.pick_backend(lambda: 0.1) is not None and match.backend_fault is not None
    assert match.pick_backend(lambda: 0.9) is not None and match.backend_fault is None


def test_a_second_fault_injection_in_one_rule_is_not_skipped() -> None:
    two = f"{{filters: [{EXT_REF % 'flaky'}, {EXT_REF % 'flaky'}], backendRefs: [{WEB}]}}"
    t = table(FLAKY, http_route(two))
    match = t.for_service("shop", "web", 80).match(Request("GET", "/", "web"))  # type: ignore[union-attr]
    assert match is not None and match.fault is not None
    answer = match.apply_request_filters(Request("GET", "/", "web"))
    assert answer is not None and answer.status == 500
    assert any("only one FaultInjection" in p for p in t.problems)


# --------------------------------------------------------------------------- delivery


def _obj(doc: str) -> Resource:
    (parsed,) = parse_documents(doc, "x.yaml")
    return parsed


def test_fault_injections_and_virtual_services_reach_waypoints_as_routes() -> None:
    vs = _obj(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: web, namespace: shop}\n"
        "spec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}\n"
    )
    t = MeshTranslator(MeshSettings())
    changes = t.full([_obj(FLAKY), vs], "1")
    (change,) = [c for c in changes if c.type_url == ROUTE_TYPE]
    assert set(change.updated) == {"shop/FaultInjection/flaky", "shop/VirtualService/web"}
    for name, cached in change.updated.items():
        msg = route_pb2.Route()
        msg.ParseFromString(cached.proto.resource.value)
        check_route(name, msg)  # the waypoint's own check accepts them


def _route_message(doc: str) -> route_pb2.Route:
    t = MeshTranslator(MeshSettings())
    obj = _obj(doc)
    (change,) = t.full([obj], "1")
    msg = route_pb2.Route()
    msg.ParseFromString(next(iter(change.updated.values())).proto.resource.value)
    return msg


async def test_a_changed_fault_injection_recompiles_the_routes_that_use_it() -> None:
    from meshway.waypoint.server import Waypoint, WaypointConfig

    waypoint = Waypoint(WaypointConfig("shop", "waypoint", "127.0.0.1:1", "t", b"", "node-1"))
    try:
        route = http_route(f"{{filters: [{EXT_REF % 'flaky'}], backendRefs: [{WEB}]}}")
        waypoint._on_update(
            Update(ROUTE_TYPE, "1", {"shop/HTTPRoute/r": _route_message(route)}, frozenset())
        )

        def fault() -> Fault | None:
            routes = waypoint.datapath.routes.for_service("shop", "web", 80)
            assert routes is not None
            match = routes.match(Request("GET", "/", "web"))
            assert match is not None
            return match.fault

        assert fault() is None  # not there yet: requests get 500
        name = "shop/FaultInjection/flaky"
        waypoint._on_update(Update(ROUTE_TYPE, "2", {name: _route_message(FLAKY)}, frozenset()))
        first = fault()
        assert first is not None and first.abort_fraction == 0.3
        changed = fault_doc("abort: {httpStatus: 429, percentage: {value: 80}}")
        waypoint._on_update(Update(ROUTE_TYPE, "3", {name: _route_message(changed)}, frozenset()))
        second = fault()
        assert second is not None and (second.abort_status, second.abort_fraction) == (429, 0.8)
        waypoint._on_update(Update(ROUTE_TYPE, "4", {}, frozenset({name})))
        assert fault() is None
    finally:
        await waypoint.xds.close()
        await waypoint.ca.close()


# --------------------------------------------------------------------------- data path


def _serving(dp: WaypointDataPath, *docs: str) -> tuple[Downstream, io.StringIO]:
    dp.update(routes=table(*docs))
    dest = dp.destination("10.96.0.10", 80)
    assert dest is not None
    out = io.StringIO()
    dp.access_log = AccessLog(out)
    return Downstream(SpiffeId("cluster.local", "shop", "client"), "10.244.0.9", None, dest), out


def _log_lines(dp: WaypointDataPath, out: io.StringIO) -> list[dict[str, Any]]:
    dp.access_log.flush()
    return [
        json.loads(line.split("meshway.access: ", 1)[1]) for line in out.getvalue().splitlines()
    ]


def _metric(dp: WaypointDataPath, flags: str, code: str) -> float:
    total = 0.0
    for family in dp.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "istio_requests_total" and (
                sample.labels.get("response_flags"),
                sample.labels.get("response_code"),
            ) == (flags, code):
                total += sample.value
    return total


async def test_abort_answers_before_any_backend_with_flags_in_log_and_metrics() -> None:
    dp = datapath()  # its upstream fails the test if anything is forwarded
    always = fault_doc(
        "delay: {fixedDelay: 1ms, percentage: {value: 100}}\n"
        "abort: {httpStatus: 503, percentage: {value: 100}}"
    )
    down, out = _serving(
        dp, always, http_route(f"{{filters: [{EXT_REF % 'flaky'}], backendRefs: [{WEB}]}}")
    )
    response = await dp.serve(down, Request("GET", "/x", "web"))
    assert response.status == 503
    assert await response.body.read_all() == b"fault filter abort"
    (entry,) = _log_lines(dp, out)
    assert entry["response_flags"] == "DI,FI" and entry["response_code"] == 503
    assert entry["details"] == "fault_filter_abort" and entry["upstream_host"] is None
    assert _metric(dp, "DI,FI", "503") == 1


async def test_grpc_clients_get_a_grpc_status_for_either_kind_of_abort() -> None:
    dp = datapath()
    grpc_fault = fault_doc("abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 100}}")
    down, _ = _serving(
        dp, grpc_fault, http_route(f"{{filters: [{EXT_REF % 'flaky'}], backendRefs: [{WEB}]}}")
    )
    grpc = [("content-type", "application/grpc")]
    response = await dp.serve(down, Request("POST", "/pkg.Svc/M", "web", list(grpc)))
    assert (response.status, response.header("grpc-status")) == (200, "8")
    http_fault = fault_doc("abort: {httpStatus: 503, percentage: {value: 100}}")
    down, _ = _serving(
        dp, http_fault, http_route(f"{{filters: [{EXT_REF % 'flaky'}], backendRefs: [{WEB}]}}")
    )
    response = await dp.serve(down, Request("POST", "/pkg.Svc/M", "web", list(grpc)))
    assert (response.status, response.header("grpc-status")) == (200, "14")  # 503: UNAVAILABLE
    assert response.header("grpc-message") == "fault filter abort"


async def test_a_delay_does_not_hold_up_other_requests() -> None:
    dp = datapath()
    slow = fault_doc(
        "delay: {fixedDelay: 200ms, percentage: {value: 100}}\n"
        "abort: {httpStatus: 500, percentage: {value: 100}}",
        name="slow",
    )
    fast = fault_doc("abort: {httpStatus: 501, percentage: {value: 100}}", name="fast")
    rules = (
        f"{{matches: [{{path: {{type: PathPrefix, value: /slow}}}}], "
        f"filters: [{EXT_REF % 'slow'}], backendRefs: [{WEB}]}}\n"
        f"  - {{filters: [{EXT_REF % 'fast'}], backendRefs: [{WEB}]}}"
    )
    down, _ = _serving(dp, slow, fast, http_route(rules))
    finished: list[int] = []

    async def one(path: str) -> None:
        response = await dp.serve(down, Request("GET", path, "web"))
        finished.append(response.status)

    slow_task = asyncio.ensure_future(one("/slow"))
    await asyncio.sleep(0)  # the slow one is asleep in its delay
    await asyncio.gather(*(one("/fast") for _ in range(5)))
    assert finished == [501] * 5  # all answered while the delayed request still waits
    await slow_task
    assert finished[-1] == 500
