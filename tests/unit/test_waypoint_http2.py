"""HTTP/2 (h2c) on the waypoint: `serve_h2` and `H2ClientConnection` against each other, against
hand-driven h2 peers for what real peers rarely do, and against curl and grpcio, all over
loopback TCP."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.events
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame

from meshway.waypoint.http2 import STREAM_WINDOW, H2ClientConnection, serve_h2
from meshway.waypoint.messages import (
    Body,
    BodyError,
    Request,
    Response,
    TcpStream,
    UpstreamError,
    simple_response,
)
from meshway.waypoint.protocols import H2_PREFACE

pytestmark = pytest.mark.unit

Handler = Callable[[Request], Awaitable[Response]]
MiB = 1 << 20


# --- harness -----------------------------------------------------------------------------------


@dataclass
class ServerRun:
    """A loopback listener running `serve_h2` per connection."""

    port: int = 0
    errors: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def h2_server(
    handler: Handler, *, sniff: bool = False, **options: Any
) -> AsyncIterator[ServerRun]:
    """`sniff`: read the client preface first and hand it over, as the waypoint does."""
    run = ServerRun()

    async def serve(stream: TcpStream) -> None:
        try:
            initial = b""
            while sniff and len(initial) < len(H2_PREFACE):
                initial += await stream.read()
            await serve_h2(stream, handler, initial=initial, on_error=run.errors.append, **options)
        finally:
            await stream.close()

    def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        run.tasks.append(asyncio.get_running_loop().create_task(serve(TcpStream(reader, writer))))

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    run.port = server.sockets[0].getsockname()[1]
    try:
        yield run
    finally:
        server.close()
        await server.wait_closed()
        if run.tasks:
            await asyncio.wait(run.tasks, timeout=5)
        for task in run.tasks:
            task.cancel()
        results = await asyncio.gather(*run.tasks, return_exceptions=True)
    # serve_h2 ends by itself when its client goes, and never raises.
    assert [r for r in results if r is not None] == []


@contextlib.asynccontextmanager
async def h2_client(
    port: int, stream: TcpStream | None = None
) -> AsyncIterator[H2ClientConnection]:
    conn = H2ClientConnection(stream or await TcpStream.connect("127.0.0.1", port))
    try:
        yield conn
    finally:
        await conn.close()


class RecordingStream(TcpStream):
    """A TcpStream that keeps every byte it read, to look at the frames on the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.received = bytearray()

    async def read(self, n: int = 65536) -> bytes:
        data = await super().read(n)
        self.received += data
        return data


def parse_frames(data: bytes) -> list[Frame]:
    frames = []
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        if len(view) < 9 + length:
            break
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait (boundedly) for a condition that other tasks make true."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def settle(value: Callable[[], int], what: str) -> int:
    """Wait until `value` stops changing (a sender stalled by flow control), and return it."""
    last, same = -1, 0
    for _ in range(1000):
        current = value()
        same = same + 1 if current == last else 0
        if same >= 10:
            return current
        last = current
        await asyncio.sleep(0.01)
    raise AssertionError(f"never stopped growing: {what}")


def streamed(payload: bytes, chunk: int = 100_000) -> tuple[Body, Callable[[], int]]:
    """A body fed by a task in chunks (as a downstream connection would), and how much of the
    payload the task has been able to put into it so far."""
    body = Body()
    progress = [0]

    async def produce() -> None:
        for start in range(0, len(payload), chunk):
            await body.put(payload[start : start + chunk])
            progress[0] = start + chunk
        body.end([("x-request-trailer", "done")])

    task = asyncio.get_running_loop().create_task(produce())
    body.on_done = lambda *_: stop(task)
    return body, lambda: min(progress[0], len(payload))


