"""The control plane's side of waypoints: deploying one from a Gateway, its identity, its xDS
stream (with routes), the runtime's part, and `meshway waypoint`.

Control planes run in-process on loopback; nothing here needs root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from meshway.cli.main import app
from meshway.config.loader import parse_sources_with_origins
from meshway.config.model import (
    Gateway,
    ObjectKey,
    Resource,
    Service,
    ServiceAccount,
    Workload,
)
from meshway.controlplane.launcher import free_port
from meshway.controlplane.server import ControlPlane, ControlPlaneConfig, RequestDenied
from meshway.controlplane.waypoints import (
    choose_node,
    desired_objects,
    gateway_status,
)
from meshway.identity.csr import build_csr, generate_key
from meshway.identity.spiffe import SpiffeId
from meshway.runtime.agent import (
    PodState,
    SupervisedProcess,
    is_waypoint_pod,
    pod_environment,
    workload_phase,
)
from meshway.xds.client import Update, XdsClient
from meshway.xds.types import ADDRESS_TYPE, ROUTE_TYPE, node_proxy_types, waypoint_types

pytestmark = pytest.mark.unit

BASE = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {name: node-1}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {name: node-2}
"""


def gateway_doc(
    name: str = "waypoint", cls: str = "istio-waypoint", traffic: str | None = None
) -> str:
    labels = f", labels: {{istio.io/waypoint-for: {traffic}}}" if traffic else ""
    return (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        f"metadata: {{name: {name}, namespace: shop{labels}}}\n"
        f"spec: {{gatewayClassName: {cls}, listeners: [{{name: mesh, port: 15008, "
        "protocol: HBONE}]}\n"
    )


def workload_doc(name: str, node: str) -> str:
    return (
        "apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
        f"metadata: {{name: {name}, namespace: shop}}\n"
        f"spec: {{nodeName: {node}, command: [sleep, '1']}}\n"
    )


ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: backend, port: 80}]
  rules:
    - backendRefs: [{name: backend-v1, port: 80, weight: WEIGHT}]
