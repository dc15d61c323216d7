"""HBONE over real sockets on 127.0.0.1: mTLS, HTTP/2 CONNECT, flow control, pooling, abuse."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509
from h2.errors import ErrorCodes

from meshway.hbone import (
    HboneConnection,
    HboneConnectionError,
    HboneConnectionPool,
    HboneError,
    HboneRefused,
    HboneRequest,
    HboneServer,
    HboneStream,
    HboneStreamReset,
    IdentityError,
    IdentityMismatch,
    WorkloadCredentials,
    client_context,
    parse_authority,
    relay,
    server_context,
)
from meshway.hbone.session import STREAM_WINDOW
from meshway.hbone.tls import identity_from_certificate
from meshway.identity import CertificateAuthority, SpiffeId, build_csr, generate_key, key_to_pem

pytestmark = pytest.mark.unit

TD = "cluster.local"
SERVER_ID = SpiffeId(TD, "default", "server")
CLIENT_ID = SpiffeId(TD, "default", "client")
TARGET = "10.0.0.7:8080"


# --- fixtures and helpers --------------------------------------------------------------------


def issue(ca: CertificateAuthority, identity: SpiffeId, bundle: bytes) -> WorkloadCredentials:
    key = generate_key()
    issued = ca.sign_csr(build_csr(key, identity), identity)
    return WorkloadCredentials.from_pems(issued.chain_pem_bytes, key_to_pem(key), bundle)


@dataclass
class Pki:
    ca: CertificateAuthority
    other_ca: CertificateAuthority
    server: WorkloadCredentials
    client: WorkloadCredentials

    @property
    def bundle(self) -> bytes:
        return self.ca.trust_bundle.to_pem()

    def creds(self, identity: SpiffeId) -> WorkloadCredentials:
        return issue(self.ca, identity, self.bundle)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)
    other = CertificateAuthority.load_or_create(tmp_path_factory.mktemp("other-ca"), TD)
    bundle = ca.trust_bundle.to_pem()
    return Pki(ca, other, issue(ca, SERVER_ID, bundle), issue(ca, CLIENT_ID, bundle))


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


Handler = Callable[[HboneRequest], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(
    creds: WorkloadCredentials, handler: Handler, **options: float
) -> AsyncIterator[HboneServer]:
    server = HboneServer(listening_socket(), lambda: creds, handler, **options)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        server.close()
        async with asyncio.timeout(10):
            await server.wait_closed()


@contextlib.asynccontextmanager
async def connected(
    server: HboneServer, creds: WorkloadCredentials, expected: SpiffeId = SERVER_ID
) -> AsyncIterator[HboneConnection]:
    host, port = server.address
    conn = await HboneConnection.connect(host, port, creds, expected, connect_timeout=5)
    try:
        yield conn
    finally:
        conn.close()
        async with asyncio.timeout(5):
            await conn.wait_closed()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def echo(request: HboneRequest) -> None:
    request.accept()
    while data := await request.stream.read():
        await request.stream.write(data)
    await request.stream.write_eof()


async def exchange(stream: HboneStream, payload: bytes, chunk: int = 256 * 1024) -> bytes:
    """Write `payload` then half-close while reading everything that comes back."""

    async def send() -> None:
        for start in range(0, len(payload), chunk):
            await stream.write(payload[start : start + chunk])
        await stream.write_eof()

    async def receive() -> bytes:
        parts = []
        while data := await stream.read():
            parts.append(data)
        return b"".join(parts)

    async with asyncio.timeout(60), asyncio.TaskGroup() as group:
        group.create_task(send())
        received = group.create_task(receive())
    return received.result()


async def raw_h2_request(
    server: HboneServer, creds: WorkloadCredentials, headers: list[tuple[str, str]]
) -> int | None:
    """Send one request with plain h2, bypassing our client's checks.

    Returns the response status, or None when the server closed the connection instead.
    """
    reader, writer = await asyncio.open_connection(*server.address, ssl=client_context(creds))
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    # Plain HPACK literals: Huffman-coding a huge test header takes seconds in pure Python.
    conn.encoder.encode = functools.partial(conn.encoder.encode, huffman=False)  # type: ignore[method-assign]
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    writer.write(conn.data_to_send())
    try:
        async with asyncio.timeout(5):
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        return int(dict(event.headers)[b":status"])
                    if isinstance(event, h2.events.ConnectionTerminated):
                        return None
                writer.write(conn.data_to_send())
        return None
    finally:
        writer.close()


# --- tunnels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 1024 * 1024, 20 * 1024 * 1024], ids=["1B", "1MiB", "20MiB"])
async def test_echo_through_tunnel(pki: Pki, size: int) -> None:
    payload = random.Random(size).randbytes(size)
    async with serving(pki.server, echo) as server, connected(server, pki.client) as conn:
        stream = await conn.open_stream(TARGET)
        received = await exchange(stream, payload)
    assert len(received) == size
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert stream.is_finished


async def test_fifty_concurrent_streams_share_one_connection(pki: Pki) -> None:
    async with serving(pki.server, echo) as server, connected(server, pki.client) as conn:

        async def one_tunnel(index: int) -> bool:
            payload = random.Random(index).randbytes(200_000 + index)
            stream = await conn.open_stream(TARGET)
            return await exchange(stream, payload, chunk=50_000) == payload

        async with asyncio.timeout(60):
            results = await asyncio.gather(*(one_tunnel(i) for i in range(50)))
        assert all(results)
        assert server.connections_accepted == 1
        assert conn.open_streams == 0
        conn.close()
        await eventually(lambda: server.active_connections == 0)
        assert not server.errors, "a clean close must not count as an error"


async def test_half_close_keeps_the_other_direction_open(pki: Pki) -> None:
    async def count_then_answer(request: HboneRequest) -> None:
        request.accept()
        total = 0
        while data := await request.stream.read():
            total += len(data)
        await request.stream.write(b"received %d" % total)
        await request.stream.write_eof()

    async with serving(pki.server, count_then_answer) as server, connected(server, pki.client) as c:
        stream = await c.open_stream(TARGET)
        await stream.write(b"x" * 100_000)
        await stream.write_eof()
        with pytest.raises(Exception, match="half-closed"):
            await stream.write(b"more")
        async with asyncio.timeout(5):
            assert await stream.read() == b"received 100000"
            assert await stream.read() == b""
    assert stream.is_finished


async def test_server_sees_client_identity_target_and_headers(pki: Pki) -> None:
    seen: list[HboneRequest] = []

    async def record(request: HboneRequest) -> None:
        seen.append(request)
        request.accept()
        await request.stream.write_eof()

    headers = {
        "Forwarded": 'for="10.0.0.1"',
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "baggage": "k=v",
    }
    async with serving(pki.server, record) as server, connected(server, pki.client) as conn:
        assert conn.peer_identity == SERVER_ID
        stream = await conn.open_stream("[fd00::7]:443", headers)
        async with asyncio.timeout(5):
            assert await stream.read() == b""
    (request,) = seen
    assert request.peer_identity == CLIENT_ID
    assert request.local_identity == SERVER_ID
    assert request.peer_address[0] == "127.0.0.1"
    assert (request.target_ip, request.target_port) == (IPv6Address("fd00::7"), 443)
    assert request.headers == {k.lower(): v for k, v in headers.items()}


async def test_stream_reset_propagates_both_ways(pki: Pki) -> None:
    server_saw: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(request: HboneRequest) -> None:
        request.accept()
        if request.target_port == 1:  # the server resets
            await request.stream.read(1)
            request.stream.abort()
            return
        try:  # the client resets
            await request.stream.read()
        except HboneStreamReset as exc:
            server_saw.set_result(exc)

    async with serving(pki.server, handler) as server, connected(server, pki.client) as conn:
        stream = await conn.open_stream("10.0.0.7:1")
        await stream.write(b"x")
        with pytest.raises(HboneStreamReset) as reset:
            async with asyncio.timeout(5):
                await stream.read()
        assert reset.value.by_peer and reset.value.error_code == ErrorCodes.CANCEL
        assert stream.reset_reason == ErrorCodes.CANCEL
        with pytest.raises(HboneStreamReset):
            await stream.write(b"y")

        stream = await conn.open_stream("10.0.0.7:2")
        stream.abort()
        async with asyncio.timeout(5):
            exc = await server_saw
        assert isinstance(exc, HboneStreamReset) and exc.by_peer
        assert exc.error_code == ErrorCodes.CANCEL


async def test_back_pressure_blocks_the_writer_instead_of_buffering(pki: Pki) -> None:
    release = asyncio.Event()
    streams: list[HboneStream] = []

    async def slow_reader(request: HboneRequest) -> None:
        request.accept()
        streams.append(request.stream)
        await release.wait()
        total = 0
        while data := await request.stream.read():
            total += len(data)
        await request.stream.write(b"%d" % total)
        await request.stream.write_eof()

    payload = bytes(1024 * 1024)
    rounds = 32
    async with serving(pki.server, slow_reader) as server, connected(server, pki.client) as conn:
        stream = await conn.open_stream(TARGET)

        async def write_all() -> None:
            for _ in range(rounds):
                await stream.write(payload)
            await stream.write_eof()

        writer = asyncio.create_task(write_all())
        try:
            await eventually(lambda: bool(streams) and streams[0].buffered_bytes >= STREAM_WINDOW)
            await asyncio.sleep(0.3)
            assert not writer.done(), "the write finished although nobody read"
            # The server holds at most one window; the client's transport holds no more.
            assert streams[0].buffered_bytes == STREAM_WINDOW
            assert stream.write_buffer_size <= STREAM_WINDOW
            release.set()
            async with asyncio.timeout(30):
                await writer
                assert await stream.read() == b"%d" % (rounds * len(payload))
        finally:
            writer.cancel()


async def app_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_relay_copies_both_ways_with_half_close(pki: Pki) -> None:
    async def upstream_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(65536):
            total += len(data)
        writer.write(b"ok:%d" % total)
        writer.close()

    app = await asyncio.start_server(upstream_app, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    counts: list[tuple[int, int]] = []

    async def to_app(request: HboneRequest) -> None:
        request.accept()
        counts.append(await relay(request.stream, await app_socket(app_port)))

    payload = os.urandom(3 * 1024 * 1024 + 5)
    async with app, serving(pki.server, to_app) as server, connected(server, pki.client) as c:
        stream = await c.open_stream(TARGET)
        reply = await exchange(stream, payload)
        await eventually(lambda: bool(counts))
    assert reply == b"ok:%d" % len(payload)
    assert counts == [(len(reply), len(payload))]


async def test_relay_resets_the_tunnel_when_the_upstream_socket_breaks(pki: Pki) -> None:
    async def rude_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        # Linger 0: close() sends a TCP RST instead of a FIN.
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()

    app = await asyncio.start_server(rude_app, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    relayed: list[tuple[int, int]] = []

    async def to_app(request: HboneRequest) -> None:
        sock = await app_socket(app_port)
        request.accept()
        relayed.append(await relay(request.stream, sock))

    async with app, serving(pki.server, to_app) as server, connected(server, pki.client) as c:
        stream = await c.open_stream(TARGET)
        await stream.write(b"hello")
        with pytest.raises(HboneStreamReset) as reset:
            async with asyncio.timeout(5):
                await stream.read()
        assert reset.value.by_peer
        await eventually(lambda: bool(relayed))
    assert relayed == [(0, 5)]


class RawClient:
    """A plain h2 client over TLS, for frames our own client never sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )

    @classmethod
    async def connect(cls, server: HboneServer, creds: WorkloadCredentials) -> RawClient:
        reader, writer = await asyncio.open_connection(*server.address, ssl=client_context(creds))
        client = cls(reader, writer)
        client.conn.initiate_connection()
        client.conn.send_headers(1, [(":method", "CONNECT"), (":authority", TARGET)])
        writer.write(client.conn.data_to_send())
        assert await client.until(h2.events.ResponseReceived)
        return client

    async def until(self, kind: type[h2.events.Event]) -> list[h2.events.Event]:
        """Events up to and including the first of `kind`; [] if the connection ended first."""
        seen: list[h2.events.Event] = []
        async with asyncio.timeout(10):
            while data := await self.reader.read(65536):
                for event in self.conn.receive_data(data):
                    seen.append(event)
                    if isinstance(event, kind):
                        return seen
                self.writer.write(self.conn.data_to_send())
        return []