class RawPeer:
    """An HTTP/2 endpoint driven by hand with h2 alone, for what real peers rarely do."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client_side: bool
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = H2Connection(H2Configuration(client_side=client_side, header_encoding=None))
        self.conn.initiate_connection()

    @classmethod
    async def connect(cls, port: int) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, client_side=True)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def flush(self) -> None:
        await self.write(self.conn.data_to_send())

    async def until(self, done: Callable[[h2.events.Event], bool]) -> list[h2.events.Event]:
        """Read and answer (SETTINGS, PING) until an event satisfies `done`; all events seen."""
        seen: list[h2.events.Event] = []
        async with asyncio.timeout(10):
            while not any(done(e) for e in seen):
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("the peer closed the connection")
                seen.extend(self.conn.receive_data(data))
                await self.flush()
        return seen

    def close(self) -> None:
        self.writer.close()


def _request(path: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", path)]


@contextlib.asynccontextmanager
async def raw_server(script: Callable[[RawPeer], Awaitable[None]]) -> AsyncIterator[int]:
    tasks: list[asyncio.Task[None]] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = RawPeer(reader, writer, client_side=False)
        try:
            await peer.flush()
            await script(peer)
        finally:
            writer.close()

    def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.get_running_loop().create_task(run(reader, writer)))

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r for r in results if r is not None] == []


def stop(task: asyncio.Task[None]) -> None:
    task.cancel()


async def echo(request: Request) -> Response:
    data = await request.body.read_all()
    headers = [("x-method", request.method), ("x-path", request.path), ("x-len", str(len(data)))]
    return Response(200, headers, Body.of(data, [("x-trailer", "yes")]))


# --- our server, against our client and against hand-driven clients ------------------------------


async def test_request_fields_and_hop_by_hop_headers() -> None:
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        await request.body.read_all()
        headers = [("x-answer", "42"), ("connection", "close"), ("keep-alive", "5")]
        return Response(204, headers, Body.of())

    async with h2_server(handler, sniff=True) as run, h2_client(run.port) as conn:
        request = Request(
            "GET",
            "/p/q?x=1",
            "svc.ns:8080",
            [
                ("host", "ignored"),
                ("te", "trailers"),
                ("connection", "x-private"),
                ("x-private", "1"),
                ("keep-alive", "300"),
                ("x-kept", "Value With Spaces"),
            ],
        )
        response = await conn.request(request)
        assert response.status == 204
        assert response.headers == [("x-answer", "42")]
        assert await response.body.read_all() == b""
    [got] = seen
    assert (got.method, got.path, got.authority, got.scheme) == (
        "GET",
        "/p/q?x=1",
        "svc.ns:8080",
        "http",
    )
    assert got.protocol == "HTTP/2"
    assert got.headers == [("te", "trailers"), ("x-kept", "Value With Spaces")]
    assert run.errors == []


async def test_streamed_bodies_both_ways_beyond_the_windows() -> None:
    """A 6 MiB request streams through while the response streams back (both bigger than the
    stream and connection windows' first grants), with trailers each way."""
    payload = bytes(range(256)) * (6 * MiB // 256)
    request_trailers: list[Any] = []

    async def stream_back(request: Request) -> Response:
        body = Body()

        async def pump() -> None:
            while chunk := await request.body.read():
                await body.put(chunk)
            request_trailers.append(request.body.trailers)
            body.end([("grpc-status", "0"), ("x-count", "all")])

        task = asyncio.get_running_loop().create_task(pump())
        body.on_done = lambda *_: stop(task)
        return Response(200, [("content-type", "application/octet-stream")], body)

    async with h2_server(stream_back) as run, h2_client(run.port) as conn:
        request_body, _ = streamed(payload)
        response = await conn.request(Request("POST", "/up", "svc", [], request_body))
        assert response.status == 200
        digest = hashlib.sha256()
        size = 0
        while chunk := await response.body.read():
            digest.update(chunk)
            size += len(chunk)
        assert size == len(payload)
        assert digest.digest() == hashlib.sha256(payload).digest()
        assert response.body.trailers == [("grpc-status", "0"), ("x-count", "all")]
    assert request_trailers == [[("x-request-trailer", "done")]]


async def test_a_slow_handler_pauses_the_client_by_flow_control() -> None:
    payload = b"z" * (8 * MiB)
    reading = asyncio.Event()
    bodies: list[Body] = []

    async def lazy(request: Request) -> Response:
        bodies.append(request.body)
        await reading.wait()
        return simple_response(200, str(len(await request.body.read_all())))

    async with h2_server(lazy) as run, h2_client(run.port) as conn:
        request_body, progress = streamed(payload)
        call = asyncio.ensure_future(conn.request(Request("POST", "/", "svc", [], request_body)))
        stalled_at = await settle(progress, "the client's upload")
        [server_body] = bodies
        # Held back by HTTP/2 flow control: the server buffers at most its body limit plus
        # one stream window, and the client's producer is blocked on its own bounded body.
        assert stalled_at < len(payload)
        assert server_body.buffered <= server_body.limit + STREAM_WINDOW
        reading.set()
        response = await call
        assert await response.body.read_all() == str(len(payload)).encode()


async def test_a_slow_response_reader_pauses_the_handler() -> None:
    payload = b"r" * (8 * MiB)
    produced = [0]

    async def firehose(request: Request) -> Response:
        body = Body()

        async def produce() -> None:
            for start in range(0, len(payload), 64 * 1024):
                await body.put(payload[start : start + 64 * 1024])
                produced[0] = start
            body.end()

        task = asyncio.get_running_loop().create_task(produce())
        body.on_done = lambda *_: stop(task)
        return Response(200, [], body)

    async with h2_server(firehose) as run, h2_client(run.port) as conn:
        response = await conn.request(Request("GET", "/", "svc"))
        stalled_at = await settle(lambda: produced[0], "the handler's response body")
        assert stalled_at < len(payload)
        assert response.body.buffered <= response.body.limit + STREAM_WINDOW
        assert len(await response.body.read_all()) == len(payload)


async def test_an_early_answer_stops_the_upload() -> None:
    payload = b"u" * (16 * MiB)

    async def forbid(request: Request) -> Response:
        request.body.cancel()  # answered without reading, as a denied request is
        return simple_response(403, "denied")

    async with h2_server(forbid) as run, h2_client(run.port) as conn:
        request_body, progress = streamed(payload)
        response = await conn.request(Request("POST", "/", "svc", [], request_body))
        assert response.status == 403
        assert await response.body.read_all() == b"denied"
        # The exchange is over on both sides: the client stopped uploading.
        await eventually(lambda: conn.idle_since is not None, "the stream is closed")
        assert await settle(progress, "the upload") < len(payload)
        assert conn.is_usable
    assert run.errors == []


async def test_trailers_only_response_is_one_headers_frame() -> None:
    async def not_found(request: Request) -> Response:
        headers = [
            ("content-type", "application/grpc"),
            ("grpc-status", "5"),
            ("grpc-message", "no such thing"),
        ]
        return Response(200, headers, Body.of())

    async with h2_server(not_found) as run:
        reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
        stream = RecordingStream(reader, writer)
        async with h2_client(run.port, stream) as conn:
            response = await conn.request(Request("POST", "/pkg.Svc/Get", "svc"))
            assert response.header("grpc-status") == "5"
            assert response.header("grpc-message") == "no such thing"
            assert response.body.finished and response.body.trailers is None
        on_stream = [f for f in parse_frames(bytes(stream.received)) if f.stream_id == 1]
        assert [type(f) for f in on_stream] == [HeadersFrame]
        assert "END_STREAM" in on_stream[0].flags


async def test_many_concurrent_requests_respect_the_servers_stream_limit() -> None:
    limit = 20
    in_flight = [0]
    peak = [0]
    full = asyncio.Event()

    async def handler(request: Request) -> Response:
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        if in_flight[0] == limit:
            full.set()
        try:
            await full.wait()
            return simple_response(200, request.path)
        finally:
            in_flight[0] -= 1

    async with (
        h2_server(handler, max_concurrent_streams=limit) as run,
        h2_client(run.port) as conn,
    ):
        # The first exchange brings the server's SETTINGS (its stream limit) to the client.
        full.set()
        assert (await conn.request(Request("GET", "/warm", "svc"))).status == 200
        full.clear()
        assert conn.available_streams == limit

        async def call(i: int) -> bytes:
            response = await conn.request(Request("GET", f"/{i}", "svc"))
            return await response.body.read_all()

        results = await asyncio.gather(*(call(i) for i in range(200)))
        assert results == [f"/{i}".encode() for i in range(200)]
        assert peak[0] == limit
        await eventually(lambda: conn.idle_since is not None, "the connection becomes idle")
        assert conn.available_streams == limit and conn.is_usable
    assert run.errors == []


async def test_handler_exception_is_a_500_and_the_connection_goes_on() -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        return simple_response(200, "fine")

    async with h2_server(handler) as run, h2_client(run.port) as conn:
        failed = await conn.request(Request("GET", "/boom", "svc"))
        assert failed.status == 500
        await failed.body.read_all()
        fine = await conn.request(Request("GET", "/ok", "svc"))
        assert await fine.body.read_all() == b"fine"
    assert any("handler bug" in error for error in run.errors)


async def test_response_body_failure_after_the_headers_resets_the_stream() -> None:
    async def handler(request: Request) -> Response:
        body = Body()
        body.put_nowait(b"partial")
        asyncio.get_running_loop().call_soon(body.fail, BodyError("upstream died"))
        return Response(200, [], body)

    async with h2_server(handler) as run, h2_client(run.port) as conn:
        response = await conn.request(Request("GET", "/", "svc"))
        assert response.status == 200
        with pytest.raises(BodyError, match="INTERNAL_ERROR"):
            await response.body.read_all()
        assert conn.is_usable


async def test_cancelling_the_client_cancels_the_handler() -> None:
    started = asyncio.Event()
    outcome: list[str] = []

    async def handler(request: Request) -> Response:
        if request.path != "/hang":
            return simple_response(200, "fine")
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        return simple_response(200, "unreachable")

    async with h2_server(handler) as run, h2_client(run.port) as conn:
        body = Body()  # still open: the upload is in progress when the caller gives up
        call = asyncio.ensure_future(conn.request(Request("POST", "/hang", "svc", [], body)))
        await started.wait()
        call.cancel()  # as a timeout around the call would
        with pytest.raises(asyncio.CancelledError):
            await call
        await eventually(lambda: outcome == ["cancelled"], "the handler is cancelled")
        # The stream is gone on the client too, and the connection serves the next request.
        assert conn.idle_since is not None and conn.is_usable
        response = await conn.request(Request("GET", "/next", "svc"))
        assert await response.body.read_all() == b"fine"


async def test_server_finishes_in_flight_streams_after_the_clients_goaway() -> None:
    release = asyncio.Event()

    async def handler(request: Request) -> Response:
        await release.wait()
        return simple_response(200, "finished")

    async with h2_server(handler) as run:
        peer = await RawPeer.connect(run.port)
        peer.conn.send_headers(1, _request(b"/slow"), end_stream=True)
        await peer.flush()
        # A GOAWAY then a PING: the server has handled the GOAWAY once the PING comes back.
        await peer.write(GoAwayFrame(0, last_stream_id=0).serialize())
        peer.conn.ping(b"12345678")
        await peer.flush()
        await peer.until(lambda e: isinstance(e, h2.events.PingAckReceived))
        release.set()
        events = await peer.until(lambda e: isinstance(e, h2.events.StreamEnded))
        responses = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        data = b"".join(e.data or b"" for e in events if isinstance(e, h2.events.DataReceived))
        assert [dict(r.headers)[b":status"] for r in responses] == [b"200"]
        assert data == b"finished"
        peer.close()


@pytest.mark.parametrize(
    "attack",
    ["garbage", "missing_path", "huge_headers"],
)
async def test_malformed_input_gets_goaway_and_never_crashes_the_server(attack: str) -> None:
    async with h2_server(echo) as run:
        reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
        if attack == "garbage":
            writer.write(H2_PREFACE + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        else:
            conn = H2Connection(
                H2Configuration(
                    client_side=True, header_encoding=None, validate_outbound_headers=False
                )
            )
            conn.initiate_connection()
            if attack == "missing_path":
                headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x")]
            else:
                headers = [*_request(b"/"), (b"x-big", b"v" * (80 * 1024))]
            conn.send_headers(1, headers, end_stream=True)
            writer.write(conn.data_to_send())
        async with asyncio.timeout(10):
            reply = await reader.read()  # until the server closes
        writer.close()
        goaways = [f for f in parse_frames(reply) if isinstance(f, GoAwayFrame)]
        assert len(goaways) == 1 and goaways[0].error_code != ErrorCodes.NO_ERROR
        # The listener still serves the next client.
        async with h2_client(run.port) as client:
            response = await client.request(Request("POST", "/", "svc", [], Body.of(b"ok")))
            assert await response.body.read_all() == b"ok"
    assert any("protocol error" in error for error in run.errors)


# --- our client against hand-driven servers ----------------------------------------------------


async def test_upstream_reset_before_the_headers_is_an_upstream_error() -> None:
    async def refuse(peer: RawPeer) -> None:
        for _ in range(2):
            events = await peer.until(lambda e: isinstance(e, h2.events.RequestReceived))
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    peer.conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
            await peer.flush()
        with contextlib.suppress(ConnectionError):
            await peer.until(lambda e: False)

    async with raw_server(refuse) as port, h2_client(port) as conn:
        for _ in range(2):  # a reset stream leaves the connection usable
            with pytest.raises(UpstreamError, match="REFUSED_STREAM") as failure:
                await conn.request(Request("GET", "/", "svc"))
            assert failure.value.connected
            assert conn.is_usable


async def test_upstream_goaway_fails_only_the_unprocessed_streams() -> None:
    closed = asyncio.Event()

    async def go_away(peer: RawPeer) -> None:
        events = await peer.until(
            lambda e: isinstance(e, h2.events.RequestReceived) and e.stream_id == 3
        )
        assert {e.stream_id for e in events if isinstance(e, h2.events.RequestReceived)} == {1, 3}
        # GOAWAY written by hand: h2's own would close its state machine for stream 1 too.
        await peer.write(GoAwayFrame(0, last_stream_id=1).serialize())
        peer.conn.send_headers(1, [(b":status", b"200")])
        peer.conn.send_data(1, b"still answered", end_stream=True)
        await peer.flush()
        with contextlib.suppress(ConnectionError):
            await peer.until(lambda e: False)
        closed.set()

    async with raw_server(go_away) as port, h2_client(port) as conn:
        first = asyncio.ensure_future(conn.request(Request("GET", "/1", "svc")))
        await asyncio.sleep(0)  # stream 1 goes out before stream 3
        second = asyncio.ensure_future(conn.request(Request("GET", "/3", "svc")))
        response = await first
        assert await response.body.read_all() == b"still answered"
        with pytest.raises(UpstreamError, match="GOAWAY"):
            await second
        assert not conn.is_usable and conn.available_streams == 0
        with pytest.raises(UpstreamError):
            await conn.request(Request("GET", "/later", "svc"))
        # With its last stream done, the client hangs up by itself.
        async with asyncio.timeout(10):
            await closed.wait()


# --- real clients: curl ------------------------------------------------------------------------


async def curl(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", "--http2-prior-knowledge", *args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def test_curl_prior_knowledge_get_and_post() -> None:
    async def handler(request: Request) -> Response:
        data = await request.body.read_all()
        if request.path == "/missing":
            return simple_response(404, "nope\n", [("x-reason", "none here")])
        headers = [
            ("x-method", request.method),
            ("x-path", request.path),
            ("x-protocol", request.protocol),
            ("x-test", request.header("x-test") or ""),
            ("x-sha", hashlib.sha256(data).hexdigest()),
        ]
        return Response(200, headers, Body.of(b"got %d bytes\n" % len(data)))

    async with h2_server(handler, sniff=True) as run:
        base = f"http://127.0.0.1:{run.port}"
        # curl 7.88 cannot reuse a prior-knowledge connection (curl#10634): one URL per run.
        code, out, err = await curl("-D", "-", "-H", "x-test: hello", f"{base}/a?b=1")
        assert code == 0, err
        assert out.startswith("HTTP/2 200")
        assert "x-method: GET" in out and "x-path: /a?b=1" in out and "x-test: hello" in out
        assert "x-protocol: HTTP/2" in out and out.endswith("got 0 bytes\n")

        payload = bytes(range(256)) * (3 * MiB // 256)
        code, out, err = await curl("-D", "-", "--data-binary", "@-", f"{base}/up", stdin=payload)
        assert code == 0, err
        assert f"x-sha: {hashlib.sha256(payload).hexdigest()}" in out
        assert out.endswith(f"got {len(payload)} bytes\n")

        code, out, err = await curl("-D", "-", f"{base}/missing")
        assert code == 0, err
        assert out.startswith("HTTP/2 404") and "x-reason: none here" in out
        assert out.endswith("nope\n")
    assert run.errors == []


# --- real clients and servers: grpcio through serve_h2 and H2ClientConnection -----------------


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"echo:" + request


async def _server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(20):
        yield b"%d:" % i + request * 10_000


async def _not_found(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())
    raise AssertionError("abort returns by raising")


async def _bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request.upper()


@contextlib.asynccontextmanager
async def grpc_through_waypoint() -> AsyncIterator[grpc.aio.Channel]:
    """grpcio client -> serve_h2 -> H2ClientConnection -> grpcio server, all on loopback."""
    handlers = grpc.method_handlers_generic_handler(
        "pkg.Svc",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
            "NotFound": grpc.unary_unary_rpc_method_handler(_not_found),
            "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers,))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    upstream = H2ClientConnection(await TcpStream.connect("127.0.0.1", grpc_port))

    async def forward(request: Request) -> Response:
        return await upstream.request(request)

    try:
        async with h2_server(forward) as run:
            # A subchannel of its own, so that closing the channel closes its connection.
            options = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{run.port}", options=options) as ch:
                yield ch
        assert run.errors == []
    finally:
        await upstream.close()
        await server.stop(None)


async def test_grpc_calls_pass_through_intact() -> None:
    async with grpc_through_waypoint() as channel:
        unary = channel.unary_unary(
            "/pkg.Svc/Unary", request_serializer=None, response_deserializer=None
        )
        assert await unary(b"hello", timeout=10) == b"echo:hello"

        stream = channel.unary_stream(
            "/pkg.Svc/ServerStream", request_serializer=None, response_deserializer=None
        )
        replies = [reply async for reply in stream(b"ab", timeout=10)]
        assert replies == [b"%d:" % i + b"ab" * 10_000 for i in range(20)]

        code, details = await _failed_call(channel, "/pkg.Svc/NotFound", b"widget")
        assert code == grpc.StatusCode.NOT_FOUND
        assert details == "no such thing: widget"

        assert await _ping_pong(channel, [b"one", b"two", b"three"]) == [b"ONE", b"TWO", b"THREE"]


# The calls below run in functions of their own: a call object still alive (a local, or the
# frames of a kept traceback) keeps grpcio's connection open after its channel is closed.


async def _failed_call(
    channel: grpc.aio.Channel, method: str, request: bytes
) -> tuple[grpc.StatusCode, str | None]:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        await call(request, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()
    raise AssertionError(f"{method} succeeded")


async def _ping_pong(channel: grpc.aio.Channel, words: list[bytes]) -> list[bytes]:
    """A bidirectional call, one message each way at a time."""
    bidi = channel.stream_stream(
        "/pkg.Svc/Bidi", request_serializer=None, response_deserializer=None
    )
    call = bidi(None, timeout=10)
    answers: list[bytes] = []
    for word in words:
        await call.write(word)
        answer = await call.read()
        assert isinstance(answer, bytes)
        answers.append(answer)
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    return answers
