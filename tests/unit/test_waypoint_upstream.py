"""The waypoint's upstream pool under a DestinationRule's connectionPool: connect timeout,
requests per connection, idle timeout (HTTP/1.1 and HTTP/2, against our own servers on
loopback)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from meshway.api.v1 import address_pb2
from meshway.waypoint.http1 import serve_h1
from meshway.waypoint.http2 import serve_h2
from meshway.waypoint.messages import (
    ByteStream,
    Request,
    Response,
    TcpStream,
    UpstreamError,
    simple_response,
)
from meshway.waypoint.traffic import make_connection_settings
from meshway.waypoint.upstream import (
    CONNECT_TIMEOUT,
    IDLE_TIMEOUT,
    ConnectionSettings,
    Endpoint,
    UpstreamPool,
)

pytestmark = pytest.mark.unit

Serve = Callable[[ByteStream, Callable[[Request], Awaitable[Response]]], Awaitable[None]]


class Server:
    """A loopback HTTP server (serve_h1 or serve_h2) that counts its connections."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.port = 0


@contextlib.asynccontextmanager
async def server(serve: Serve) -> AsyncIterator[Server]:
    state = Server()
    tasks: set[asyncio.Task[None]] = set()

    async def handler(request: Request) -> Response:
        await request.body.read_all()
        return simple_response(200, "ok\n")

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.opened += 1
        try:
            await serve(TcpStream(reader, writer), handler)
        finally:
            state.closed += 1
            writer.close()

    def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(connection(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    listener = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    state.port = listener.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        listener.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def endpoint(port: int) -> Endpoint:
    return Endpoint(address_pb2.Workload(name="web-1"), "127.0.0.1", port)


def tcp_pool() -> UpstreamPool:
    async def opener(e: Endpoint) -> ByteStream:
        return await TcpStream.connect(e.ip, e.port)

    return UpstreamPool(opener)


async def get(pool: UpstreamPool, port: int, http2: bool, settings: ConnectionSettings) -> int:
    response = await pool.request(
        endpoint(port), Request("GET", "/", "web", protocol="HTTP/2" if http2 else "HTTP/1.1"),
        http2, settings,
    )  # fmt: skip
    await response.body.read_all()
    return response.status


async def eventually(check: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.02)


def test_connection_settings_from_a_destination_rule() -> None:
    from meshway.config.model import ConnectionPoolSettings

    assert make_connection_settings(None) == ConnectionSettings(CONNECT_TIMEOUT, IDLE_TIMEOUT, 0)
    settings = ConnectionPoolSettings.model_validate(
        {
            "tcp": {"connectTimeout": "250ms", "maxConnections": 5},
            "http": {"idleTimeout": "2s", "maxRequestsPerConnection": 3},
        }
    )
    assert make_connection_settings(settings) == ConnectionSettings(0.25, 2.0, 3)
    only_tcp = ConnectionPoolSettings.model_validate({"tcp": {"maxConnections": 5}})
    assert make_connection_settings(only_tcp) == ConnectionSettings(CONNECT_TIMEOUT, IDLE_TIMEOUT)


async def test_a_dial_that_hangs_fails_after_the_connect_timeout() -> None:
    async def never(_: Endpoint) -> ByteStream:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    pool = UpstreamPool(never)
    with pytest.raises(UpstreamError, match=r"timed out after 0.2 s") as info:
        async with asyncio.timeout(5):  # the pool gives up long before this
            await pool.request(
                endpoint(9), Request("GET", "/", "web"), False, ConnectionSettings(0.2)
            )
    assert not info.value.connected  # nothing was sent: any method may be retried
    with pytest.raises(UpstreamError, match="timed out"):
        await pool.open(endpoint(9), ConnectionSettings(0.1))


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_max_requests_per_connection_retires_connections(http2: bool) -> None:
    serve: Serve = serve_h2 if http2 else serve_h1
    async with server(serve) as srv:
        pool = tcp_pool()
        for _ in range(5):
            limit = ConnectionSettings(max_requests_per_connection=2)
            assert await get(pool, srv.port, http2, limit) == 200
        assert srv.opened == 3  # requests 1-2, 3-4, 5
        await pool.close()
        unlimited = tcp_pool()
        for _ in range(4):
            assert await get(unlimited, srv.port, http2, ConnectionSettings()) == 200
        assert srv.opened == 4  # no limit: one connection for all four
        await unlimited.close()


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_idle_connections_close_after_the_idle_timeout(http2: bool) -> None:
    serve: Serve = serve_h2 if http2 else serve_h1
    async with server(serve) as srv:
        pool = tcp_pool()
        short = ConnectionSettings(idle_timeout=0.3)
        assert await get(pool, srv.port, http2, short) == 200
        assert srv.opened == 1
        await eventually(lambda: srv.closed == 1)  # the pool closed it, idle
        assert await get(pool, srv.port, http2, short) == 200
        assert srv.opened == 2  # a new connection, not the closed one
        await pool.close()
