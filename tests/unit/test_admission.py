"""Admission: address assignment and cross-object checks in front of the store."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from meshway.config.errors import ConfigError
from meshway.config.loader import parse_sources_with_origins
from meshway.config.model import Gateway, GatewayStatus, Node, ObjectKey, Service, Workload
from meshway.config.store import SqliteStore
from meshway.controlplane.admission import Admission, ClusterNetwork

pytestmark = pytest.mark.unit

BASE = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {name: node-1}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {name: node-2}
"""


def workload(name: str, node: str = "node-1") -> str:
    return (
        f"apiVersion: meshway.io/v1alpha1\nkind: Workload\n"
        f"metadata: {{name: {name}, namespace: shop}}\n"
        f"spec: {{nodeName: {node}, command: [sleep, '1']}}\n"
    )


def service(name: str, cluster_ip: str | None = None) -> str:
    ip = f", clusterIP: {cluster_ip}" if cluster_ip else ""
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n"
        f"spec: {{selector: {{app: {name}}}, ports: [{{port: 80}}]{ip}}}\n"
    )


def admit(adm: Admission, *docs: str) -> None:
    objects, origins = parse_sources_with_origins([("t.yaml", "---\n".join(docs))])
    adm.apply(objects, origins)


@pytest.fixture
def adm(tmp_path: Path) -> Admission:
    admission = Admission(
        SqliteStore(tmp_path / "s.db"),
        ClusterNetwork.parse("10.244.0.0/22", "10.96.0.0/29", node_prefix=24),
    )
    admit(admission, BASE)
    return admission


def get(adm: Admission, kind: str, name: str, ns: str = "shop") -> object:
    return adm.store.get(ObjectKey(kind, ns if kind not in ("Node", "Namespace") else "", name))


def test_nodes_get_distinct_cidrs_and_workloads_ips_inside_them(adm: Admission) -> None:
    n1, n2 = get(adm, "Node", "node-1"), get(adm, "Node", "node-2")
    assert isinstance(n1, Node) and isinstance(n2, Node)
    assert (n1.status.pod_cidr, n2.status.pod_cidr) == ("10.244.0.0/24", "10.244.1.0/24")
    admit(adm, workload("a"), workload("b"), workload("c", "node-2"))
    ips = {}
    for name in "abc":
        wl = get(adm, "Workload", name)
        assert isinstance(wl, Workload)
        ips[name] = wl.status.pod_ip
    # .1 is the node's gateway; addresses are handed out lowest first.
    assert ips == {"a": "10.244.0.2", "b": "10.244.0.3", "c": "10.244.1.2"}


def test_workload_ip_is_stable_and_reused_only_after_delete(adm: Admission) -> None:
    admit(adm, workload("a"), workload("b"))
    admit(adm, workload("a").replace("command: [sleep, '1']", "command: [sleep, '2']"))
    wl = get(adm, "Workload", "a")
    assert isinstance(wl, Workload) and wl.status.pod_ip == "10.244.0.2"
    adm.delete([ObjectKey("Workload", "shop", "a")])
    admit(adm, workload("z"))
    z = get(adm, "Workload", "z")
    assert isinstance(z, Workload) and z.status.pod_ip == "10.244.0.2"


def test_user_status_is_not_trusted(adm: Admission) -> None:
    admit(adm, workload("a") + "status: {podIP: 10.9.9.9}\n")
    wl = get(adm, "Workload", "a")
    assert isinstance(wl, Workload) and wl.status.pod_ip == "10.244.0.2"


def test_node_cidrs_run_out_with_a_clear_error(adm: Admission) -> None:
    admit(
        adm,
        *(
            f"apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {{name: n{i}}}\n"
            for i in range(2)
        ),
    )
    with pytest.raises(ConfigError) as caught:
        admit(adm, "apiVersion: meshway.io/v1alpha1\nkind: Node\nmetadata: {name: one-too-many}\n")
    (issue,) = caught.value.issues
    assert issue.path == "status.podCIDR" and "no free /24" in issue.message
    assert issue.object == "Node one-too-many"


def test_service_vips_fixed_auto_and_conflicts(adm: Admission) -> None:
    # The explicit address in the same batch is kept out of automatic assignment.
    admit(adm, service("a"), service("b", "10.96.0.2"))
    a, b = get(adm, "Service", "a"), get(adm, "Service", "b")
    assert isinstance(a, Service) and isinstance(b, Service)
    assert (a.spec.cluster_ip, b.spec.cluster_ip) == ("10.96.0.3", "10.96.0.2")
    # Omitting clusterIP on update keeps the assigned one.
    admit(adm, service("a"))
    again = get(adm, "Service", "a")
    assert isinstance(again, Service) and again.spec.cluster_ip == "10.96.0.3"

    with pytest.raises(ConfigError) as conflict:
        admit(adm, service("c", "10.96.0.2"))
    assert "already used by Service shop/b" in conflict.value.issues[0].message
    assert conflict.value.issues[0].source == "t.yaml"
    with pytest.raises(ConfigError) as outside:
        admit(adm, service("d", "10.100.0.1"))
    assert "not in the service CIDR" in outside.value.issues[0].message
    with pytest.raises(ConfigError) as changed:
        admit(adm, service("a", "10.96.0.5"))
    assert "immutable" in changed.value.issues[0].message


