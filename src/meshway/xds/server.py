"""Incremental (delta) Aggregated Discovery Service.

The server knows nothing of Meshway's configuration: it serves named, versioned resources per
type URL from a `ResourceCache` that the control plane fills, and it implements the transport
semantics of the xDS protocol for each connected proxy:

- the first request of a type gets the full state (and removals for names the client claims
  to have that no longer exist);
- a change to some resources sends those resources only, to the connections subscribed to them;
- every response carries a nonce; a request echoing it with no `error_detail` is an ACK, with an
  `error_detail` a NACK: the NACK is recorded (and shown by syncz), and the rejected versions are
  not sent again until they change;
- wildcard and named subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from meshway.telemetry.metrics import CONTROLPLANE

log = logging.getLogger(__name__)

# The proxies ping every 30 s (`xds.channel`) on streams that may carry no data for hours.
# gRPC servers by default allow a ping only every 5 minutes without data and answer more with
# GOAWAY "too_many_pings", which dropped every proxy's xDS stream (and made it fetch
# everything again) every few minutes.
SERVER_GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)

Authenticator = Callable[[grpc.aio.ServicerContext], Awaitable[str]]


class SyncStatus(enum.StrEnum):
    SYNCED = "SYNCED"
    STALE = "STALE"
    NACKED = "NACKED"
    NOT_SENT = "NOT SENT"


@dataclass(frozen=True, slots=True)
class CachedResource:
    """One resource ready for the wire, built once and shared by every connection."""

    name: str
    version: str
    proto: discovery_pb2.Resource

    @classmethod
    def build(cls, name: str, version: str, message: object, type_url: str) -> CachedResource:
        packed = any_pb2.Any(type_url=type_url, value=message.SerializeToString(deterministic=True))  # type: ignore[attr-defined]
        return cls(
            name, version, discovery_pb2.Resource(name=name, version=version, resource=packed)
        )


@dataclass(slots=True)
class Change:
    """A set of resource changes of one type, pushed together."""

    type_url: str
    updated: dict[str, CachedResource]
    removed: set[str]
    version: str
    started: float = field(default_factory=time.monotonic)
    # A connection's first response of a type: large, so their number in flight is bounded.
    full_state: bool = False


class ResourceCache:
    """The desired state per type URL, and the fan-out of changes to connections."""

    def __init__(self, type_urls: Iterable[str]) -> None:
        self.resources: dict[str, dict[str, CachedResource]] = {t: {} for t in type_urls}
        self.version = "0"
        self._connections: set[_Connection] = set()
        self.ready = asyncio.Event()

    def apply(self, changes: Iterable[Change]) -> None:
        for change in changes:
            current = self.resources[change.type_url]
            current.update(change.updated)
            for name in change.removed:
                current.pop(name, None)
            self.version = change.version
            if change.updated or change.removed:
                for conn in self._connections:
                    conn.enqueue(change)

    @property
    def connections(self) -> set[_Connection]:
        return self._connections


@dataclass(slots=True)
class _TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    # No per-resource bookkeeping: a connection is sent every change of the resources it wants,
    # in order, so what it holds is the cache as of its last response. That keeps a connection's
    # memory constant however large the mesh (100 proxies x 11,000 resources would otherwise
    # mean a million dict entries). A NACKed version is not sent again because the cache only
    # emits a resource when its content changes.
    pending: dict[str, str] = field(default_factory=dict)
    last_nonce: str = ""
    last_version: str = ""
    acked_version: str = ""
    nacked_version: str = ""
    error: str = ""
    status: SyncStatus = SyncStatus.NOT_SENT

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


class _Connection:
    """One proxy's stream: subscriptions, what it has, what it acknowledged."""

    _ids = itertools.count(1)

    def __init__(self, node: str, peer: str, cache: ResourceCache) -> None:
        self.id = f"{node}-{next(self._ids)}"
        self.node = node
        # What the proxy calls itself: the node name (node proxy), or "<role>~<name>" for
        # another proxy on the node (a waypoint: "waypoint~<ns>/<gateway>").
        self.client_id = node
        self.peer = peer
        self.connected_at = time.time()
        self.cache = cache
        self.types: dict[str, _TypeState] = {}
        self.outbox: asyncio.Queue[Change] = asyncio.Queue()
        self._nonces = itertools.count(1)

    def enqueue(self, change: Change) -> None:
        if change.type_url in self.types:
            self.outbox.put_nowait(change)

    def handle_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        type_url = req.type_url
        if type_url not in self.cache.resources:
            log.warning("%s asked for unknown type %s", self.id, type_url)
            return
        state = self.types.get(type_url)
        first = state is None
        if state is None:
            state = self.types[type_url] = _TypeState()
            # No names, or "*", on the first request means a wildcard subscription.
            names = set(req.resource_names_subscribe)
            state.wildcard = not names or "*" in names
            state.names = names - {"*"}
            known = dict(req.initial_resource_versions)
            self.outbox.put_nowait(self._full_state(type_url, state, known))
            return
        if req.response_nonce:
            self._ack_or_nack(type_url, state, req)
        subscribe = set(req.resource_names_subscribe)
        unsubscribe = set(req.resource_names_unsubscribe)
        if "*" in subscribe:
            state.wildcard = True
        if "*" in unsubscribe:
            state.wildcard = False
        added = subscribe - {"*"} - state.names
        state.names |= subscribe - {"*"}
        state.names -= unsubscribe
        if added and not first:
            have = self.cache.resources[type_url]
            updated = {n: have[n] for n in added if n in have}
            missing = {n for n in added if n not in have}
            self.outbox.put_nowait(Change(type_url, updated, missing, self.cache.version))

    def _full_state(self, type_url: str, state: _TypeState, known: Mapping[str, str]) -> Change:
        have = self.cache.resources[type_url]
        # The client keeps what it had across reconnects: resources at the version it already
        # holds are not sent again, names it holds that no longer exist are removed.
        updated = {n: r for n, r in have.items() if state.wants(n) and known.get(n) != r.version}
        removed = {n for n in known if n not in have}
        if not state.wildcard:
            removed |= {n for n in state.names if n not in have}
        return Change(type_url, updated, removed, self.cache.version, full_state=True)

    def _ack_or_nack(
        self, type_url: str, state: _TypeState, req: discovery_pb2.DeltaDiscoveryRequest
    ) -> None:
        pending = state.pending.pop(req.response_nonce, None)
        if pending is None:
            return  # a stale nonce: the xDS spec says to ignore it
        version = pending
        if req.HasField("error_detail"):
            state.nacked_version = version
            state.error = req.error_detail.message
            state.status = SyncStatus.NACKED
            CONTROLPLANE.xds_nacks.labels(type_url=type_url).inc()
            log.warning("%s NACKed %s version %s: %s", self.id, type_url, version, state.error)
        else:
            state.acked_version = version
            if state.status is not SyncStatus.NACKED or version != state.nacked_version:
                state.error = ""
                state.status = SyncStatus.SYNCED if not state.pending else SyncStatus.STALE

    def build_response(self, change: Change) -> discovery_pb2.DeltaDiscoveryResponse | None:
        state = self.types[change.type_url]
        if state.wildcard:
            updated = list(change.updated.values())
            removed = list(change.removed)
        else:
            updated = [r for name, r in change.updated.items() if name in state.names]
            removed = [n for n in change.removed if n in state.names]
        # The first response of a type is sent even when empty: it tells the client that it
        # now holds the full state (of nothing).
        if not updated and not removed and not change.full_state:
            return None
        nonce = str(next(self._nonces))
        state.pending[nonce] = change.version
        state.last_nonce = nonce
        state.last_version = change.version
        if state.status is not SyncStatus.NACKED:
            state.status = SyncStatus.STALE
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=change.version,
            type_url=change.type_url,
            resources=[r.proto for r in updated],
            removed_resources=removed,
            nonce=nonce,
        )

    def _holding(self, type_url: str, state: _TypeState) -> int:
        have = self.cache.resources[type_url]
        return len(have) if state.wildcard else sum(1 for n in state.names if n in have)

    def syncz(self) -> dict[str, object]:
        return {
            "id": self.id,
            "node": self.node,
            "client": self.client_id,
            "peer": self.peer,
            "connected_at": self.connected_at,
            "types": {
                type_url: {
                    "status": str(state.status),
                    "sent_version": state.last_version,
                    "acked_version": state.acked_version,
                    "nacked_version": state.nacked_version or None,
                    "error": state.error or None,
                    "resources": self._holding(type_url, state),
                    "wildcard": state.wildcard,
                }
                for type_url, state in self.types.items()
            },
        }


