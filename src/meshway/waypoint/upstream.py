"""Connections from the waypoint to endpoints: HBONE tunnels with the waypoint's identity,
carrying HTTP/1.1 (a keep-alive pool per endpoint) or HTTP/2 (multiplexed).

A pooled connection can be closed by the application while it sits idle. A request that
fails on a *reused* connection before any byte of a response arrived is sent once more on a
new connection, as browsers and Envoy do for stale keep-alive connections; a request that
fails on a fresh connection is reported to the caller, whose retry policy decides.

How connections to one cluster behave comes from its DestinationRule's `connectionPool`
(`ConnectionSettings`): `tcp.connectTimeout` bounds the HBONE dial (10 s, Istio's default),
`http.maxRequestsPerConnection` retires a connection after that many requests (0: never), and
`http.idleTimeout` closes one idle for that long (60 s by default here; Istio's is 1 h).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from meshway.api.v1 import address_pb2
from meshway.hbone.errors import HboneError
from meshway.waypoint.http1 import H1ClientConnection
from meshway.waypoint.http2 import H2ClientConnection
from meshway.waypoint.messages import ByteStream, Request, Response, UpstreamError

MAX_IDLE_PER_ENDPOINT = 64
IDLE_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """How the waypoint dials, reuses and retires its connections to one cluster."""

    connect_timeout: float = CONNECT_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    max_requests_per_connection: int = 0  # 0: no limit


DEFAULT_CONNECTION = ConnectionSettings()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One chosen destination: a workload's address and the port its application listens on."""

    workload: address_pb2.Workload
    ip: str
    port: int
    # The workload's SPIFFE ID as a URI, for telemetry (computed once per endpoint).
    principal: str = "unknown"

    @property
    def key(self) -> tuple[str, int]:
        return (self.ip, self.port)


# Opens a byte stream to an endpoint (an HBONE tunnel, or plain TCP outside the mesh).
Opener = Callable[[Endpoint], Awaitable[ByteStream]]


