"""MeshTranslator: config objects to node-proxy xDS resources, recomputing only what changed."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from meshway.api.v1 import address_pb2, authorization_pb2, route_pb2
from meshway.config.model import KINDS, HTTPRoute, Resource
from meshway.config.store import EventType, WatchEvent
from meshway.controlplane.translate import MeshSettings, MeshTranslator
from meshway.xds.server import Change
from meshway.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE, ROUTE_TYPE, check_route

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


# --------------------------------------------------------------------------- routes (waypoints)


def http_route(name: str, weight: int = 90, created: str = "2026-01-01T00:00:00Z") -> Resource:
    return obj(
        "HTTPRoute",
        name,
        metadata={"creationTimestamp": created, "resourceVersion": "5"},
        spec={
            "parentRefs": [{"group": "", "kind": "Service", "name": "backend", "port": 80}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                    "backendRefs": [
                        {"name": "backend-v1", "port": 80, "weight": weight},
                        {"name": "backend-v2", "port": 80, "weight": 100 - weight},
                    ],
                }
            ],
        },
    )


def grpc_route(name: str) -> Resource:
    return obj(
        "GRPCRoute",
        name,
        spec={
            "parentRefs": [{"group": "", "kind": "Service", "name": "greeter"}],
            "rules": [{"matches": [{"method": {"service": "shop.Greeter"}}]}],
        },
    )


def decode_route(change: Change, name: str) -> route_pb2.Route:
    msg = route_pb2.Route()
    msg.ParseFromString(change.updated[name].proto.resource.value)
    return msg


def test_each_route_is_one_resource_with_its_json_and_age() -> None:
    t = MeshTranslator(MeshSettings())
    changes = by_type(t.full([*mesh(), http_route("split"), grpc_route("greet")], "1"))
    routes = changes[ROUTE_TYPE]
    assert set(routes.updated) == {"shop/HTTPRoute/split", "shop/GRPCRoute/greet"}
    msg = decode_route(routes, "shop/HTTPRoute/split")
    assert (msg.kind, msg.namespace, msg.name) == ("HTTPRoute", "shop", "split")
    assert msg.creation_timestamp == "2026-01-01T00:00:00Z"
    check_route("shop/HTTPRoute/split", msg)  # the waypoint's own check accepts it
    data = json.loads(msg.resource_json)
    # The same model reads it back: one schema for the control plane and the waypoint.
    again = HTTPRoute.model_validate(data)
    assert again.spec.rules[0].backend_refs[0].weight == 90
    assert "resourceVersion" not in data["metadata"] and "status" not in data
    grpc = decode_route(routes, "shop/GRPCRoute/greet")
    assert json.loads(grpc.resource_json)["kind"] == "GRPCRoute"


def test_a_route_change_pushes_that_route_only() -> None:
    t = MeshTranslator(MeshSettings())
    t.full([*mesh(), http_route("split"), http_route("other")], "1")
    (change,) = t.apply([event(EventType.MODIFIED, http_route("split", weight=50), 2)], "2")
    assert (change.type_url, set(change.updated), change.removed) == (
        ROUTE_TYPE,
        {"shop/HTTPRoute/split"},
        set(),
    )
    data = json.loads(decode_route(change, "shop/HTTPRoute/split").resource_json)
    assert [b["weight"] for b in data["spec"]["rules"][0]["backendRefs"]] == [50, 50]

    # A new resource version or a status alone is not a change a waypoint needs.
    bumped = HTTPRoute.model_validate(
        {
            **http_route("split", weight=50).to_dict(),
            "status": {
                "parents": [
                    {
                        "parentRef": {"group": "", "kind": "Service", "name": "backend"},
                        "controllerName": "meshway.io/waypoint",
                    }
                ]
            },
        }
    )
    bumped.metadata.resource_version = "99"
    assert t.apply([event(EventType.MODIFIED, bumped, 3)], "3") == []

    (gone,) = t.apply([event(EventType.DELETED, http_route("other"), 4)], "4")
    assert (gone.type_url, gone.updated, gone.removed) == (
        ROUTE_TYPE,
        {},
        {"shop/HTTPRoute/other"},
    )
    # Other kinds of change do not touch routes.
    moved = workload("frontend-1", {"app": "frontend", "x": "y"}, "10.244.0.2")
    assert [c.type_url for c in t.apply([event(EventType.MODIFIED, moved, 5)], "5")] == [
        ADDRESS_TYPE
    ]


def test_destination_rules_reach_waypoints_with_the_routes() -> None:
    t = MeshTranslator(MeshSettings())
    dr = obj(
        "DestinationRule",
        "backend",
        spec={
            "host": "backend",
            "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
        },
    )
    routes = by_type(t.full([*mesh(), dr], "1"))[ROUTE_TYPE]
    msg = decode_route(routes, "shop/DestinationRule/backend")
    check_route("shop/DestinationRule/backend", msg)
    assert json.loads(msg.resource_json)["spec"]["subsets"][0]["name"] == "v1"
    changed = obj("DestinationRule", "backend", spec={"host": "backend"})
    (change,) = t.apply([event(EventType.MODIFIED, changed, 2)], "2")
    assert (change.type_url, set(change.updated)) == (ROUTE_TYPE, {"shop/DestinationRule/backend"})
    (gone,) = t.apply([event(EventType.DELETED, changed, 3)], "3")
    assert gone.removed == {"shop/DestinationRule/backend"}


def test_rate_limit_policies_reach_waypoints_with_the_routes() -> None:
    t = MeshTranslator(MeshSettings())
    spec = {
        "targetRefs": [{"kind": "Service", "name": "backend"}],
        "limits": [{"name": "all", "requests": 10, "scope": "Global"}],
        "failureMode": "Closed",
    }
    rlp = obj("RateLimitPolicy", "limits", spec=spec)
    routes = by_type(t.full([*mesh(), rlp], "1"))[ROUTE_TYPE]
    msg = decode_route(routes, "shop/RateLimitPolicy/limits")
    check_route("shop/RateLimitPolicy/limits", msg)
    data = json.loads(msg.resource_json)
    assert data["spec"]["failureMode"] == "Closed"
    assert data["spec"]["limits"][0]["scope"] == "Global"
    changed = obj("RateLimitPolicy", "limits", spec={**spec, "failureMode": "Open"})
    (change,) = t.apply([event(EventType.MODIFIED, changed, 2)], "2")
    assert (change.type_url, set(change.updated)) == (ROUTE_TYPE, {"shop/RateLimitPolicy/limits"})
    (gone,) = t.apply([event(EventType.DELETED, changed, 3)], "3")
    assert gone.removed == {"shop/RateLimitPolicy/limits"}


def test_target_ref_request_authentications_reach_waypoints_selector_ones_do_not() -> None:
    t = MeshTranslator(MeshSettings())
    rule = {"issuer": "https://issuer.example", "jwksUri": "file:///etc/meshway/jwks.json"}
    on_service = obj(
        "RequestAuthentication",
        "jwt",
        spec={"targetRefs": [{"kind": "Service", "name": "backend"}], "jwtRules": [rule]},
    )
    on_pods = obj(
        "RequestAuthentication",
        "pods",
        spec={"selector": {"matchLabels": {"app": "backend"}}, "jwtRules": [rule]},
    )
    routes = by_type(t.full([*mesh(), on_service, on_pods], "1"))[ROUTE_TYPE]
    assert set(routes.updated) == {"shop/RequestAuthentication/jwt"}
    msg = decode_route(routes, "shop/RequestAuthentication/jwt")
    check_route("shop/RequestAuthentication/jwt", msg)
    assert json.loads(msg.resource_json)["spec"]["jwtRules"][0]["jwksUri"] == rule["jwksUri"]
    # From targetRefs to a selector: the waypoints lose it.
    moved = obj(
        "RequestAuthentication",
        "jwt",
        spec={"selector": {"matchLabels": {"app": "backend"}}, "jwtRules": [rule]},
    )
    (change,) = t.apply([event(EventType.MODIFIED, moved, 2)], "2")
    assert (change.type_url, change.removed) == (ROUTE_TYPE, {"shop/RequestAuthentication/jwt"})


@pytest.mark.parametrize(
    ("name", "mutate", "error"),
    [
        ("shop/HTTPRoute/other", lambda m: None, "does not match route"),
        ("shop/HTTPRoute/split", lambda m: setattr(m, "resource_json", "{"), "not JSON"),
        ("shop/Gateway/split", lambda m: setattr(m, "kind", "Gateway"), "is not one of"),
        (
            "shop/GRPCRoute/split",
            lambda m: setattr(m, "kind", "GRPCRoute"),
            "does not describe GRPCRoute",
        ),
        (
            "shop/HTTPRoute/split",
            lambda m: setattr(
                m, "resource_json", m.resource_json.replace('"PathPrefix"', '"Glob"')
            ),
            "Glob",
        ),
    ],
)
def test_check_route_rejects_what_the_waypoint_could_not_use(
    name: str, mutate: Any, error: str
) -> None:
    t = MeshTranslator(MeshSettings())
    msg = decode_route(
        by_type(t.full([http_route("split")], "1"))[ROUTE_TYPE], "shop/HTTPRoute/split"
    )
    mutate(msg)
    with pytest.raises(ValueError, match=error):
        check_route(name, msg)


def test_target_ref_policies_reach_waypoints() -> None:
    t = MeshTranslator(MeshSettings())
    policy = obj(
        "AuthorizationPolicy",
        "backend-l7",
        spec={
            "targetRefs": [{"kind": "Service", "group": "", "name": "backend"}],
            "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}]}],
        },
    )
    t.full(mesh(), "1")
    changes = by_type(t.apply([event(EventType.ADDED, policy, 2)], "2"))
    # Not attached to any workload by selector: only the policy itself is pushed.
    assert set(changes) == {AUTHORIZATION_TYPE}
    msg = authorization_pb2.Authorization()
    msg.ParseFromString(changes[AUTHORIZATION_TYPE].updated["shop/backend-l7"].proto.resource.value)
    assert msg.scope == authorization_pb2.TARGET_REF
    assert [(r.kind, r.name, r.namespace) for r in msg.target_refs] == [
        ("Service", "backend", "shop")
    ]
    assert list(msg.rules[0].to[0].methods) == ["GET"]


def test_a_waypoint_does_not_route_through_itself() -> None:
    t = MeshTranslator(MeshSettings())
    objs = [o for o in mesh() if o.KIND != "Namespace" or o.metadata.name != "shop"]
    labels = {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}
    objs.append(obj("Namespace", "shop", None, metadata={"labels": labels}))
    objs.append(
        obj(
            "Gateway",
            "waypoint",
            metadata={"labels": {"istio.io/waypoint-for": "all"}},
            spec={
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        )
    )
    own = {"gateway.networking.k8s.io/gateway-name": "waypoint"}
    objs.append(service("waypoint", own, "10.96.0.99", **own))
    objs.append(workload("waypoint", {**own, "istio.io/dataplane-mode": "none"}, "10.244.0.9"))
    changes = by_type(t.full(objs, "1"))[ADDRESS_TYPE]
    backend = decode_address(changes, "shop/backend.shop.svc.cluster.local").service
    assert backend.waypoint.service == "shop/waypoint.shop.svc.cluster.local"
    assert decode_address(changes, "shop/backend-1").workload.HasField("waypoint")  # for: all
    assert not decode_address(changes, "shop/waypoint.shop.svc.cluster.local").service.HasField(
        "waypoint"
    )
    own_wl = decode_address(changes, "shop/waypoint").workload
    assert not own_wl.HasField("waypoint") and own_wl.tunnel_protocol == address_pb2.NONE
