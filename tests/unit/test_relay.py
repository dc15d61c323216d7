"""The protocol-level relays on real loopback sockets, on both asyncio's loop and uvloop.

The setup mirrors a pair of node proxies: an application client talks to a local socket that
one relay copies into an HBONE tunnel; the HBONE server's handler relays the tunnel into a
socket to the application server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import uvloop
from h2.errors import ErrorCodes

from meshway.hbone import (
    HboneConnection,
    HboneRequest,
    HboneServer,
    client_context,
    relay,
    splice,
)
from meshway.hbone.relay import _TunnelRelay
from meshway.hbone.session import STREAM_WINDOW
from tests.unit.test_hbone import SERVER_ID, TARGET, Pki, eventually, listening_socket
from tests.unit.test_hbone import pki as pki

pytestmark = pytest.mark.unit

AppHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


Runner = Callable[[Coroutine[Any, Any, None]], None]
LOOPS: dict[str, Runner] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Runner:
    """Each test runs on asyncio's own loop and on uvloop (which the node proxy uses)."""
    return LOOPS[request.param]


async def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


class Mesh:
    """app client → [relay → HBONE → relay] → app server, with the relays' byte counts."""

    def __init__(self) -> None:
        self.outbound: list[tuple[int, int]] = []
        self.inbound: list[tuple[int, int]] = []
        self.inbound_errors: list[BaseException] = []
        self.inbound_tasks: list[asyncio.Task[object]] = []
        self.port = 0


@contextlib.asynccontextmanager
async def mesh(pki: Pki, app: AppHandler) -> AsyncIterator[Mesh]:
    result = Mesh()
    app_server = await asyncio.start_server(app, "127.0.0.1", 0)
    app_port = app_server.sockets[0].getsockname()[1]

    async def inbound(request: HboneRequest) -> None:
        sock = await connect(app_port)
        request.accept()
        task = asyncio.current_task()
        assert task is not None
        result.inbound_tasks.append(task)
        try:
            result.inbound.append(await relay(request.stream, sock))
        except BaseException as exc:
            result.inbound_errors.append(exc)
            raise

    hbone = HboneServer(listening_socket(), lambda: pki.server, inbound)
    await hbone.start()
    host, port = hbone.address
    conn = await HboneConnection.connect(host, port, pki.client, SERVER_ID, connect_timeout=5)
    loop = asyncio.get_running_loop()
    front = listening_socket()
    front.setblocking(False)
    result.port = front.getsockname()[1]
    tasks: set[asyncio.Task[None]] = set()

    async def outbound(sock: socket.socket) -> None:
        stream = await conn.open_stream(TARGET)
        result.outbound.append(await relay(stream, sock))

    async def accept_loop() -> None:
        while True:
            sock, _ = await loop.sock_accept(front)
            task = asyncio.create_task(outbound(sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.create_task(accept_loop())
    try:
        async with app_server:
            yield result
    finally:
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        front.close()
        conn.close()
        hbone.close()
        async with asyncio.timeout(10):
            await hbone.wait_closed()


def test_bulk_both_ways_with_half_close(pki: Pki, run: Runner) -> None:
    run(_bulk_both_ways_with_half_close(pki))


async def _bulk_both_ways_with_half_close(pki: Pki) -> None:
    """More than a stream window each way, so flow control and pausing are exercised."""
    upload = os.urandom(3 * STREAM_WINDOW + 12345)

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        total = 0
        while data := await reader.read(65536):
            digest.update(data)
            total += len(data)
        # Only after the client's FIN (half-close crossed both relays): answer in bulk.
        writer.write(digest.digest() + b"\0" * (2 * STREAM_WINDOW))
        await writer.drain()
        writer.close()

    async with mesh(pki, app) as m:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.port)

        async def send() -> None:
            writer.write(upload)
            await writer.drain()
            writer.write_eof()

        async with asyncio.timeout(60):
            sender = asyncio.create_task(send())
            reply = await reader.read(-1)
            await sender
        writer.close()
        await eventually(lambda: bool(m.outbound and m.inbound))
    assert reply[:32] == hashlib.sha256(upload).digest()
    assert len(reply) == 32 + 2 * STREAM_WINDOW
    assert m.outbound == [(len(upload), len(reply))]
    assert m.inbound == [(len(reply), len(upload))]  # (into the tunnel, out of it)


def test_slow_reader_is_back_pressured_not_buffered(pki: Pki, run: Runner) -> None:
    run(_slow_reader_is_back_pressured_not_buffered(pki))


async def _slow_reader_is_back_pressured_not_buffered(pki: Pki) -> None:
    """An app client that stops reading stalls the server's writes within bounded memory."""
    total = 64 * STREAM_WINDOW
    progress = {"written": 0}

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"z" * 65536
        with contextlib.suppress(ConnectionError):
            while progress["written"] < total:
                writer.write(chunk)
                await writer.drain()
                progress["written"] += len(chunk)
            writer.close()

    async with mesh(pki, app) as m:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.port)
        await eventually(lambda: progress["written"] > 0)
        await asyncio.sleep(1.0)  # nobody reads: whatever can be buffered gets buffered
        stalled = progress["written"]
        await asyncio.sleep(0.5)
        assert progress["written"] == stalled, "the app kept writing although nobody read"
        # Socket buffers and one stream window (a few MiB), nowhere near the 256 MiB total.
        assert stalled < 4 * STREAM_WINDOW + 16 * 1024 * 1024
        async with asyncio.timeout(60):
            received = 0
            while data := await reader.read(1 << 20):
                received += len(data)
        writer.close()
    assert received == total