def test_service_cidr_exhaustion_rejects_the_whole_batch(adm: Admission) -> None:
    # A /29 has 6 hosts; the first is reserved, so 5 VIPs.
    with pytest.raises(ConfigError) as caught:
        admit(adm, *(service(f"s{i}") for i in range(6)))
    assert "exhausted" in caught.value.issues[0].message
    assert adm.store.list("Service") == []


def test_network_plan_cannot_change_under_existing_objects(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    first = Admission(store, ClusterNetwork.parse("10.244.0.0/16", "10.96.0.0/16"))
    admit(first, BASE)
    with pytest.raises(ValueError, match="cannot change"):
        Admission(store, ClusterNetwork.parse("10.245.0.0/16", "10.96.0.0/16"))


def test_cluster_network_validation() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        ClusterNetwork.parse("10.0.0.0/8", "10.96.0.0/16")
    with pytest.raises(ValueError, match="does not fit"):
        ClusterNetwork.parse("10.244.0.0/16", "10.96.0.0/16", node_prefix=8)
    net = ClusterNetwork.parse("10.244.0.0/16", "10.96.0.0/16")
    assert net.pod_cidr == ipaddress.ip_network("10.244.0.0/16")


# -- status and objects the control plane manages ------------------------------------------------

GATEWAY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


def managed(text: str) -> str:
    """`text` with the annotation the waypoint controller puts on what it creates."""
    return text.replace(
        "metadata: {name: waypoint, namespace: shop}",
        "metadata: {name: waypoint, namespace: shop, "
        "annotations: {meshway.io/managed-by: Gateway/waypoint}}",
    )


def problems(adm: Admission, *docs: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        admit(adm, *docs)
    return [(i.path, i.message) for i in caught.value.issues]


def test_status_is_kept_from_the_store_not_taken_from_the_user(adm: Admission) -> None:
    admit(adm, workload("a"), GATEWAY)
    wl = get(adm, "Workload", "a")
    gw = get(adm, "Gateway", "waypoint")
    assert isinstance(wl, Workload) and isinstance(gw, Gateway)
    # What the runtime and the controller write (outside admission) ...
    running = wl.model_copy(update={"status": wl.status.model_copy(update={"phase": "Running"})})
    status = GatewayStatus.model_validate({"addresses": [{"value": "10.96.0.2"}]})
    adm.store.apply([running, gw.model_copy(update={"status": status})])
    # ... survives a user's re-apply, which then changes nothing.
    revision = adm.store.revision
    admit(adm, workload("a") + "status: {phase: Failed}\n", GATEWAY)
    assert adm.store.revision == revision
    wl, gw = get(adm, "Workload", "a"), get(adm, "Gateway", "waypoint")
    assert isinstance(wl, Workload) and wl.status.phase == "Running"
    assert isinstance(gw, Gateway) and gw.status.addresses[0].value == "10.96.0.2"


def test_managed_objects_change_only_through_their_gateway(adm: Admission) -> None:
    admit(adm, GATEWAY)
    objects, _ = parse_sources_with_origins([("c", managed(service("waypoint")))])
    adm.apply(objects, controller=True)
    svc_key = ObjectKey("Service", "shop", "waypoint")

    assert problems(adm, service("waypoint")) == [
        ("metadata", "managed by Gateway shop/waypoint: change or delete the Gateway instead")
    ]
    with pytest.raises(ConfigError, match="managed by Gateway shop/waypoint"):
        adm.delete([svc_key])
    # Deleting the Gateway takes what it owns with it, in the same transaction.
    deleted = adm.delete([ObjectKey("Gateway", "shop", "waypoint")])
    assert {o.key for o in deleted} == {ObjectKey("Gateway", "shop", "waypoint"), svc_key}


def test_users_cannot_impersonate_the_controller(adm: Admission) -> None:
    reserved = workload("w").replace(
        "metadata: {name: w, namespace: shop}",
        "metadata: {name: w, namespace: shop, labels: {meshway.io/proxy: waypoint}}",
    )
    found = problems(adm, reserved, managed(service("waypoint")))
    assert ("metadata.labels[meshway.io/proxy]", found[0][1]) == found[0]
    assert "reserved for the waypoints" in found[0][1]
    assert found[1][0] == "metadata.annotations[meshway.io/managed-by]"


def test_a_waypoint_and_a_users_object_cannot_share_a_name(adm: Admission) -> None:
    admit(adm, service("waypoint"))
    ((path, message),) = problems(adm, GATEWAY)
    assert path == "metadata.name" and "Service shop/waypoint exists" in message
    adm.delete([ObjectKey("Service", "shop", "waypoint")])
    admit(adm, GATEWAY)
    ((path, message),) = problems(adm, workload("waypoint"))
    assert path == "metadata.name" and "waypoint of Gateway shop/waypoint" in message
