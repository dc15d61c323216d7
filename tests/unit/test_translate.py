"""MeshTranslator: config objects to node-proxy xDS resources, recomputing only what changed."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from meshway.api.v1 import address_pb2, authorization_pb2
from meshway.config.model import KINDS, Resource
from meshway.config.store import EventType, WatchEvent
from meshway.controlplane.translate import MeshSettings, MeshTranslator
from meshway.xds.server import Change
from meshway.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE

pytestmark = pytest.mark.unit


def obj(kind: str, name: str, namespace: str | None = "shop", **body: Any) -> Resource:
    cls = KINDS[kind]
    meta: dict[str, Any] = {"name": name, **body.pop("metadata", {})}
    if cls.NAMESPACED:
        meta["namespace"] = namespace
    return cls.model_validate(
        {"apiVersion": cls.API_VERSIONS[0], "kind": kind, "metadata": meta, **body}
    )


def workload(name: str, labels: dict[str, str], ip: str, node: str = "node-1") -> Resource:
    return obj(
        "Workload",
        name,
        metadata={"labels": labels},
        spec={
            "nodeName": node,
            "serviceAccountName": labels.get("app", "default"),
            "command": ["sleep", "1"],
            "ports": [{"name": "http", "containerPort": 8080}],
        },
        status={"podIP": ip},
    )


def service(name: str, selector: dict[str, str], vip: str, **labels: str) -> Resource:
    return obj(
        "Service",
        name,
        metadata={"labels": labels},
        spec={
            "selector": selector,
            "clusterIP": vip,
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"}],
        },
    )


def mesh() -> list[Resource]:
    return [
        obj("Namespace", "shop", None, metadata={"labels": {"istio.io/dataplane-mode": "ambient"}}),
        obj("Namespace", "istio-system", None),
        workload("frontend-1", {"app": "frontend"}, "10.244.0.2"),
        workload("backend-1", {"app": "backend", "version": "v1"}, "10.244.1.2", "node-2"),
        workload("backend-2", {"app": "backend", "version": "v2"}, "10.244.1.3", "node-2"),
        service("backend", {"app": "backend"}, "10.96.0.10"),
        obj(
            "AuthorizationPolicy",
            "backend-allow",
            spec={
                "selector": {"matchLabels": {"app": "backend"}},
                "rules": [
                    {
                        "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
                        "to": [{"operation": {"ports": ["8080"]}}],
                    }
                ],
            },
        ),
        obj(
            "AuthorizationPolicy",
            "ns-wide",
            spec={"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["shop"]}}]}]},
        ),
        obj(
            "AuthorizationPolicy",
            "mesh-wide",
            "istio-system",
            spec={"action": "AUDIT", "rules": [{}]},
        ),
    ]


def by_type(changes: list[Change]) -> dict[str, Change]:
    return {c.type_url: c for c in changes}


def decode_address(change: Change, name: str) -> address_pb2.Address:
    msg = address_pb2.Address()
    msg.ParseFromString(change.updated[name].proto.resource.value)
    return msg


def test_full_translation() -> None:
    t = MeshTranslator(MeshSettings())
    changes = by_type(t.full(mesh(), "7"))
    addresses = changes[ADDRESS_TYPE]
    assert set(addresses.updated) == {
        "shop/frontend-1",
        "shop/backend-1",
        "shop/backend-2",
        "shop/backend.shop.svc.cluster.local",
    }
    wl = decode_address(addresses, "shop/backend-1").workload
    assert ipaddress.ip_address(wl.addresses[0]) == ipaddress.ip_address("10.244.1.2")
    assert wl.tunnel_protocol == address_pb2.HBONE  # namespace is enrolled
    assert wl.service_account == "backend" and wl.node == "node-2"
    assert wl.canonical_name == "backend" and wl.canonical_revision == "v1"
    ports = wl.services["shop/backend.shop.svc.cluster.local"].ports
    assert [(p.service_port, p.target_port) for p in ports] == [(80, 8080)]  # named targetPort
    assert list(wl.authorization_policies) == ["shop/backend-allow"]
    frontend = decode_address(addresses, "shop/frontend-1").workload
    assert not frontend.services and not frontend.authorization_policies

    svc = decode_address(addresses, "shop/backend.shop.svc.cluster.local").service
    assert ipaddress.ip_address(svc.addresses[0].address) == ipaddress.ip_address("10.96.0.10")
    assert svc.ports[0].target_port_name == "http" and svc.ports[0].app_protocol == "http"

    scopes = {}
    for name, res in changes[AUTHORIZATION_TYPE].updated.items():
        msg = authorization_pb2.Authorization()
        msg.ParseFromString(res.proto.resource.value)
        scopes[name] = msg.scope
        if name == "shop/backend-allow":
            assert list(msg.rules[0].to[0].ports) == [8080]
            assert list(getattr(msg.rules[0], "from")[0].principals) == [
                "cluster.local/ns/shop/sa/frontend"
            ]
    assert scopes == {
        "shop/backend-allow": authorization_pb2.WORKLOAD_SELECTOR,
        "shop/ns-wide": authorization_pb2.NAMESPACE,
        "istio-system/mesh-wide": authorization_pb2.GLOBAL,
    }


def event(kind: EventType, o: Resource, rev: int) -> WatchEvent:
    return WatchEvent(kind, o, rev)


def test_workload_change_recomputes_only_that_workload() -> None:
    t = MeshTranslator(MeshSettings())
    t.full(mesh(), "7")
    moved = workload("frontend-1", {"app": "frontend", "tier": "web"}, "10.244.0.2")
    changes = t.apply([event(EventType.MODIFIED, moved, 8)], "8")
    assert [(c.type_url, set(c.updated), c.removed) for c in changes] == [
        (ADDRESS_TYPE, {"shop/frontend-1"}, set())
    ]


def test_service_selector_change_touches_old_and_new_endpoints() -> None:
    t = MeshTranslator(MeshSettings())
    t.full(mesh(), "7")
    narrowed = service("backend", {"app": "backend", "version": "v2"}, "10.96.0.10")
    (change,) = t.apply([event(EventType.MODIFIED, narrowed, 8)], "8")
    # backend-1 loses the service; backend-2 keeps it unchanged, so it is not re-sent.
    assert set(change.updated) == {"shop/backend-1"}
    assert not decode_address(change, "shop/backend-1").workload.services


def test_namespace_unenrolment_and_deletes() -> None:
    t = MeshTranslator(MeshSettings())
    t.full(mesh(), "7")
    plain = obj("Namespace", "shop", None)
    (change,) = t.apply([event(EventType.MODIFIED, plain, 8)], "8")
    assert {n for n in change.updated if "svc" not in n} == {
        "shop/frontend-1",
        "shop/backend-1",
        "shop/backend-2",
    }
    assert decode_address(change, "shop/frontend-1").workload.tunnel_protocol == address_pb2.NONE

    gone = [o for o in mesh() if o.metadata.name in ("backend-2", "backend-allow")]
    changes = by_type(t.apply([event(EventType.DELETED, o, 9) for o in gone], "9"))
    assert changes[ADDRESS_TYPE].removed == {"shop/backend-2"}
    assert set(changes[ADDRESS_TYPE].updated) == {"shop/backend-1"}  # lost the policy
    assert changes[AUTHORIZATION_TYPE].removed == {"shop/backend-allow"}


def test_waypoint_labels() -> None:
    t = MeshTranslator(MeshSettings())
    objs = mesh()
    objs.append(
        obj(
            "Gateway",
            "waypoint",
            metadata={"labels": {"istio.io/waypoint-for": "service"}},
            spec={
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        )
    )
    objs.append(
        service("waypoint", {"gateway.networking.k8s.io/gateway-name": "waypoint"}, "10.96.0.99")
    )
    objs = [o for o in objs if o.metadata.name != "backend" or o.KIND != "Service"]
    objs.append(
        service(
            "backend", {"app": "backend"}, "10.96.0.10", **{"istio.io/use-waypoint": "waypoint"}
        )
    )
    changes = by_type(t.full(objs, "1"))
    svc = decode_address(changes[ADDRESS_TYPE], "shop/backend.shop.svc.cluster.local").service
    assert svc.waypoint.service == "shop/waypoint.shop.svc.cluster.local"
    assert ipaddress.ip_address(svc.waypoint.address.address) == ipaddress.ip_address("10.96.0.99")
    assert svc.waypoint.hbone_mtls_port == 15008
    # waypoint-for: service, so workloads do not get it.
    wl = decode_address(changes[ADDRESS_TYPE], "shop/backend-1").workload
    assert not wl.HasField("waypoint")


def test_named_target_port_missing_on_a_workload_maps_nowhere() -> None:
    t = MeshTranslator(MeshSettings())
    objs = [o for o in mesh() if o.metadata.name != "frontend-1"]
    objs.append(
        obj(
            "Workload",
            "frontend-1",
            metadata={"labels": {"app": "backend"}},
            spec={"nodeName": "node-1", "command": ["sleep", "1"]},  # no port named "http"
            status={"podIP": "10.244.0.9"},
        )
    )
    changes = by_type(t.full(objs, "1"))
    wl = decode_address(changes[ADDRESS_TYPE], "shop/frontend-1").workload
    assert list(wl.services["shop/backend.shop.svc.cluster.local"].ports) == []


def peer_auth(
    name: str, ns: str, mode: str, selector: dict[str, str] | None = None, **extra: Any
) -> Resource:
    spec: dict[str, Any] = {"mtls": {"mode": mode}, **extra}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return obj("PeerAuthentication", name, ns, spec=spec)


def test_peer_authentication_precedence() -> None:
    t = MeshTranslator(MeshSettings())
    objs = [
        *mesh(),
        peer_auth("mesh", "istio-system", "STRICT"),
        peer_auth("ns", "shop", "UNSET"),
        peer_auth(
            "backend",
            "shop",
            "PERMISSIVE",
            {"app": "backend"},
            portLevelMtls={8080: {"mode": "STRICT"}},
        ),
    ]
    changes = by_type(t.full(objs, "1"))
    frontend = decode_address(changes[ADDRESS_TYPE], "shop/frontend-1").workload
    backend = decode_address(changes[ADDRESS_TYPE], "shop/backend-1").workload
    # The namespace policy is UNSET, so the mesh-wide STRICT applies to frontend.
    assert frontend.mtls_mode == address_pb2.MTLS_STRICT
    assert backend.mtls_mode == address_pb2.MTLS_PERMISSIVE
    assert dict(backend.port_mtls) == {8080: address_pb2.MTLS_STRICT}

    # Dropping the mesh-wide policy re-sends every workload with the default.
    (change,) = t.apply([event(EventType.DELETED, objs[-3], 2)], "2")
    assert (
        decode_address(change, "shop/frontend-1").workload.mtls_mode == address_pb2.MTLS_PERMISSIVE
    )


def test_selector_policies_in_the_root_namespace_select_across_the_mesh() -> None:
    t = MeshTranslator(MeshSettings())
    t.full(mesh(), "1")
    root_policy = obj(
        "AuthorizationPolicy",
        "backends-everywhere",
        "istio-system",
        spec={"selector": {"matchLabels": {"app": "backend"}}, "rules": [{}]},
    )
    changes = by_type(t.apply([event(EventType.ADDED, root_policy, 2)], "2"))
    assert set(changes[ADDRESS_TYPE].updated) == {"shop/backend-1", "shop/backend-2"}
    wl = decode_address(changes[ADDRESS_TYPE], "shop/backend-1").workload
    assert list(wl.authorization_policies) == [
        "shop/backend-allow",
        "istio-system/backends-everywhere",
    ]