def test_upstream_reset_resets_the_client(pki: Pki, run: Runner) -> None:
    run(_upstream_reset_resets_the_client(pki))


async def _upstream_reset_resets_the_client(pki: Pki) -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()

    async with mesh(pki, rude) as m:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.port)
        writer.write(b"hello")
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(10):
                await reader.read(-1)
        writer.close()
        await eventually(lambda: bool(m.inbound and m.outbound))
    assert m.inbound == [(0, 5)]
    assert m.outbound == [(5, 0)]


def test_cancelling_a_relay_drops_both_sides(pki: Pki, run: Runner) -> None:
    run(_cancelling_a_relay_drops_both_sides(pki))


async def _cancelling_a_relay_drops_both_sides(pki: Pki) -> None:
    """What a policy change does to an open connection: both ends see it end at once."""
    app_closed = asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        app_closed.set()

    async with mesh(pki, app) as m:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.port)
        writer.write(b"ping")
        await writer.drain()
        await asyncio.sleep(0.2)
        assert len(m.inbound_tasks) == 1
        m.inbound_tasks[0].cancel()
        async with asyncio.timeout(10):
            await app_closed.wait()
            with contextlib.suppress(ConnectionError):
                assert await reader.read(-1) == b""
        writer.close()
        await eventually(lambda: bool(m.inbound_errors))
    assert isinstance(m.inbound_errors[0], asyncio.CancelledError)


def test_splice_copies_both_ways_and_carries_resets(run: Runner) -> None:
    run(_splice_copies_both_ways_and_carries_resets())


async def _splice_copies_both_ways_and_carries_resets() -> None:
    received: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)
        received.append(data)
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    app_server = await asyncio.start_server(app, "127.0.0.1", 0)
    app_port = app_server.sockets[0].getsockname()[1]
    front = listening_socket()
    front.setblocking(False)
    counts: list[tuple[int, int]] = []
    loop = asyncio.get_running_loop()

    async def one() -> None:
        sock, _ = await loop.sock_accept(front)
        counts.append(await splice(sock, await connect(app_port)))

    payload = os.urandom(5 * 1024 * 1024)
    async with app_server:
        task = asyncio.create_task(one())
        reader, writer = await asyncio.open_connection("127.0.0.1", front.getsockname()[1])

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        async with asyncio.timeout(30):
            sender = asyncio.create_task(send())
            reply = await reader.read(-1)
            await sender
            await task
        writer.close()
    front.close()
    assert received == [payload]
    assert reply == payload[::-1]
    assert counts == [(len(payload), len(payload))]


def test_window_update_and_reset_in_one_read_end_only_that_stream(pki: Pki, run: Runner) -> None:
    run(_window_update_and_reset_in_one_read(pki))


async def _window_update_and_reset_in_one_read(pki: Pki) -> None:
    """h2 handles a whole read before we see its events, so a relay woken by the WINDOW_UPDATE
    finds its stream already closed by the RST_STREAM behind it: that ends the one tunnel,
    never the connection (a regression: it used to fail every tunnel on it)."""

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(b"y" * (1 << 20))  # more than the raw client's 64 KiB window
            await writer.drain()
            await reader.read()

    app_server = await asyncio.start_server(flood, "127.0.0.1", 0)
    app_port = app_server.sockets[0].getsockname()[1]
    relayed: list[tuple[int, int]] = []

    async def inbound(request: HboneRequest) -> None:
        sock = await connect(app_port)
        request.accept()
        relayed.append(await relay(request.stream, sock))

    hbone = HboneServer(listening_socket(), lambda: pki.server, inbound)
    await hbone.start()
    reader, writer = await asyncio.open_connection(*hbone.address, ssl=client_context(pki.client))
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    headers = [(":method", "CONNECT"), (":authority", TARGET)]
    conn.send_headers(1, headers)
    writer.write(conn.data_to_send())
    received = 0
    async with app_server, asyncio.timeout(10):
        while received < 65535 - 16384:  # the server is about to run out of window
            for event in conn.receive_data(await reader.read(65536)):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)
        await asyncio.sleep(0.2)  # let its relay park the rest and wait for window
        conn.increment_flow_control_window(1000)
        conn.increment_flow_control_window(1000, stream_id=1)
        conn.reset_stream(1, ErrorCodes.CANCEL)
        conn.ping(b"stillok?")
        writer.write(conn.data_to_send())  # all three frames in one read
        acked = False
        while not acked:
            data = await reader.read(65536)
            assert data, "the server closed the whole connection"
            acked = any(isinstance(e, h2.events.PingAckReceived) for e in conn.receive_data(data))
        await eventually(lambda: bool(relayed))
    writer.close()
    hbone.close()
    async with asyncio.timeout(10):
        await hbone.wait_closed()
    assert "internal_error" not in hbone.errors


class PausedStream:
    """Just enough of an HboneStream whose connection's TLS buffer is over its high mark."""

    stream_id = 1
    writing_paused = True

    def __init__(self) -> None:
        self.ended = False

    def write_eof_nowait(self) -> None:
        self.ended = True


def test_eof_becomes_end_stream_while_the_tls_buffer_is_full() -> None:
    """Other streams filled the shared TLS buffer; this socket's EOF must not wait for them
    (a regression: nothing would ever have sent its END_STREAM)."""

    async def scenario() -> None:
        stream = PausedStream()
        state = _TunnelRelay(stream)  # type: ignore[arg-type]
        state.end.eof = True
        state.socket_eof(state.end)
        assert stream.ended

    asyncio.run(scenario())