class UpstreamPool:
    def __init__(self, opener: Opener) -> None:
        self._open = opener
        self._idle_h1: dict[tuple[str, int], list[H1ClientConnection]] = defaultdict(list)
        self._h2: dict[tuple[str, int], list[H2ClientConnection]] = defaultdict(list)
        self._h2_dials: dict[tuple[str, int], asyncio.Future[H2ClientConnection]] = {}
        self._closed = False
        self._reaper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Future[None]] = set()

    async def open(
        self, endpoint: Endpoint, connection: ConnectionSettings = DEFAULT_CONNECTION
    ) -> ByteStream:
        """A byte stream of its own to the endpoint (for opaque TCP)."""
        return await self._dial(endpoint, connection)

    async def request(
        self,
        endpoint: Endpoint,
        request: Request,
        http2: bool,
        connection: ConnectionSettings = DEFAULT_CONNECTION,
    ) -> Response:
        if http2:
            return await self._request_h2(endpoint, request, connection)
        return await self._request_h1(endpoint, request, connection)

    # -- HTTP/1.1 --------------------------------------------------------------------------

    async def _request_h1(
        self, endpoint: Endpoint, request: Request, connection: ConnectionSettings
    ) -> Response:
        idle = self._idle_h1.get(endpoint.key)
        while idle:
            conn = idle.pop()
            if not conn.is_usable:
                continue
            replay = request.body.copy()  # to send again if the connection proves stale
            conn.requests += 1
            try:
                return await conn.request(request)
            except UpstreamError:
                if replay is None:
                    raise
                request.body = replay  # stale keep-alive connection: once more on a new one
            break
        stream = await self._dial(endpoint, connection)
        conn = H1ClientConnection(stream, self._release_h1(endpoint.key, connection))
        conn.requests = 1
        return await conn.request(request)

    def _release_h1(
        self, key: tuple[str, int], connection: ConnectionSettings
    ) -> Callable[[H1ClientConnection], None]:
        limit = connection.max_requests_per_connection

        def release(conn: H1ClientConnection) -> None:
            idle = self._idle_h1[key]
            if (
                self._closed
                or len(idle) >= MAX_IDLE_PER_ENDPOINT
                or (limit and conn.requests >= limit)
            ):
                conn.close()
                return
            conn.idle_since = time.monotonic()
            conn.idle_limit = connection.idle_timeout
            idle.append(conn)
            self._schedule_reaper(connection.idle_timeout)

        return release

    # -- HTTP/2 ----------------------------------------------------------------------------

    async def _request_h2(
        self, endpoint: Endpoint, request: Request, connection: ConnectionSettings
    ) -> Response:
        conn = await self._h2_connection(endpoint, connection)
        conn.requests += 1
        if connection.max_requests_per_connection:
            conn.retired = conn.requests >= connection.max_requests_per_connection
        return await conn.request(request)

    async def _h2_connection(
        self, endpoint: Endpoint, connection: ConnectionSettings
    ) -> H2ClientConnection:
        key = endpoint.key
        conns = self._h2[key]
        conns[:] = [c for c in conns if c.is_usable]
        for conn in conns:
            if conn.available_streams > 0 and not conn.retired:
                return conn
        dial = self._h2_dials.get(key)
        if dial is None:
            dial = asyncio.ensure_future(self._dial_h2(endpoint, connection))
            self._h2_dials[key] = dial
            dial.add_done_callback(lambda _: self._h2_dials.pop(key, None))
        return await asyncio.shield(dial)

    async def _dial_h2(
        self, endpoint: Endpoint, connection: ConnectionSettings
    ) -> H2ClientConnection:
        conn = H2ClientConnection(await self._dial(endpoint, connection))
        conn.idle_limit = connection.idle_timeout
        self._h2[endpoint.key].append(conn)
        self._schedule_reaper(connection.idle_timeout)
        return conn

    # -- common ----------------------------------------------------------------------------

    async def _dial(self, endpoint: Endpoint, connection: ConnectionSettings) -> ByteStream:
        where = f"{endpoint.ip}:{endpoint.port}"
        try:
            async with asyncio.timeout(connection.connect_timeout):
                return await self._open(endpoint)
        except TimeoutError:
            raise UpstreamError(
                f"connection to {where} timed out after {connection.connect_timeout:g} s",
                connected=False,
            ) from None
        except (HboneError, OSError) as exc:
            raise UpstreamError(f"connection to {where} failed: {exc}", connected=False) from exc

    def _schedule_reaper(self, idle_timeout: float) -> None:
        """Make sure the reaper runs within half of `idle_timeout` from now."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + idle_timeout / 2
        if self._reaper is not None:
            if self._reaper.when() <= due:
                return
            self._reaper.cancel()
        self._reaper = loop.call_at(due, self._reap)

    def _reap(self) -> None:
        """Close connections idle for longer than their cluster's idle timeout, and retired
        HTTP/2 connections once their last stream is done."""
        self._reaper = None
        now = time.monotonic()
        remaining = 0
        shortest = IDLE_TIMEOUT
        for key, idle in list(self._idle_h1.items()):
            keep = []
            for conn in idle:
                if conn.idle_since is not None and conn.idle_since + conn.idle_limit < now:
                    conn.close()
                elif conn.is_usable:
                    keep.append(conn)
                    shortest = min(shortest, conn.idle_limit)
            if keep:
                self._idle_h1[key] = keep
                remaining += len(keep)
            else:
                del self._idle_h1[key]
        for key, conns in list(self._h2.items()):
            keep2 = []
            for h2 in conns:
                since = h2.idle_since
                if not h2.is_usable or (
                    since is not None and (h2.retired or since + h2.idle_limit < now)
                ):
                    closing = asyncio.ensure_future(h2.close())
                    self._closing.add(closing)
                    closing.add_done_callback(self._closing.discard)
                else:
                    keep2.append(h2)
                    shortest = min(shortest, h2.idle_limit)
            if keep2:
                self._h2[key] = keep2
                remaining += len(keep2)
            else:
                del self._h2[key]
        if remaining:
            self._schedule_reaper(shortest)

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for idle in self._idle_h1.values():
            for conn in idle:
                conn.close()
        self._idle_h1.clear()
        for conns in self._h2.values():
            for h2 in conns:
                with contextlib.suppress(Exception):
                    await h2.close()
        self._h2.clear()