"""


def make_cp(state: Path, admin_port: int = 0) -> ControlPlane:
    return ControlPlane(
        ControlPlaneConfig(
            state_dir=state,
            grpc_address="127.0.0.1:0",
            admin_address=f"127.0.0.1:{admin_port}",
            pod_cidr="10.244.0.0/22",
            service_cidr="10.96.0.0/24",
            debounce_after=0.01,
            debounce_max=0.05,
        )
    )


def apply(cp: ControlPlane, *docs: str) -> None:
    cp.apply_sources([("test.yaml", "---\n".join(docs))])


def get(cp: ControlPlane, kind: str, name: str = "waypoint") -> Any:
    return cp.store.get(ObjectKey(kind, "shop", name))


def condition(gateway: Gateway, ctype: str) -> Any:
    return next(c for c in gateway.status.conditions if c.type == ctype)


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = make_cp(tmp_path / "state")
    apply(plane, BASE)
    yield plane
    plane.store.close()


# -- what a waypoint Gateway stands for ------------------------------------------------------


def parse_one(text: str) -> Resource:
    (obj,), _ = parse_sources_with_origins([("t", text)])
    return obj


def test_desired_objects() -> None:
    gateway = parse_one(gateway_doc())
    assert isinstance(gateway, Gateway)
    account, service, workload = desired_objects(gateway, "node-2", python="/py")
    assert isinstance(account, ServiceAccount) and account.metadata.name == "waypoint"
    assert isinstance(workload, Workload) and isinstance(service, Service)
    for obj in (account, service, workload):
        assert obj.metadata.annotations == {"meshway.io/managed-by": "Gateway/waypoint"}
    assert workload.metadata.labels == {
        "gateway.networking.k8s.io/gateway-name": "waypoint",
        "istio.io/dataplane-mode": "none",
        "meshway.io/proxy": "waypoint",
    }
    assert workload.spec.command == ["/py", "-m", "meshway.waypoint", "--gateway", "shop/waypoint"]
    assert (workload.spec.service_account_name, workload.spec.node_name) == ("waypoint", "node-2")
    assert [(p.name, p.container_port) for p in workload.spec.ports] == [
        ("hbone", 15008),
        ("metrics", 15020),
    ]
    assert service.spec.selector == {"gateway.networking.k8s.io/gateway-name": "waypoint"}
    assert [(p.name, p.port, p.app_protocol) for p in service.spec.ports] == [
        ("mesh", 15008, "hbone"),
        ("metrics", 15020, None),
    ]
    # The user's own account is used as it is; no node yet means no Workload yet.
    (only_service,) = desired_objects(gateway, None, python="/py", service_account=False)
    assert isinstance(only_service, Service)
    other_domain = desired_objects(gateway, "n", python="/py", cluster_domain="corp.example")
    assert isinstance(other_domain[2], Workload)
    assert other_domain[2].spec.command[-2:] == ["--cluster-domain", "corp.example"]


def test_choose_node_prefers_the_least_loaded_schedulable_node() -> None:
    def node(name: str, cidr: str | None, cordoned: bool = False) -> Resource:
        status = f"status: {{podCIDR: {cidr}}}\n" if cidr else ""
        return parse_one(
            f"apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {{name: {name}}}\n"
            f"spec: {{unschedulable: {str(cordoned).lower()}}}\n{status}"
        )

    nodes = [
        node("a", "10.244.0.0/24"),
        node("b", "10.244.1.0/24"),
        node("c", "10.244.2.0/24", cordoned=True),
        node("d", None),
    ]
    busy_a = [parse_one(workload_doc(f"w{i}", "a")) for i in range(2)]
    assert choose_node(nodes, busy_a) == "b"
    assert choose_node(nodes, [parse_one(workload_doc("x", "b"))]) == "a"
    assert choose_node(nodes, []) == "a"  # a tie goes to the first name
    assert choose_node(nodes[2:], []) is None


def test_transition_times_change_only_with_the_condition_status() -> None:
    gateway = parse_one(gateway_doc())
    assert isinstance(gateway, Gateway)
    pending = gateway_status(gateway, None, None, None, "T1")
    assert condition(gateway.model_copy(update={"status": pending}), "Programmed").status == "False"
    again = gateway_status(
        gateway.model_copy(update={"status": pending}), None, None, ("NoResources", "x"), "T2"
    )
    programmed = next(c for c in again.conditions if c.type == "Programmed")
    assert (programmed.reason, programmed.message) == ("NoResources", "x")
    assert programmed.last_transition_time == "T1"  # still False


# -- the controller in a control plane -----------------------------------------------------------


def test_a_gateway_becomes_a_waypoint_on_the_least_loaded_node(cp: ControlPlane) -> None:
    apply(cp, workload_doc("a", "node-1"), workload_doc("b", "node-1"))
    apply(cp, gateway_doc())  # apply returns with the waypoint's objects in place
    account, workload, service = get(cp, "ServiceAccount"), get(cp, "Workload"), get(cp, "Service")
    assert isinstance(account, ServiceAccount)
    assert isinstance(workload, Workload) and workload.spec.node_name == "node-2"
    assert workload.status.pod_ip and workload.status.phase == "Pending"
    assert isinstance(service, Service) and service.spec.cluster_ip
    gateway = get(cp, "Gateway")
    assert [a.value for a in gateway.status.addresses] == [service.spec.cluster_ip]
    assert condition(gateway, "Accepted").status == "True"
    programmed = condition(gateway, "Programmed")
    assert (programmed.status, programmed.reason) == ("False", "Pending")
    assert programmed.observed_generation == gateway.metadata.generation


def test_updating_the_gateway_does_not_restart_or_move_the_waypoint(cp: ControlPlane) -> None:
    apply(cp, gateway_doc())
    before = get(cp, "Workload")
    apply(cp, *(workload_doc(f"w{i}", before.spec.node_name) for i in range(3)))
    apply(cp, gateway_doc(cls="meshway-waypoint", traffic="all"))
    after = get(cp, "Workload")
    assert get(cp, "Gateway").metadata.labels == {"istio.io/waypoint-for": "all"}
    assert after.metadata.resource_version == before.metadata.resource_version
    assert after.spec.node_name == before.spec.node_name


def test_programmed_follows_the_workload_phase(cp: ControlPlane) -> None:
    times = iter(["T1", "T2", "T3"])
    cp.waypoints.clock = lambda: next(times)
    apply(cp, gateway_doc())
    key = ObjectKey("Workload", "shop", "waypoint")
    assert cp.report_workload_phases({key: "Running"}) == [key]
    programmed = condition(get(cp, "Gateway"), "Programmed")
    assert (programmed.status, programmed.reason) == ("True", "Programmed")
    assert programmed.last_transition_time == "T2"
    revision = cp.store.revision
    assert cp.report_workload_phases({key: "Running"}) == []  # nothing changed, nothing written
    assert cp.store.revision == revision
    cp.report_workload_phases({key: "Pending"})
    programmed = condition(get(cp, "Gateway"), "Programmed")
    assert (programmed.status, programmed.last_transition_time) == ("False", "T3")
    with pytest.raises(ValueError, match="not one of"):
        cp.report_workload_phases({key: "Sleeping"})


def test_deleting_the_gateway_removes_what_it_owns_only(cp: ControlPlane) -> None:
    account = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: waypoint, namespace: shop}\n"
    apply(cp, account, gateway_doc())
    assert get(cp, "Workload").spec.service_account_name == "waypoint"
    assert not get(cp, "ServiceAccount").metadata.annotations  # the user's, used as it is
    cp.delete([ObjectKey("Gateway", "shop", "waypoint")])
    assert get(cp, "Workload") is None and get(cp, "Service") is None
    assert get(cp, "ServiceAccount") is not None


def test_a_class_change_removes_the_waypoint(cp: ControlPlane) -> None:
    apply(cp, gateway_doc())
    gateway = get(cp, "Gateway")
    # Admission knows only waypoint classes today; the controller must still let go of a
    # Gateway that stops being one.
    spec = gateway.spec.model_copy(update={"gateway_class_name": "some-ingress"})
    (result,) = cp.store.apply([gateway.model_copy(update={"spec": spec})])
    cp.waypoints.sync(cp.waypoints.affected([result.object]))
    assert [get(cp, k) for k in ("Workload", "Service", "ServiceAccount")] == [None] * 3
    assert get(cp, "Gateway") is not None


def test_a_waypoint_waits_for_a_node(tmp_path: Path) -> None:
    cp = make_cp(tmp_path / "state")
    try:
        apply(cp, BASE.split("---")[0], gateway_doc())
        assert get(cp, "Workload") is None and get(cp, "Service") is not None
        programmed = condition(get(cp, "Gateway"), "Programmed")
        assert "waiting for a schedulable node" in programmed.message
        apply(cp, BASE)
        assert get(cp, "Workload").spec.node_name == "node-1"
    finally:
        cp.store.close()


async def test_the_watch_reconciles_writes_made_elsewhere(cp: ControlPlane) -> None:
    """The inline sync serves `apply`; the watch catches everything else."""
    task = asyncio.create_task(cp.waypoints.run())
    try:
        cp.admission.apply([parse_one(gateway_doc())])
        async with asyncio.timeout(5):
            while get(cp, "Workload") is None:
                await asyncio.sleep(0.01)
        assert get(cp, "Gateway").status.addresses
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_restarted_control_plane_changes_nothing(tmp_path: Path) -> None:
    cp = make_cp(tmp_path / "state")
    apply(cp, BASE, gateway_doc())
    revision = cp.store.revision
    cp.store.close()
    again = make_cp(tmp_path / "state")
    try:
        again.waypoints.sync(again.waypoints.all_keys())
        assert again.store.revision == revision
    finally:
        again.store.close()


# -- identity --------------------------------------------------------------------------------------


def test_the_waypoint_identity_is_signed_for_its_node_only(cp: ControlPlane) -> None:
    apply(cp, gateway_doc())
    node = get(cp, "Workload").spec.node_name
    other = "node-1" if node == "node-2" else "node-2"
    assert ("shop", "waypoint") in cp.identities_on(node)
    assert ("shop", "waypoint") not in cp.identities_on(other)
    csr = build_csr(generate_key(), SpiffeId("cluster.local", "shop", "waypoint"))
    assert cp.sign_for_node(node, csr)
    with pytest.raises(RequestDenied, match="not"):
        cp.sign_for_node(other, csr)
    cp.delete([ObjectKey("Gateway", "shop", "waypoint")])
    with pytest.raises(RequestDenied):
        cp.sign_for_node(node, csr)


# -- xDS: a waypoint and a node proxy on one node ------------------------------------------------


@pytest.fixture
async def running(cp: ControlPlane) -> AsyncIterator[ControlPlane]:
    task = asyncio.create_task(cp.run())
    try:
        async with asyncio.timeout(10):
            await cp.serving.wait()
        yield cp
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_waypoint_and_a_node_proxy_share_a_node_credential(running: ControlPlane) -> None:
    cp = running
    apply(cp, gateway_doc(), ROUTE.replace("WEIGHT", "1"))
    token = cp.join_node("node-1")
    bundle = cp.ca.trust_bundle.to_pem()

    def client(types: list[Any]) -> XdsClient:
        return XdsClient(cp.grpc_target, "node-1", types, token=token, root_certificates=bundle)

    node_proxy, waypoint = client(node_proxy_types()), client(waypoint_types())
    updates: list[Update] = []
    waypoint.subscribe(updates.append)
    node_proxy.start()
    waypoint.start()
    try:
        await node_proxy.wait_synced(5)
        await until(lambda: "shop/waypoint" in node_proxy.snapshot(ADDRESS_TYPE))
        await until(lambda: bool(waypoint.snapshot(ROUTE_TYPE)))
        assert set(waypoint.snapshot(ROUTE_TYPE)) == {"shop/HTTPRoute/split"}
        assert "shop/waypoint" in waypoint.snapshot(ADDRESS_TYPE)
        proxies = cp.ads.syncz()
        assert [p["node"] for p in proxies] == ["node-1", "node-1"]
        assert len({p["id"] for p in proxies}) == 2
        subscribed = [cast(dict[str, Any], p["types"]) for p in proxies]
        assert sorted(ROUTE_TYPE in types for types in subscribed) == [False, True]

        updates.clear()
        apply(cp, ROUTE.replace("WEIGHT", "2"))
        await until(lambda: any(u.type_url == ROUTE_TYPE for u in updates))
        (update,) = [u for u in updates if u.type_url == ROUTE_TYPE]
        assert set(update.updated) == {"shop/HTTPRoute/split"}
        route = json.loads(update.updated["shop/HTTPRoute/split"].resource_json)
        assert route["spec"]["rules"][0]["backendRefs"][0]["weight"] == 2
    finally:
        await node_proxy.close()
        await waypoint.close()


# -- the runtime's part ----------------------------------------------------------------------------


def test_only_a_deployed_waypoint_gets_the_node_credential(tmp_path: Path) -> None:
    gateway = parse_one(gateway_doc())
    assert isinstance(gateway, Gateway)
    waypoint = desired_objects(gateway, "node-1", python="/py")[2]
    assert isinstance(waypoint, Workload)
    forged = waypoint.model_copy(
        update={"metadata": waypoint.metadata.model_copy(update={"annotations": {}})}
    )
    plain = parse_one(workload_doc("app", "node-1"))
    assert isinstance(plain, Workload)
    pod = PodState("shop", "x", "node-1", "10.244.0.2", "ns", SupervisedProcess("x", [], tmp_path))
    base = {"PATH": "/bin", "MESHWAY_CREDENTIALS": "/leaked"}
    creds = tmp_path / "node-1.yaml"
    assert is_waypoint_pod(waypoint) and not is_waypoint_pod(forged)
    assert not is_waypoint_pod(plain)
    env = pod_environment(waypoint, pod, base, creds)
    assert env["MESHWAY_CREDENTIALS"] == str(creds) and env["POD_NAMESPACE"] == "shop"
    assert "MESHWAY_CREDENTIALS" not in pod_environment(plain, pod, base, None)


@pytest.mark.parametrize(
    ("process", "phase"),
    [
        ("Running", "Running"),
        ("Pending", "Pending"),
        ("Restarting", "Pending"),
        ("CrashLoopBackOff", "Pending"),
        ("Failed: [Errno 2] No such file", "Failed"),
    ],
)
def test_process_phases_map_to_workload_phases(process: str, phase: str) -> None:
    assert workload_phase(process) == phase


# -- the CLI against a served control plane --------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ControlPlane, dict[str, str]]]:
    """A control plane serving its admin API from a thread, and the CLI's environment."""
    port = free_port()
    cp = make_cp(tmp_path / "state", admin_port=port)
    apply(cp, BASE)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    task: asyncio.Task[None] = loop.create_task(cp.run(on_ready=lambda _: ready.set()))

    def serve() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()

    thread = threading.Thread(target=serve, name="controlplane", daemon=True)
    thread.start()
    assert ready.wait(30), "control plane did not start"
    env = {"MESHWAY_SERVER": f"http://127.0.0.1:{port}", "MESHWAY_TOKEN": cp.admin_token}
    try:
        yield cp, env
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(30)


