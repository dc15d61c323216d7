"""The xDS client the node proxy and the waypoint use.

It holds one delta ADS stream to the control plane, keeps a local snapshot of every subscribed
type, and tells subscribers what changed. The data path reads the snapshot; only this client
writes it. A response whose resources fail to decode or fail a validator is NACKed: the good
resources in it are applied, the bad ones keep their last good version, and the NACK carries
the reasons so that the control plane can show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from meshway.xds.channel import GrpcChannel, GrpcError, StatusCode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
# A validator raises ValueError with a reason to reject a resource.
Validator = Callable[[str, Any], None]

# The name in the control plane's serving certificate, whatever address it is reached at.
CONTROL_PLANE_NAME = "meshway-controlplane"
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


@dataclass(frozen=True)
class ResourceType(Generic[M]):
    """A type URL, the message class its resources decode to, and optional validators."""

    type_url: str
    message: type[M]
    validators: Sequence[Validator] = ()


@dataclass(frozen=True)
class Update:
    """What one response changed; `resources` maps names to decoded messages."""

    type_url: str
    version: str
    updated: Mapping[str, Any]
    removed: frozenset[str]


@dataclass
class _TypeSnapshot:
    resources: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    version: str = ""
    received: asyncio.Event = field(default_factory=asyncio.Event)


class XdsClient:
    """A reconnecting delta ADS client with a local snapshot and change subscribers."""

    def __init__(
        self,
        target: str,
        node_id: str,
        types: Sequence[ResourceType[Any]],
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        node_metadata: Mapping[str, str] | None = None,
        subscriptions: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.target = target
        self.node_id = node_id
        self.types = {t.type_url: t for t in types}
        self._token = token
        self._root_certificates = root_certificates
        self._metadata = dict(node_metadata or {})
        self._subscriptions = {k: list(v) for k, v in (subscriptions or {}).items()}
        self._snapshots = {t: _TypeSnapshot() for t in self.types}
        self._subscribers: list[Callable[[Update], None]] = []
        self.connected = asyncio.Event()
        self.nacks = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    # -- reading the snapshot ----------------------------------------------------------------

    def snapshot(self, type_url: str) -> Mapping[str, Any]:
        return self._snapshots[type_url].resources

    def version(self, type_url: str) -> str:
        return self._snapshots[type_url].version

    def subscribe(self, callback: Callable[[Update], None]) -> None:
        self._subscribers.append(callback)

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Until every type has received its first response since start."""
        async with asyncio.timeout(timeout):
            for snap in self._snapshots.values():
                await snap.received.wait()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"xds-client-{self.node_id}")
        return self._task

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        """Stream until cancelled, reconnecting with jittered exponential backoff."""
        backoff = 0.1
        while True:
            try:
                await self._stream_once()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except GrpcError as exc:
                self.last_error = f"{exc.code.name}: {exc.details}"
                if exc.code in (StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED):
                    log.error("xDS stream refused: %s", self.last_error)
                else:
                    log.warning("xDS stream to %s broke: %s", self.target, self.last_error)
            except Exception as exc:  # a bug in a subscriber must not end the stream for good
                self.last_error = repr(exc)
                log.exception("xDS stream failed")
            self.connected.clear()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 5.0)

    async def _stream_once(self) -> None:
        channel = GrpcChannel(
            self.target,
            root_certificates=self._root_certificates,
            server_name=CONTROL_PLANE_NAME if self._root_certificates is not None else None,
        )
        metadata = (("authorization", f"Bearer {self._token}"),) if self._token else ()
        try:
            async with channel.stream(
                ADS_METHOD, discovery_pb2.DeltaDiscoveryResponse, metadata=metadata
            ) as call:
                for type_url in self.types:
                    call.send(self._initial_request(type_url))
                async for response in call:
                    self.connected.set()
                    call.send(self._handle(response))
        finally:
            await channel.close()

    def _initial_request(self, type_url: str) -> discovery_pb2.DeltaDiscoveryRequest:
        node = base_pb2.Node(id=self.node_id, user_agent_name="meshway")
        for key, value in self._metadata.items():
            node.metadata.fields[key].string_value = value
        return discovery_pb2.DeltaDiscoveryRequest(
            node=node,
            type_url=type_url,
            resource_names_subscribe=self._subscriptions.get(type_url, []),
            initial_resource_versions=self._snapshots[type_url].versions,
        )

    # -- applying a response -----------------------------------------------------------------

    def _handle(
        self, response: discovery_pb2.DeltaDiscoveryResponse
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        type_url = response.type_url
        rtype = self.types.get(type_url)
        ack = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)
        if rtype is None:
            ack.error_detail.CopyFrom(
                status_pb2.Status(
                    code=StatusCode.INVALID_ARGUMENT, message=f"unknown type {type_url}"
                )
            )
            return ack
        snap = self._snapshots[type_url]
        updated: dict[str, Any] = {}
        errors: list[str] = []
        for resource in response.resources:
            try:
                updated[resource.name] = self._decode(rtype, resource)
            except ValueError as exc:
                errors.append(f"{resource.name}: {exc}")
        removed = frozenset(n for n in response.removed_resources if n in snap.resources)
        for name, message in updated.items():
            snap.resources[name] = message
        versions = {r.name: r.version for r in response.resources if r.name in updated}
        snap.versions.update(versions)
        for name in removed:
            snap.resources.pop(name, None)
            snap.versions.pop(name, None)
        snap.version = response.system_version_info
        snap.received.set()
        if updated or removed:
            update = Update(type_url, response.system_version_info, updated, removed)
            for callback in self._subscribers:
                callback(update)
        if errors:
            self.nacks += 1
            message = f"rejected {len(errors)} resource(s): " + "; ".join(errors[:10])
            log.warning("NACK %s version %s: %s", type_url, response.system_version_info, message)
            ack.error_detail.CopyFrom(
                status_pb2.Status(code=StatusCode.INVALID_ARGUMENT, message=message)
            )
        return ack

    @staticmethod
    def _decode(rtype: ResourceType[Any], resource: discovery_pb2.Resource) -> Any:
        if resource.resource.type_url != rtype.type_url:
            raise ValueError(f"carries {resource.resource.type_url}, expected {rtype.type_url}")
        message = rtype.message()
        try:
            message.ParseFromString(resource.resource.value)
        except DecodeError as exc:
            raise ValueError(f"cannot decode: {exc}") from exc
        for validate in rtype.validators:
            validate(resource.name, message)
        return message
