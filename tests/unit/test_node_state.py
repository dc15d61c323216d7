"""ProxyState: how the node proxy decides where a connection goes."""

from __future__ import annotations

import ipaddress

import pytest

from meshway.api.v1 import address_pb2
from meshway.identity.spiffe import SpiffeId
from meshway.node.state import ProxyState
from meshway.xds.client import Update
from meshway.xds.types import ADDRESS_TYPE

pytestmark = pytest.mark.unit

SVC = "shop/web.shop.svc.cluster.local"


def workload(
    name: str, ip: str, *, node: str = "n1", mesh: bool = True, service: bool = True
) -> address_pb2.Address:
    wl = address_pb2.Workload(
        uid=f"shop/{name}",
        name=name,
        namespace="shop",
        node=node,
        service_account=name,
        trust_domain="cluster.local",
        tunnel_protocol=address_pb2.HBONE if mesh else address_pb2.NONE,
        addresses=[ipaddress.ip_address(ip).packed],
    )
    if service:
        wl.services[SVC].ports.add(service_port=80, target_port=8080)
    return address_pb2.Address(workload=wl)


def service(waypoint: str | None = None) -> address_pb2.Address:
    svc = address_pb2.Service(name="web", namespace="shop", hostname="web.shop.svc.cluster.local")
    svc.addresses.add(address=ipaddress.ip_address("10.96.0.10").packed)
    svc.ports.add(service_port=80, target_port=8080)
    if waypoint:
        svc.waypoint.service = "shop/wp.shop.svc.cluster.local"
        svc.waypoint.address.address = ipaddress.ip_address(waypoint).packed
        svc.waypoint.hbone_mtls_port = 15008
    return address_pb2.Address(service=svc)


def state(*addresses: tuple[str, address_pb2.Address]) -> ProxyState:
    s = ProxyState("n1")
    s.apply(Update(ADDRESS_TYPE, "1", dict(addresses), frozenset()))
    return s


def test_vip_round_robin_over_endpoints_with_target_ports() -> None:
    s = state(
        ("shop/a", workload("a", "10.244.0.2")),
        ("shop/b", workload("b", "10.244.1.2")),
        (SVC, service()),
    )
    picks = [s.resolve("10.96.0.10", 80) for _ in range(4)]
    assert [p.address for p in picks if p] == [
        ("10.244.0.2", 8080),
        ("10.244.1.2", 8080),
        ("10.244.0.2", 8080),
        ("10.244.1.2", 8080),
    ]
    assert picks[0] is not None and picks[0].identity == SpiffeId("cluster.local", "shop", "a")
    assert s.resolve("10.96.0.10", 81) is not None  # unknown VIP port: plain passthrough
    assert s.resolve("10.96.0.10", 81).identity is None  # type: ignore[union-attr]


def test_no_endpoint_means_no_upstream() -> None:
    s = state((SVC, service()))
    assert s.resolve("10.96.0.10", 80) is None


def test_pod_ip_direct_mesh_and_outside() -> None:
    s = state(
        ("shop/a", workload("a", "10.244.0.2")), ("shop/p", workload("p", "10.244.0.3", mesh=False))
    )
    mesh = s.resolve("10.244.0.2", 9000)
    assert mesh is not None and mesh.identity is not None and mesh.address == ("10.244.0.2", 9000)
    plain = s.resolve("10.244.0.3", 9000)
    assert plain is not None and plain.identity is None and plain.workload is not None
    outside = s.resolve("192.0.2.1", 443)
    assert outside is not None and outside.identity is None and outside.workload is None


def test_service_with_a_waypoint_goes_to_the_waypoint() -> None:
    s = state(("shop/a", workload("a", "10.244.0.2")), (SVC, service(waypoint="10.96.0.99")))
    up = s.resolve("10.96.0.10", 80)
    assert up is not None and up.waypoint is not None
    assert ipaddress.ip_address(up.waypoint.address.address) == ipaddress.ip_address("10.96.0.99")


def test_local_workloads_are_the_enrolled_ones_of_this_node() -> None:
    s = state(
        ("shop/a", workload("a", "10.244.0.2")),
        ("shop/b", workload("b", "10.244.1.2", node="n2")),
        ("shop/p", workload("p", "10.244.0.3", mesh=False)),
    )
    assert [w.name for w in s.local_workloads()] == ["a"]
    s.apply(Update(ADDRESS_TYPE, "2", {}, frozenset({"shop/a"})))
    assert s.local_workloads() == [] and s.workload_by_ip("10.244.0.2") is None


def test_sidecar_pods_belong_to_their_own_proxy() -> None:
    hybrid = workload("h", "10.244.0.9")
    hybrid.workload.labels["meshway.io/proxy"] = "sidecar"
    s = state(("shop/a", workload("a", "10.244.0.2")), ("shop/h", hybrid))
    assert [w.name for w in s.local_workloads()] == ["a"]  # the node proxy
    assert [w.name for w in s.local_workloads(only_pod="shop/h")] == ["h"]  # h's sidecar
