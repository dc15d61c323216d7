"""The mesh's own xDS resource types: their type URLs and the checks a proxy applies."""

from __future__ import annotations

import json
from typing import Any

from meshway.api.v1 import address_pb2, authorization_pb2, route_pb2
from meshway.xds.client import ResourceType, Validator

ADDRESS_TYPE = "type.googleapis.com/meshway.api.v1.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/meshway.api.v1.Authorization"
ROUTE_TYPE = "type.googleapis.com/meshway.api.v1.Route"
NODE_PROXY_TYPE_URLS = (ADDRESS_TYPE, AUTHORIZATION_TYPE)
WAYPOINT_TYPE_URLS = (ADDRESS_TYPE, AUTHORIZATION_TYPE, ROUTE_TYPE)
# Everything the control plane serves.
ALL_TYPE_URLS = WAYPOINT_TYPE_URLS
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
# Tracing: Telemetry objects, and the cluster-scoped MeshConfig (namespace "") that defines
# their providers.
TRACING_CONFIG_KINDS = ("Telemetry", "MeshConfig")
# What the Route type carries to waypoints: routes, traffic policies, faults, rate limits,
# the RequestAuthentications attached with targetRefs, and tracing.
WAYPOINT_CONFIG_KINDS = (
    *ROUTE_KINDS,
    "DestinationRule",
    "VirtualService",
    "FaultInjection",
    "RateLimitPolicy",
    "RequestAuthentication",
    *TRACING_CONFIG_KINDS,
)


def route_resource_name(namespace: str, kind: str, name: str) -> str:
    return f"{namespace}/{kind}/{name}"


def check_address(name: str, msg: address_pb2.Address) -> None:
    kind = msg.WhichOneof("type")
    if kind is None:
        raise ValueError("neither a workload nor a service")
    if kind == "workload":
        wl = msg.workload
        if name != wl.uid:
            raise ValueError(f"resource name does not match workload uid '{wl.uid}'")
        for ip in wl.addresses:
            if len(ip) not in (4, 16):
                raise ValueError(f"address of {len(ip)} bytes is neither IPv4 nor IPv6")
    else:
        svc = msg.service
        if name != f"{svc.namespace}/{svc.hostname}":
            raise ValueError(
                f"resource name does not match service '{svc.namespace}/{svc.hostname}'"
            )
        for addr in svc.addresses:
            if len(addr.address) not in (4, 16):
                raise ValueError(f"address of {len(addr.address)} bytes is neither IPv4 nor IPv6")


def check_authorization(name: str, msg: authorization_pb2.Authorization) -> None:
    if name != f"{msg.namespace}/{msg.name}":
        raise ValueError(f"resource name does not match policy '{msg.namespace}/{msg.name}'")


def check_route(name: str, msg: route_pb2.Route) -> None:
    """The name matches the message, and the JSON is a valid object of the kind it claims.

    Validation uses the configuration model itself (imported here, not at module level: the
    node proxy imports this module and does not load pydantic), so a route the waypoint would
    not understand is NACKed and shows up in the control plane's sync status.
    """
    if msg.kind not in WAYPOINT_CONFIG_KINDS:
        raise ValueError(f"kind '{msg.kind}' is not one of {', '.join(WAYPOINT_CONFIG_KINDS)}")
    expected = route_resource_name(msg.namespace, msg.kind, msg.name)
    if name != expected:
        raise ValueError(f"resource name does not match route '{expected}'")
    try:
        data = json.loads(msg.resource_json)
    except ValueError as exc:
        raise ValueError(f"resource_json is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("resource_json is not a JSON object")
    metadata = data.get("metadata")
    if (
        data.get("kind") != msg.kind
        or not isinstance(metadata, dict)
        or metadata.get("name") != msg.name
        or metadata.get("namespace", "") != msg.namespace
    ):
        raise ValueError(f"resource_json does not describe {msg.kind} {msg.namespace}/{msg.name}")
    from meshway.config.model import KINDS

    KINDS[msg.kind].model_validate(data)  # pydantic's ValidationError is a ValueError


def node_proxy_types(
    extra_address: tuple[Validator, ...] = (), extra_authorization: tuple[Validator, ...] = ()
) -> list[ResourceType[Any]]:
    """The types a node proxy subscribes to, with the built-in checks plus any extra ones."""
    return [
        ResourceType(ADDRESS_TYPE, address_pb2.Address, (check_address, *extra_address)),
        ResourceType(
            AUTHORIZATION_TYPE,
            authorization_pb2.Authorization,
            (check_authorization, *extra_authorization),
        ),
    ]


def waypoint_types(
    extra_address: tuple[Validator, ...] = (),
    extra_authorization: tuple[Validator, ...] = (),
    extra_route: tuple[Validator, ...] = (),
) -> list[ResourceType[Any]]:
    """The node proxy's types plus routes: what a waypoint subscribes to."""
    return [
        *node_proxy_types(extra_address, extra_authorization),
        ResourceType(ROUTE_TYPE, route_pb2.Route, (check_route, *extra_route)),
    ]