class AggregatedDiscoveryService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Delta ADS over gRPC; State-of-the-World streams are refused with UNIMPLEMENTED."""

    def __init__(
        self, cache: ResourceCache, authenticate: Authenticator, full_state_concurrency: int = 8
    ) -> None:
        self.cache = cache
        self.authenticate = authenticate
        # When many proxies connect at once (a control-plane restart), each full state is a
        # multi-megabyte message; bounding how many are being built and written at a time
        # bounds the memory they take, as istiod's push throttle does.
        self._full_state_slots = asyncio.Semaphore(full_state_concurrency)

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Meshway serves incremental xDS only: use DeltaAggregatedResources",
        )

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        node = await self.authenticate(context)
        await self.cache.ready.wait()
        conn = _Connection(node, context.peer(), self.cache)
        self.cache.connections.add(conn)
        CONTROLPLANE.xds_connections.inc()
        log.info("xDS connection %s from %s", conn.id, conn.peer)

        async def read() -> None:
            async for req in request_iterator:
                client_id = req.node.id
                if client_id:
                    # The credential decides the node; the id only names the proxy. A proxy
                    # other than the node proxy names itself "<role>~<name>".
                    role, tilde, _ = client_id.partition("~")
                    if client_id != node and not (tilde and role):
                        await context.abort(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"node id '{client_id}' is neither the credential's node '{node}' "
                            "nor '<role>~<name>'",
                        )
                    conn.client_id = client_id
                conn.handle_request(req)

        reader = asyncio.create_task(read())
        try:
            while True:
                getter = asyncio.ensure_future(conn.outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    reader.result()  # re-raise a reader failure
                    return
                change = getter.result()
                slot = self._full_state_slots if change.full_state else contextlib.nullcontext()
                async with slot:
                    response = conn.build_response(change)
                    if response is None:
                        continue
                    await context.write(response)
                    del response
                CONTROLPLANE.xds_pushes.labels(type_url=change.type_url).inc()
                if not change.full_state:
                    CONTROLPLANE.xds_push_latency.observe(time.monotonic() - change.started)
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            self.cache.connections.discard(conn)
            CONTROLPLANE.xds_connections.dec()
            log.info("xDS connection %s closed", conn.id)

    def syncz(self) -> list[dict[str, object]]:
        return sorted((c.syncz() for c in self.cache.connections), key=lambda s: str(s["id"]))
