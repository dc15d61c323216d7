"""The mesh's own xDS resource types: their type URLs and the checks a proxy applies."""

from __future__ import annotations

from typing import Any

from meshway.api.v1 import address_pb2, authorization_pb2
from meshway.xds.client import ResourceType, Validator

ADDRESS_TYPE = "type.googleapis.com/meshway.api.v1.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/meshway.api.v1.Authorization"
NODE_PROXY_TYPE_URLS = (ADDRESS_TYPE, AUTHORIZATION_TYPE)


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
