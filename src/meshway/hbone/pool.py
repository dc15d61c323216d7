"""Pooled HBONE connections, shared by all tunnels between the same two identities.

A connection is keyed by (source identity, destination identity, destination address), as in
ztunnel: tunnels may share a TLS session only when they would have presented and checked the
same certificates. A connection carries up to `max_streams_per_connection` tunnels; callers
that need a new connection for the same key share one dial instead of stampeding the peer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from meshway.hbone.client import DEFAULT_CONNECT_TIMEOUT, Dialer, HboneConnection
from meshway.hbone.errors import HboneError, StreamCapacityExhausted
from meshway.hbone.session import DEFAULT_MAX_CONCURRENT_STREAMS
from meshway.hbone.stream import HboneStream
from meshway.hbone.tls import TlsContextCache, WorkloadCredentials, client_context
from meshway.identity import SpiffeId

logger = logging.getLogger(__name__)

PoolKey = tuple[SpiffeId, SpiffeId, str]
DEFAULT_IDLE_TIMEOUT = 60.0
# Each round either opens a stream or waits for one dial, so this only trips if dials keep
# succeeding while other callers keep taking every new slot first.
_MAX_ROUNDS = 64
_CLOSE_TIMEOUT = 5.0


class HboneConnectionPool:
    """Opens tunnels over shared connections; connections idle for `idle_timeout` are closed."""

    def __init__(
        self,
        *,
        max_streams_per_connection: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if max_streams_per_connection < 1:
            raise ValueError("max_streams_per_connection must be at least 1")
        self.max_streams_per_connection = max_streams_per_connection
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._connections: dict[PoolKey, list[HboneConnection]] = {}
        self._dials: dict[PoolKey, asyncio.Task[HboneConnection]] = {}
        self._contexts = TlsContextCache(client_context)
        self._reaper: asyncio.TimerHandle | None = None
        self._closed = False

    async def open_stream(
        self,
        creds: WorkloadCredentials,
        expected_identity: SpiffeId,
        host: str,
        port: int,
        authority: str,
        headers: Mapping[str, str] | None = None,
        *,
        dial: Dialer | None = None,
    ) -> HboneStream:
        """A tunnel to `authority` through the peer at host:port, which must be `expected_identity`.

        `creds` are the caller's current credentials: a new connection uses them, existing
        connections keep the certificate they were made with. `dial` makes the TCP connection
        when a new one is needed (see `HboneConnection.connect`).
        """
        key: PoolKey = (creds.identity, expected_identity, f"{host}:{port}")
        for _ in range(_MAX_ROUNDS):
            if self._closed:
                raise HboneError("the HBONE connection pool is closed")
            connection = self._pick(key)
            if connection is None:
                connection = await self._shared_dial(
                    key, creds, expected_identity, host, port, dial
                )
                if connection.available_streams <= 0:
                    continue  # callers that shared the dial took every slot
            # No suspension between the pick and the HEADERS going out: the slot is ours.
            return await connection.open_stream(authority, headers)
        raise StreamCapacityExhausted(
            f"no HBONE stream slot to {host}:{port} after {_MAX_ROUNDS} dials"
        )

    def connections(self, key: PoolKey | None = None) -> list[HboneConnection]:
        """Pooled connections (for one key, or all), for introspection and tests."""
        if key is not None:
            return list(self._connections.get(key, ()))
        return [conn for conns in self._connections.values() for conn in conns]

    async def close(self) -> None:
        """Close every connection (open tunnels fail) and stop the dials in progress."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        dials = list(self._dials.values())
        for task in dials:
            task.cancel()
        connections = self.connections()
        self._connections.clear()
        for connection in connections:
            connection.close()
        if dials:
            await asyncio.wait(dials)
        # Bounded: a peer that stops reading cannot hold the pool's shutdown.
        waits = [asyncio.ensure_future(conn.wait_closed()) for conn in connections]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=_CLOSE_TIMEOUT)
            for connection in connections:
                connection.abort()
            for waiter in pending:
                waiter.cancel()

    # --- internals -------------------------------------------------------------------------

    def _pick(self, key: PoolKey) -> HboneConnection | None:
        """The first healthy connection with a free slot; dead connections are dropped."""
        connections = self._connections.get(key)
        if not connections:
            return None
        alive = [conn for conn in connections if conn.is_usable]
        if len(alive) != len(connections):
            self._connections[key] = alive
        for connection in alive:
            if connection.available_streams > 0:
                return connection
        return None

    async def _shared_dial(
        self,
        key: PoolKey,
        creds: WorkloadCredentials,
        expected_identity: SpiffeId,
        host: str,
        port: int,
        dial: Dialer | None,
    ) -> HboneConnection:
        task = self._dials.get(key)
        if task is None:
            task = asyncio.create_task(
                self._dial(key, creds, expected_identity, host, port, dial),
                name=f"hbone-dial {key[2]}",
            )
            self._dials[key] = task
            task.add_done_callback(lambda done: self._dial_finished(key, done))
        # Shielded: one caller giving up must not fail the dial the others are waiting for.
        return await asyncio.shield(task)

    async def _dial(
        self,
        key: PoolKey,
        creds: WorkloadCredentials,
        expected_identity: SpiffeId,
        host: str,
        port: int,
        dial: Dialer | None,
    ) -> HboneConnection:
        connection = await HboneConnection.connect(
            host,
            port,
            creds,
            expected_identity,
            connect_timeout=self.connect_timeout,
            max_streams=self.max_streams_per_connection,
            ssl_context=self._contexts.get(creds),
            dial=dial,
        )
        if self._closed:
            connection.close()
            raise HboneError("the HBONE connection pool was closed while dialling")
        self._connections.setdefault(key, []).append(connection)
        self._schedule_reaper()
        logger.debug("hbone: pooled new connection %r", connection)
        return connection

    def _dial_finished(self, key: PoolKey, task: asyncio.Task[HboneConnection]) -> None:
        if self._dials.get(key) is task:
            del self._dials[key]
        if not task.cancelled():
            task.exception()  # retrieved here so that a dial nobody awaited is not reported

    def _schedule_reaper(self) -> None:
        if self._reaper is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(self.idle_timeout / 2, self._reap_idle)

    def _reap_idle(self) -> None:
        """Close connections without streams for `idle_timeout`; drop dead ones."""
        self._reaper = None
        now = asyncio.get_running_loop().time()
        for key, connections in list(self._connections.items()):
            keep = []
            for connection in connections:
                idle_since = connection.idle_since
                if not connection.is_usable:
                    continue
                if idle_since is not None and now - idle_since >= self.idle_timeout:
                    connection.close()
                    continue
                keep.append(connection)
            if keep:
                self._connections[key] = keep
            else:
                del self._connections[key]
        if self._connections:
            self._schedule_reaper()