def meshway(env: dict[str, str], *args: str) -> Any:
    return CliRunner(env=env).invoke(app, list(args))


def listed(env: dict[str, str], *args: str) -> list[dict[str, str]]:
    result = meshway(env, "waypoint", "list", "-o", "json", *args)
    assert result.exit_code == 0, result.output
    rows: list[dict[str, str]] = json.loads(result.stdout)["items"]
    return rows


def test_cli_apply_list_delete(served: tuple[ControlPlane, dict[str, str]]) -> None:
    _, env = served
    result = meshway(env, "waypoint", "apply", "-n", "shop", "--for", "all", "--enroll-namespace")
    assert result.exit_code == 0, result.output
    assert "waypoint shop/waypoint applied" in result.stdout
    assert 'namespace shop labeled with "istio.io/use-waypoint: waypoint"' in result.stdout
    (row,) = listed(env, "-n", "shop")
    assert (row["name"], row["for"], row["programmed"]) == ("waypoint", "all", "False (Pending)")
    assert row["node"] in ("node-1", "node-2") and row["address"].startswith("10.96.0.")
    assert listed(env) == []  # the default namespace has none
    assert [r["namespace"] for r in listed(env, "-A")] == ["shop"]

    # The runtime's phase report, through the admin API, makes it Programmed.
    headers = {"Authorization": f"Bearer {env['MESHWAY_TOKEN']}"}
    url = f"{env['MESHWAY_SERVER']}/api/v1/workloads/status"
    item = {"namespace": "shop", "name": "waypoint", "phase": "Running"}
    assert httpx.post(url, json={"items": [item]}, headers=headers).json()["updated"] == 1
    bad = httpx.post(url, json={"items": [{**item, "phase": "Asleep"}]}, headers=headers)
    assert bad.status_code == 400 and "Asleep" in bad.json()["error"]
    assert listed(env, "-n", "shop")[0]["programmed"] == "True"

    # Re-applying without --for keeps the traffic label; --wait returns at once when ready.
    result = meshway(env, "waypoint", "apply", "-n", "shop", "--wait")
    assert result.exit_code == 0 and "unchanged" in result.stdout and "ready" in result.stdout

    result = meshway(env, "waypoint", "delete", "-n", "shop")
    assert result.exit_code == 0, result.output
    assert 'label "istio.io/use-waypoint" removed' in result.stdout
    assert listed(env, "-A") == []
    namespace = yaml.safe_load(meshway(env, "get", "ns", "shop", "-o", "yaml").stdout)
    assert namespace["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    workloads = json.loads(meshway(env, "get", "wl", "-n", "shop", "-o", "json").stdout)
    assert workloads["items"] == []


def test_cli_errors(served: tuple[ControlPlane, dict[str, str]]) -> None:
    _, env = served
    bad_for = meshway(env, "waypoint", "apply", "-n", "shop", "--for", "everything")
    assert bad_for.exit_code == 2 and "service, workload, all, none" in bad_for.output
    reserved = meshway(env, "waypoint", "apply", "-n", "shop", "--name", "none")
    assert reserved.exit_code == 2 and "reserved" in reserved.output
    no_ns = meshway(env, "waypoint", "apply", "-n", "nowhere")
    assert no_ns.exit_code == 1 and "namespace 'nowhere' not found" in no_ns.output
    missing = meshway(env, "waypoint", "delete", "-n", "shop", "ghost")
    assert missing.exit_code == 1 and "no waypoint ghost" in missing.output

    assert meshway(env, "waypoint", "apply", "-n", "shop", "--enroll-namespace").exit_code == 0
    switch = meshway(env, "waypoint", "apply", "-n", "shop", "--name", "w2", "--enroll-namespace")
    assert switch.exit_code == 1 and "--overwrite" in switch.output
    managed = meshway(env, "delete", "svc", "waypoint", "-n", "shop")
    assert managed.exit_code == 1 and "managed by Gateway shop/waypoint" in managed.output
    both = meshway(env, "waypoint", "delete", "-n", "shop", "--all", "waypoint")
    assert both.exit_code == 2


def test_cli_generate_prints_the_gateway() -> None:
    result = CliRunner().invoke(app, ["waypoint", "generate", "-n", "shop", "--for", "workload"])
    assert result.exit_code == 0, result.output
    gateway = parse_one(result.stdout)
    assert isinstance(gateway, Gateway)
    assert gateway.spec.gateway_class_name == "istio-waypoint"
    assert gateway.waypoint_for == "workload" and gateway.key.namespace == "shop"
