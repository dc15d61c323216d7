"""Waypoint replicas: the `meshway.io/replicas` annotation, the controller's Workloads and their
placement, admission of replica names, the CLI's --replicas, and the node proxy's choice of a
replica for each tunnel.

Control planes run in-process; nothing here needs root.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshway.api.v1 import address_pb2
from meshway.config.errors import ConfigError
from meshway.config.model import Gateway, ObjectKey, Resource, Service, Workload
from meshway.controlplane.server import ControlPlane
from meshway.controlplane.waypoints import (
    desired_objects,
    gateway_status,
    place_replicas,
    replica_candidates,
    replica_name,
)
from meshway.hbone.errors import HboneConnectionError, HboneRefused
from meshway.identity.csr import build_csr, generate_key
from meshway.identity.spiffe import SpiffeId
from meshway.node.proxy import PodProxy
from meshway.node.state import ProxyState
from meshway.node.waypoint_endpoints import EJECT_SECONDS, MAX_ATTEMPTS, WaypointEndpoints
from meshway.xds.client import Update
from meshway.xds.types import ADDRESS_TYPE

from .test_waypoint_controlplane import (
    BASE,
    apply,
    condition,
    gateway_doc,
    listed,
    make_cp,
    meshway,
    parse_one,
    served,  # noqa: F401  (a fixture)
    workload_doc,
)

pytestmark = pytest.mark.unit

WL = "Workload"


def replicated(replicas: str, name: str = "waypoint") -> str:
    return gateway_doc(name).replace(
        f"metadata: {{name: {name}, namespace: shop}}",
        f"metadata: {{name: {name}, namespace: shop, "
        f"annotations: {{meshway.io/replicas: '{replicas}'}}}}",
    )


def three_nodes() -> str:
    return BASE + ("---\napiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {name: node-3}\n")


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = make_cp(tmp_path / "state")
    apply(plane, BASE)
    yield plane
    plane.store.close()


def replicas_of(cp: ControlPlane, name: str = "waypoint") -> dict[str, Workload]:
    found = {}
    for obj in cp.store.list(WL, "shop"):
        assert isinstance(obj, Workload)
        if obj.metadata.annotations.get("meshway.io/managed-by") == f"Gateway/{name}":
            found[obj.metadata.name] = obj
    return found


def node(name: str, cordoned: bool = False) -> Resource:
    return parse_one(
        f"apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {{name: {name}}}\n"
        f"spec: {{unschedulable: {str(cordoned).lower()}}}\nstatus: {{podCIDR: 10.244.0.0/24}}\n"
    )


# -- the annotation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("'0'", "whole number from 1 to 16, got '0'"),
        ("'17'", "at most 16 waypoint replicas, got 17"),
        ("two", "whole number from 1 to 16, got 'two'"),
        ("'-1'", "whole number from 1 to 16, got '-1'"),
        ("'1.5'", "whole number from 1 to 16, got '1.5'"),
        ("''", "whole number from 1 to 16, got ''"),
        ("2", "expected string, got integer 2"),
    ],
)
def test_a_bad_replicas_annotation_is_refused_with_its_field(
    cp: ControlPlane, value: str, message: str
) -> None:
    doc = replicated("X").replace("'X'", value)
    with pytest.raises(ConfigError) as caught:
        apply(cp, doc)
    ((path, text),) = [(i.path, i.message) for i in caught.value.issues]
    assert path == "metadata.annotations[meshway.io/replicas]"
    assert message in text
    assert cp.store.get(ObjectKey("Gateway", "shop", "waypoint")) is None


def test_replica_names() -> None:
    assert [replica_name("wp", i) for i in range(3)] == ["wp", "wp-1", "wp-2"]
    assert replica_candidates("wp-2") == [("wp-2", 0), ("wp", 2)]
    assert replica_candidates("wp") == [("wp", 0)]
    # Not a replica name: a leading zero, a suffix beyond the maximum, no base.
    assert replica_candidates("wp-01") == [("wp-01", 0)]
    assert replica_candidates("wp-16") == [("wp-16", 0)]
    assert replica_candidates("-3") == [("-3", 0)]


# -- desired objects and placement ---------------------------------------------------------------


def test_desired_objects_for_three_replicas() -> None:
    gateway = parse_one(replicated("3"))
    assert isinstance(gateway, Gateway) and gateway.replicas == 3
    _, service, *workloads = desired_objects(gateway, ["node-1", "node-2", "node-1"], python="/py")
    assert isinstance(service, Service)
    assert [w.metadata.name for w in workloads] == ["waypoint", "waypoint-1", "waypoint-2"]
    for wl in workloads:
        assert isinstance(wl, Workload)
        assert wl.metadata.annotations == {"meshway.io/managed-by": "Gateway/waypoint"}
        # Same labels (the Service selects them all), account and command for every replica.
        assert wl.metadata.labels["gateway.networking.k8s.io/gateway-name"] == "waypoint"
        assert wl.spec.service_account_name == "waypoint"
        assert wl.spec.command[-2:] == ["--gateway", "shop/waypoint"]
    assert service.spec.selector == {"gateway.networking.k8s.io/gateway-name": "waypoint"}
    assert [w.spec.node_name for w in workloads if isinstance(w, Workload)] == [
        "node-1",
        "node-2",
        "node-1",
    ]
    # A replica without a node is not made yet.
    objects = desired_objects(gateway, ["node-1", None, None], python="/py")
    assert [o.metadata.name for o in objects if isinstance(o, Workload)] == ["waypoint"]


def test_placement_spreads_replicas_then_balances_load() -> None:
    nodes = [node("a"), node("b"), node("c"), node("x", cordoned=True)]
    busy_a = [parse_one(workload_doc(f"w{i}", "a")) for i in range(3)]
    # Fewest replicas of this Gateway first, then fewest workloads: b, c, then a ...
    assert place_replicas(3, {}, nodes, busy_a) == ["b", "c", "a"]
    # ... and a fourth goes back to the least loaded node with one replica.
    assert place_replicas(4, {}, nodes, busy_a) == ["b", "c", "a", "b"]
    assert place_replicas(2, {}, [], []) == [None, None]


def test_placed_replicas_stay_where_they_are() -> None:
    nodes = [node("a"), node("b")]
    placed = {0: "a", 1: "a"}  # e.g. b was cordoned when they were placed
    workloads = [parse_one(workload_doc("waypoint", "a")), parse_one(workload_doc("w-1", "a"))]
    assert place_replicas(3, placed, nodes, workloads) == ["a", "a", "b"]
    # A placed replica on a node that is gone or cordoned is not moved either.
    assert place_replicas(2, {0: "gone"}, nodes, []) == ["gone", "a"]


# -- the controller --------------------------------------------------------------------------------


def test_replicas_spread_and_keep_their_names_and_nodes(tmp_path: Path) -> None:
    cp = make_cp(tmp_path / "state")
    try:
        apply(cp, three_nodes(), workload_doc("app", "node-1"))
        apply(cp, replicated("2"))
        first = replicas_of(cp)
        assert sorted(first) == ["waypoint", "waypoint-1"]
        assert {w.spec.node_name for w in first.values()} == {"node-2", "node-3"}
        assert len({w.status.pod_ip for w in first.values()}) == 2

        # Scale up: the two stay as they are (not even rewritten); the third goes to node-1,
        # the only node without a replica.
        apply(cp, replicated("3"))
        second = replicas_of(cp)
        for name, wl in first.items():
            assert second[name].metadata.resource_version == wl.metadata.resource_version
        assert second["waypoint-2"].spec.node_name == "node-1"

        # Scale down removes the highest indexes; scaling to one keeps the Gateway's namesake.
        apply(cp, replicated("2"))
        assert sorted(replicas_of(cp)) == ["waypoint", "waypoint-1"]
        apply(cp, gateway_doc())  # no annotation: one replica
        (only,) = replicas_of(cp).values()
        assert only.metadata.name == "waypoint"
        assert only.metadata.resource_version == first["waypoint"].metadata.resource_version

        # Deleting the Gateway removes every replica.
        apply(cp, replicated("3"))
        assert len(replicas_of(cp)) == 3
        cp.delete([ObjectKey("Gateway", "shop", "waypoint")])
        assert replicas_of(cp) == {}
        assert cp.store.get(ObjectKey("Service", "shop", "waypoint")) is None
    finally:
        cp.store.close()


def test_programmed_counts_running_replicas(cp: ControlPlane) -> None:
    apply(cp, replicated("2"))
    programmed = condition(cp.store.get(ObjectKey("Gateway", "shop", "waypoint")), "Programmed")
    assert (programmed.status, programmed.reason) == ("False", "Pending")
    assert programmed.message.startswith("0 of 2 waypoint replicas run: ")
    placed = {w.metadata.name: w.spec.node_name for w in replicas_of(cp).values()}
    key = ObjectKey(WL, "shop", "waypoint-1")
    cp.report_workload_phases({key: "Running"})
    programmed = condition(cp.store.get(ObjectKey("Gateway", "shop", "waypoint")), "Programmed")
    assert (programmed.status, programmed.reason) == ("True", "Programmed")
    assert programmed.message == (
        f"1 of 2 waypoint replicas run: shop/waypoint on node '{placed['waypoint']}' is "
        f"Pending, shop/waypoint-1 on node '{placed['waypoint-1']}'"
    )
    cp.report_workload_phases({key: "Failed"})
    programmed = condition(cp.store.get(ObjectKey("Gateway", "shop", "waypoint")), "Programmed")
    assert programmed.status == "False" and "0 of 2" in programmed.message


def test_status_message_without_enough_nodes() -> None:
    gateway = parse_one(replicated("3"))
    assert isinstance(gateway, Gateway)
    (_, service, wl) = desired_objects(gateway, "node-1", python="/py")
    assert isinstance(wl, Workload)
    running = wl.model_copy(update={"status": wl.status.model_copy(update={"phase": "Running"})})
    status = gateway_status(gateway, service, [running], None, "T")
    programmed = next(c for c in status.conditions if c.type == "Programmed")
    assert programmed.status == "True"
    assert programmed.message == (
        "1 of 3 waypoint replicas run: shop/waypoint on node 'node-1', "
        "2 waiting for a schedulable node"
    )


def test_a_replica_name_taken_by_a_users_workload(cp: ControlPlane) -> None:
    apply(cp, workload_doc("waypoint-1", "node-1"))
    # Admission refuses the Gateway that would need that name ...
    with pytest.raises(ConfigError, match="Workload shop/waypoint-1 exists") as caught:
        apply(cp, replicated("2"))
    assert caught.value.issues[0].path == "metadata.name"
    assert "lower its meshway.io/replicas" in caught.value.issues[0].message
    # ... and takes it with one replica, whose names are free.
    apply(cp, gateway_doc())
    # A write that bypasses admission (another control plane, a restore) still meets the
    # conflict in the controller: the Gateway says why, and the user's Workload is untouched.
    gateway = cp.store.get(ObjectKey("Gateway", "shop", "waypoint"))
    assert isinstance(gateway, Gateway)
    meta = gateway.metadata.model_copy(update={"annotations": {"meshway.io/replicas": "2"}})
    (result,) = cp.store.apply([gateway.model_copy(update={"metadata": meta})])
    cp.waypoints.sync(cp.waypoints.affected([result.object]))
    programmed = condition(cp.store.get(ObjectKey("Gateway", "shop", "waypoint")), "Programmed")
    assert (programmed.status, programmed.reason) == ("False", "Invalid")
    assert "Workload shop/waypoint-1 exists and is not managed by this Gateway" in (
        programmed.message
    )
    users = cp.store.get(ObjectKey(WL, "shop", "waypoint-1"))
    assert users is not None and not users.metadata.annotations
    # Once the user's Workload goes, the controller (following the store) makes the replica.
    cp.store.delete([ObjectKey(WL, "shop", "waypoint-1")])
    cp.waypoints.sync(cp.waypoints.affected([users]))
    assert sorted(replicas_of(cp)) == ["waypoint", "waypoint-1"]


def test_a_gateway_named_like_another_waypoints_replica(cp: ControlPlane) -> None:
    apply(cp, replicated("2"))
    with pytest.raises(ConfigError, match="Workload shop/waypoint-1 exists"):
        apply(cp, gateway_doc("waypoint-1"))


def test_users_cannot_touch_or_take_replica_names(cp: ControlPlane) -> None:
    apply(cp, replicated("2"))
    # Edit or delete a replica: refused, as for the first one.
    with pytest.raises(ConfigError, match="managed by Gateway shop/waypoint"):
        apply(cp, workload_doc("waypoint-1", "node-1"))
    with pytest.raises(ConfigError, match="managed by Gateway shop/waypoint"):
        cp.delete([ObjectKey(WL, "shop", "waypoint-1")])
    # A name beyond the replicas is free.
    apply(cp, workload_doc("waypoint-2", "node-1"))


def test_a_name_reserved_for_a_replica_not_placed_yet(tmp_path: Path) -> None:
    cp = make_cp(tmp_path / "state")
    try:
        apply(cp, BASE.split("---")[0], replicated("3"))  # no node: no replica yet
        assert replicas_of(cp) == {}
        with pytest.raises(ConfigError, match="waypoint replica 2 of Gateway shop/waypoint"):
            apply(cp, workload_doc("waypoint-2", "node-1"))
    finally:
        cp.store.close()


def test_every_replica_node_may_sign_the_waypoint_identity(cp: ControlPlane) -> None:
    apply(cp, replicated("2"))
    assert {w.spec.node_name for w in replicas_of(cp).values()} == {"node-1", "node-2"}
    csr = build_csr(generate_key(), SpiffeId("cluster.local", "shop", "waypoint"))
    assert cp.sign_for_node("node-1", csr) and cp.sign_for_node("node-2", csr)


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_replicas(served: tuple[ControlPlane, dict[str, str]]) -> None:  # noqa: F811
    cp, env = served
    result = meshway(env, "waypoint", "apply", "-n", "shop", "--replicas", "2")
    assert result.exit_code == 0, result.output
    gateway = cp.store.get(ObjectKey("Gateway", "shop", "waypoint"))
    assert gateway is not None
    assert gateway.metadata.annotations == {"meshway.io/replicas": "2"}
    (row,) = listed(env, "-n", "shop")
    assert row["ready"] == "0/2"
    assert sorted(row["node"].split(",")) == ["node-1", "node-2"]
    # Re-applying without --replicas keeps the count; --replicas 1 scales down.
    assert meshway(env, "waypoint", "apply", "-n", "shop").exit_code == 0
    assert listed(env, "-n", "shop")[0]["ready"] == "0/2"
    assert meshway(env, "waypoint", "apply", "-n", "shop", "--replicas", "1").exit_code == 0
    (row,) = listed(env, "-n", "shop")
    assert row["ready"] == "0/1" and "," not in row["node"]
    for bad in ("0", "17"):
        refused = meshway(env, "waypoint", "apply", "-n", "shop", "--replicas", bad)
        assert refused.exit_code == 2 and "invalid --replicas" in refused.output


def test_cli_generate_with_replicas() -> None:
    from typer.testing import CliRunner

    from meshway.cli.main import app

    result = CliRunner().invoke(app, ["waypoint", "generate", "-n", "shop", "--replicas", "3"])
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(result.stdout)
    assert doc["metadata"]["annotations"] == {"meshway.io/replicas": "3"}
    gateway = parse_one(result.stdout)
    assert isinstance(gateway, Gateway) and gateway.replicas == 3


# -- the node proxy: which replica a tunnel goes to ----------------------------------------------

WAYPOINT_SVC = "shop/waypoint.shop.svc.cluster.local"


def waypoint_address(vip: str | None = "10.96.0.9") -> address_pb2.GatewayAddress:
    address = address_pb2.GatewayAddress(service=WAYPOINT_SVC, hbone_mtls_port=15008)
    if vip:
        address.address.address = ipaddress.ip_address(vip).packed
    return address


def replica(name: str, ip: str | None) -> address_pb2.Address:
    wl = address_pb2.Workload(uid=f"shop/{name}", name=name, namespace="shop", node="n2")
    if ip:
        wl.addresses.append(ipaddress.ip_address(ip).packed)
    wl.services[WAYPOINT_SVC].ports.add(service_port=15008, target_port=15008)
    wl.services[WAYPOINT_SVC].ports.add(service_port=15020, target_port=15020)
    return address_pb2.Address(workload=wl)


def proxy_state(*replicas: address_pb2.Address) -> ProxyState:
    state = ProxyState("n1")
    svc = address_pb2.Service(name="waypoint", namespace="shop", hostname=WAYPOINT_SVC[5:])
    updated: dict[str, Any] = {WAYPOINT_SVC: address_pb2.Address(service=svc)}
    for r in replicas:
        updated[r.workload.uid] = r
    state.apply(Update(ADDRESS_TYPE, "1", updated, frozenset()))
    return state


def test_tunnels_spread_over_the_replicas() -> None:
    state = proxy_state(
        replica("waypoint", "10.244.1.5"),
        replica("waypoint-1", "10.244.2.5"),
        replica("waypoint-2", None),  # no address yet: not a candidate
    )
    endpoints = WaypointEndpoints(state)
    assert endpoints.endpoints(waypoint_address()) == [("10.244.1.5", 15008), ("10.244.2.5", 15008)]
    firsts = [endpoints.dial_order(waypoint_address())[0] for _ in range(100)]
    assert firsts.count(("10.244.1.5", 15008)) == 50
    assert firsts.count(("10.244.2.5", 15008)) == 50
    # The other replica is the second choice; the VIP is not dialled while replicas are known.
    assert set(endpoints.dial_order(waypoint_address())) == {
        ("10.244.1.5", 15008),
        ("10.244.2.5", 15008),
    }


def test_no_known_replica_falls_back_to_the_vip() -> None:
    endpoints = WaypointEndpoints(proxy_state(replica("waypoint", None)))
    assert endpoints.dial_order(waypoint_address()) == [("10.96.0.9", 15008)]
    assert endpoints.dial_order(waypoint_address(vip=None)) == []


def test_a_failed_replica_is_tried_last_for_a_while() -> None:
    now = [100.0]
    state = proxy_state(*(replica(f"w{i}", f"10.244.{i}.5") for i in range(5)))
    endpoints = WaypointEndpoints(state, clock=lambda: now[0])
    bad = ("10.244.0.5", 15008)
    endpoints.failed(bad)
    orders = [endpoints.dial_order(waypoint_address()) for _ in range(10)]
    assert all(len(order) == MAX_ATTEMPTS and bad not in order for order in orders)
    now[0] += EJECT_SECONDS + 0.1
    assert any(endpoints.dial_order(waypoint_address())[0] == bad for _ in range(5))
    # With every replica failed, all are still tried (in round-robin order).
    only = WaypointEndpoints(proxy_state(replica("w", "10.244.9.5")), clock=lambda: now[0])
    only.failed(("10.244.9.5", 15008))
    assert only.dial_order(waypoint_address()) == [("10.244.9.5", 15008)]


class _Node:
    def __init__(self, state: ProxyState) -> None:
        self.waypoints = WaypointEndpoints(state)


def pod_proxy(state: ProxyState, dialled: list[str], down: set[str], refuse: bool) -> PodProxy:
    """A PodProxy whose HBONE dials are recorded instead of made."""
    pod = PodProxy.__new__(PodProxy)
    pod.node = _Node(state)  # type: ignore[assignment]
    pod.identity = SpiffeId("cluster.local", "shop", "client")

    async def hbone_stream(
        host: str, port: int, expected: SpiffeId, authority: str, headers: dict[str, str]
    ) -> Any:
        dialled.append(host)
        assert expected == SpiffeId("cluster.local", "shop", "waypoint")
        assert authority == "10.96.0.20:80"
        if refuse:
            raise HboneRefused(403, "denied")
        if host in down:
            raise HboneConnectionError(f"{host} is down")
        return f"stream via {host}"

    pod._hbone_stream = hbone_stream  # type: ignore[method-assign]
    return pod


async def test_a_tunnel_tries_another_replica_when_one_is_down() -> None:
    state = proxy_state(replica("waypoint", "10.244.1.5"), replica("waypoint-1", "10.244.2.5"))
    dialled: list[str] = []
    pod = pod_proxy(state, dialled, {"10.244.1.5"}, refuse=False)
    results = [
        await pod._waypoint_stream(waypoint_address(), ("10.96.0.20", 80), {}) for _ in range(6)
    ]
    assert results == ["stream via 10.244.2.5"] * 6
    assert dialled.count("10.244.1.5") == 1  # failed once, then tried last
    # Every replica down: the tunnel fails after trying each once.
    dialled.clear()
    pod = pod_proxy(state, dialled, {"10.244.1.5", "10.244.2.5"}, refuse=False)
    with pytest.raises(HboneConnectionError):
        await pod._waypoint_stream(waypoint_address(), ("10.96.0.20", 80), {})
    assert sorted(dialled) == ["10.244.1.5", "10.244.2.5"]
    # A refusal is the waypoint's answer: no other replica is asked.
    dialled.clear()
    pod = pod_proxy(state, dialled, set(), refuse=True)
    with pytest.raises(HboneRefused):
        await pod._waypoint_stream(waypoint_address(), ("10.96.0.20", 80), {})
    assert len(dialled) == 1


def test_the_example_asks_for_two_replicas() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "waypoint-replicas.yaml"
    (gateway,) = [o for o in parse_one_source(example.read_text()) if isinstance(o, Gateway)]
    assert gateway.replicas == 2 and gateway.spec.gateway_class_name == "istio-waypoint"


def parse_one_source(text: str) -> list[Resource]:
    from meshway.config.loader import parse_sources_with_origins

    objects, _ = parse_sources_with_origins([("example", text)])
    return list(objects)