async def test_padded_data_split_into_one_byte_reads_arrives_whole(pki: Pki) -> None:
    """The lean DATA path: padding, and frames cut at every byte across TLS records."""
    async with serving(pki.server, echo) as server:
        raw = await RawClient.connect(server, pki.client)
        raw.conn.send_data(1, b"hello ", pad_length=20)
        raw.conn.send_data(1, b"", pad_length=7)
        raw.conn.send_data(1, b"world", end_stream=True, pad_length=0)
        for byte in raw.conn.data_to_send():
            raw.writer.write(bytes([byte]))
            await raw.writer.drain()
        events = await raw.until(h2.events.StreamEnded)
        raw.writer.close()
    echoed = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert echoed == b"hello world"


async def test_overrunning_the_stream_window_is_a_flow_control_error(pki: Pki) -> None:
    async def hold(request: HboneRequest) -> None:
        request.accept()
        while not request.stream.is_closed:  # never reads: the window is never handed back
            await asyncio.sleep(0.05)

    async with serving(pki.server, hold) as server:
        raw = await RawClient.connect(server, pki.client)
        # Make this client believe the windows are huge, then send past the real ones.
        raw.conn.outbound_flow_control_window = 1 << 30
        raw.conn.streams[1].outbound_flow_control_window = 1 << 30
        chunk = b"o" * raw.conn.max_outbound_frame_size
        for _ in range(STREAM_WINDOW // len(chunk) + 2):
            raw.conn.send_data(1, chunk)
        raw.writer.write(raw.conn.data_to_send())
        events = await raw.until(h2.events.ConnectionTerminated)
        raw.writer.close()
        await eventually(lambda: bool(server.errors))
    assert events, "the server never answered"
    terminated = events[-1]
    assert isinstance(terminated, h2.events.ConnectionTerminated)
    assert terminated.error_code == ErrorCodes.FLOW_CONTROL_ERROR
    assert server.errors == {"flow_control_error": 1}


async def test_closing_the_server_fails_open_tunnels(pki: Pki) -> None:
    handler_saw: list[BaseException] = []

    async def reader(request: HboneRequest) -> None:
        request.accept()
        try:
            await request.stream.read()
        except HboneConnectionError as exc:
            handler_saw.append(exc)

    async with serving(pki.server, reader) as server, connected(server, pki.client) as conn:
        stream = await conn.open_stream(TARGET)
        server.close()
        with pytest.raises(HboneConnectionError):
            async with asyncio.timeout(5):
                await stream.read()
        assert not conn.is_usable
        async with asyncio.timeout(5):
            await server.wait_closed()
        assert len(handler_saw) == 1


async def test_closing_the_server_cancels_handlers_that_hang(pki: Pki) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(request: HboneRequest) -> None:
        request.accept()
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with (
        serving(pki.server, stuck, close_timeout=0.2) as server,
        connected(server, pki.client) as conn,
    ):
        await conn.open_stream(TARGET)
        await started.wait()
        server.close()
        async with asyncio.timeout(5):
            await server.wait_closed()
    assert cancelled.is_set()


# --- identities and refusals -----------------------------------------------------------------


async def test_client_refuses_a_server_with_another_identity(pki: Pki) -> None:
    called = False

    async def handler(request: HboneRequest) -> None:
        nonlocal called
        called = True

    expected = SpiffeId(TD, "default", "payments")
    async with serving(pki.server, handler) as server:
        with pytest.raises(IdentityMismatch) as mismatch:
            await HboneConnection.connect(*server.address, pki.client, expected, connect_timeout=5)
    assert mismatch.value.actual == SERVER_ID and mismatch.value.expected == expected
    assert not called


async def test_client_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    # The intruder trusts our CA (so it accepts the server) but its own cert is foreign.
    intruder = issue(pki.other_ca, CLIENT_ID, pki.bundle)
    async with serving(pki.server, echo) as server:
        with pytest.raises(HboneConnectionError):
            await HboneConnection.connect(*server.address, intruder, SERVER_ID, connect_timeout=5)
        await eventually(lambda: server.errors["tls_untrusted_certificate"] == 1)


async def test_client_without_certificate_is_refused(pki: Pki) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    context.load_verify_locations(cadata=pki.bundle.decode())
    async with serving(pki.server, echo) as server:
        reader, writer = await asyncio.open_connection(*server.address, ssl=context)
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        writer.close()
        await eventually(lambda: server.errors["tls_no_client_certificate"] == 1)


@pytest.mark.parametrize(
    "bad",
    [
        {"te": "gzip"},
        {"connection": "close"},
        {"x bad": "1"},
        {"baggage": "a\r\nb"},
        {"x": " pad"},
        {"baggage": "k=v," * 20_000},  # over the peer's SETTINGS_MAX_HEADER_LIST_SIZE
    ],
)
async def test_invalid_request_headers_fail_only_that_stream(pki: Pki, bad: dict[str, str]) -> None:
    async with serving(pki.server, echo) as server, connected(server, pki.client) as conn:
        with pytest.raises(HboneError, match="invalid CONNECT request headers"):
            await conn.open_stream(TARGET, bad)
        assert conn.is_usable
        assert await exchange(await conn.open_stream(TARGET), b"ok") == b"ok"


async def test_server_asks_for_credentials_per_connection(pki: Pki) -> None:
    current = [pki.server]
    served: list[int] = []

    def provider() -> WorkloadCredentials:
        served.append(len(served))
        return current[0]

    async with contextlib.AsyncExitStack() as stack:
        server = HboneServer(listening_socket(), provider, echo)
        await stack.enter_async_context(server)
        async with connected(server, pki.client) as first:
            old_cert = first.peer_certificate_der
        current[0] = pki.creds(SERVER_ID)  # rotation: same identity, new key and certificate
        async with connected(server, pki.client) as second:
            assert second.peer_certificate_der != old_cert
            assert await exchange(await second.open_stream(TARGET), b"ok") == b"ok"
    assert len(served) == 2


async def test_non_connect_request_gets_405(pki: Pki) -> None:
    async with serving(pki.server, echo) as server:
        request = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", TARGET)]
        assert await raw_h2_request(server, pki.client, request) == 405
        assert server.errors["method_not_allowed"] == 1


@pytest.mark.parametrize(
    "authority", ["example.com:80", "10.0.0.7", "10.0.0.7:0", "10.0.0.7:99999", "[fe80::1%eth0]:80"]
)
async def test_bad_authority_gets_400(pki: Pki, authority: str) -> None:
    async with serving(pki.server, echo) as server, connected(server, pki.client) as conn:
        with pytest.raises(HboneRefused) as refused:
            await conn.open_stream(authority)
        assert refused.value.status == 400
        assert conn.is_usable  # a refused stream does not hurt the connection
        assert await exchange(await conn.open_stream(TARGET), b"still fine") == b"still fine"


async def test_handler_refusal_reaches_the_client(pki: Pki) -> None:
    async def deny(request: HboneRequest) -> None:
        request.refuse(403, "denied by policy")

    async with serving(pki.server, deny) as server, connected(server, pki.client) as conn:
        with pytest.raises(HboneRefused) as refused:
            await conn.open_stream(TARGET)
        assert refused.value.status == 403
        assert refused.value.reason == "denied by policy"
        assert conn.open_streams == 0


async def test_failing_handler_answers_500_and_is_counted(pki: Pki) -> None:
    async def broken(request: HboneRequest) -> None:
        raise RuntimeError("boom")

    async with serving(pki.server, broken) as server, connected(server, pki.client) as conn:
        with pytest.raises(HboneRefused) as refused:
            await conn.open_stream(TARGET)
        assert refused.value.status == 500
        assert server.errors["handler_error"] == 1


# --- pool ------------------------------------------------------------------------------------


async def test_pool_reuses_a_connection_per_key_and_respects_max_streams(pki: Pki) -> None:
    pool = HboneConnectionPool(max_streams_per_connection=2)
    hold = asyncio.Event()

    async def idle(request: HboneRequest) -> None:
        request.accept()
        await hold.wait()

    async with serving(pki.server, idle) as server:
        host, port = server.address
        try:
            first = await pool.open_stream(pki.client, SERVER_ID, host, port, TARGET)
            second = await pool.open_stream(pki.client, SERVER_ID, host, port, TARGET)
            assert server.connections_accepted == 1
            await pool.open_stream(pki.client, SERVER_ID, host, port, TARGET)
            assert server.connections_accepted == 2

            # Another source identity never shares a connection.
            other = pki.creds(SpiffeId(TD, "other", "client"))
            await pool.open_stream(other, SERVER_ID, host, port, TARGET)
            assert server.connections_accepted == 3

            # A slot freed on the first connection is used again.
            first.abort()
            second.abort()
            await pool.open_stream(pki.client, SERVER_ID, host, port, TARGET)
            assert server.connections_accepted == 3
            assert len(pool.connections()) == 3
        finally:
            await pool.close()


async def test_pool_shares_one_dial_between_concurrent_callers(pki: Pki) -> None:
    pool = HboneConnectionPool()
    async with serving(pki.server, echo) as server:
        host, port = server.address
        try:
            async with asyncio.timeout(10):
                streams = await asyncio.gather(
                    *(
                        pool.open_stream(pki.client, SERVER_ID, host, port, TARGET)
                        for _ in range(30)
                    )
                )
            assert len(streams) == 30
            assert server.connections_accepted == 1
        finally:
            await pool.close()


async def test_pool_replaces_a_dead_connection_and_uses_new_credentials(pki: Pki) -> None:
    pool = HboneConnectionPool()
    dialled: list[tuple[str, int]] = []
    async with serving(pki.server, echo) as server:
        host, port = server.address

        async def dial() -> socket.socket:
            dialled.append((host, port))
            sock = socket.create_connection((host, port))
            sock.setblocking(False)
            return sock

        try:
            stream = await pool.open_stream(pki.client, SERVER_ID, host, port, TARGET, dial=dial)
            assert await exchange(stream, b"one") == b"one"
            (old,) = pool.connections()
            old.close()
            rotated = pki.creds(CLIENT_ID)
            stream = await pool.open_stream(rotated, SERVER_ID, host, port, TARGET, dial=dial)
            assert await exchange(stream, b"two") == b"two"
            (new,) = pool.connections()
            assert new is not old
            assert len(dialled) == 2
        finally:
            await pool.close()


async def test_pool_honours_the_peers_max_concurrent_streams(pki: Pki) -> None:
    hold = asyncio.Event()

    async def idle(request: HboneRequest) -> None:
        request.accept()
        await hold.wait()

    pool = HboneConnectionPool()  # would allow 100 streams per connection
    async with serving(pki.server, idle, max_concurrent_streams=2) as server:
        host, port = server.address
        try:
            for _ in range(3):
                await pool.open_stream(pki.client, SERVER_ID, host, port, TARGET)
            assert server.connections_accepted == 2
            assert not server.errors
        finally:
            hold.set()
            await pool.close()


async def test_pool_closes_idle_connections(pki: Pki) -> None:
    pool = HboneConnectionPool(idle_timeout=0.2)
    async with serving(pki.server, echo) as server:
        host, port = server.address
        try:
            stream = await pool.open_stream(pki.client, SERVER_ID, host, port, TARGET)
            assert await exchange(stream, b"bye") == b"bye"
            (connection,) = pool.connections()
            await eventually(lambda: not pool.connections())
            assert not connection.is_usable
        finally:
            await pool.close()


# --- abuse -----------------------------------------------------------------------------------


async def test_misbehaving_clients_only_lose_their_own_connection(pki: Pki) -> None:
    async with (
        serving(pki.server, echo, handshake_timeout=0.5) as server,
        connected(server, pki.client) as good,
    ):
        tunnel = await good.open_stream(TARGET)
        host, port = server.address

        # Plain HTTP/1.1 bytes where a TLS ClientHello belongs.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(512))
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
        writer.close()
        await eventually(lambda: server.errors["tls_handshake_failed"] == 1)

        # A client that connects and never says a word.
        _, loris = await asyncio.open_connection(host, port)
        await eventually(lambda: server.errors["tls_handshake_timeout"] == 1)
        loris.close()

        # A header block far over SETTINGS_MAX_HEADER_LIST_SIZE (our client would refuse).
        huge = [(":method", "CONNECT"), (":authority", TARGET), ("x-huge", "a" * 200_000)]
        assert await raw_h2_request(server, pki.client, huge) is None
        await eventually(lambda: server.errors["h2_header_list_too_large"] == 1)

        # The established tunnel and new connections never noticed.
        assert await exchange(tunnel, b"still here") == b"still here"
        async with connected(server, pki.client) as fresh:
            assert await exchange(await fresh.open_stream(TARGET), b"hello") == b"hello"
        assert set(server.errors) == {
            "tls_handshake_failed",
            "tls_handshake_timeout",
            "h2_header_list_too_large",
        }


# --- TLS pieces ------------------------------------------------------------------------------


def test_credentials_read_identity_and_expiry_from_the_leaf(pki: Pki) -> None:
    creds = pki.client
    assert creds.identity == CLIENT_ID
    assert creds.not_after > datetime.now(UTC)
    assert "key_pem" not in repr(creds)


def test_certificate_without_a_spiffe_id_has_no_identity(pki: Pki) -> None:
    serving_chain, _ = pki.ca.issue_serving_certificate(["controlplane.local"])
    leaf = x509.load_pem_x509_certificates(serving_chain)[0]
    with pytest.raises(IdentityError, match="exactly one URI SAN"):
        identity_from_certificate(leaf)


def test_credentials_reject_a_key_that_is_not_the_leafs(pki: Pki) -> None:
    with pytest.raises(IdentityError, match="does not match"):
        WorkloadCredentials.from_pems(
            pki.client.cert_chain_pem, key_to_pem(generate_key()), pki.bundle
        )


def test_contexts_are_tls13_only_and_leave_no_key_material_behind(pki: Pki, tmp_path: Path) -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    for context in (server_context(pki.server), client_context(pki.client)):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert not context.check_hostname
    assert set(os.listdir("/proc/self/fd")) <= fds_before


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("10.0.0.7:8080", (IPv4Address("10.0.0.7"), 8080)),
        ("[fd00::1]:443", (IPv6Address("fd00::1"), 443)),
        ("10.0.0.7:65536", None),
        ("10.0.0.7:+80", None),
        ("fd00::1:443", None),
        ("localhost:80", None),
        (":80", None),
        ("", None),
    ],
)
def test_parse_authority(
    authority: str, expected: tuple[IPv4Address | IPv6Address, int] | None
) -> None:
    assert parse_authority(authority) == expected
