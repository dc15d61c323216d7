"""HTTP/1.1 on the waypoint: `serve_h1` against curl and raw bytes, `H1ClientConnection`
against a real HTTP server, both over loopback TCP."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from meshway.waypoint.http1 import H1ClientConnection, H1Limits, copy_both_ways, serve_h1
from meshway.waypoint.messages import Body, Request, Response, TcpStream, simple_response
from meshway.waypoint.protocols import sniff

pytestmark = pytest.mark.unit

Handler = Callable[[Request], Awaitable[Response]]


@contextlib.asynccontextmanager
async def h1_server(handler: Handler, limits: H1Limits | None = None) -> AsyncIterator[int]:
    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = TcpStream(reader, writer)
        try:
            await serve_h1(stream, handler, limits=limits)
        finally:
            await stream.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def echo(request: Request) -> Response:
    data = await request.body.read_all()
    headers = [("x-method", request.method), ("x-path", request.path)]
    return Response(200, headers, Body.of(data))


async def curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "--max-time", "10", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def test_curl_get_post_and_keep_alive() -> None:
    async with h1_server(echo) as port:
        url = f"http://127.0.0.1:{port}"
        code, out, _ = await curl("-d", "hello", "-D", "-", f"{url}/a?x=1", f"{url}/b")
        assert code == 0
        assert "x-method: POST" in out and "x-path: /a?x=1" in out and "hello" in out
        assert "x-path: /b" in out
        # curl reuses the connection for the second URL only if we kept it alive.
        _, _, err = await curl("-v", f"{url}/1", f"{url}/2")
        assert "Re-using existing connection" in err or "left intact" in err


async def test_chunked_upload_and_large_body_stream() -> None:
    payload = b"x" * (3 * 1024 * 1024 + 7)

    async def count(request: Request) -> Response:
        size = len(await request.body.read_all())
        return simple_response(200, str(size))

    async with h1_server(count) as port:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-s", "--max-time", "10", "-H", "Transfer-Encoding: chunked",
            "--data-binary", "@-", f"http://127.0.0.1:{port}/up",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate(payload)
        assert out.decode() == str(len(payload))


async def test_streamed_response_body_is_chunked() -> None:
    async def stream(request: Request) -> Response:
        body = Body()

        async def produce() -> None:
            for i in range(5):
                await body.put(f"part{i};".encode())
                await asyncio.sleep(0.01)
            body.end()

        task = asyncio.ensure_future(produce())
        body.on_done = lambda *_: task.cancel()
        return Response(200, [], body)

    async with h1_server(stream) as port:
        reply = await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"transfer-encoding: chunked" in reply
    assert reply.count(b"part") == 5 and reply.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(200)) + b"\r\n", b"431"),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", b"413"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
    ],
)
async def test_malformed_requests_get_a_status_and_a_close(
    request_bytes: bytes, status: bytes
) -> None:
    async with h1_server(echo) as port:
        reply = await raw(port, request_bytes)
        assert reply.startswith(b"HTTP/1.1 " + status), reply[:80]
        assert b"connection: close" in reply.lower()
        # The server still serves the next client.
        code, out, _ = await curl(f"http://127.0.0.1:{port}/ok")
        assert code == 0 and out == ""


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def slow_first(request: Request) -> Response:
        if request.path == "/1":
            await asyncio.sleep(0.05)
        return simple_response(200, request.path)

    async with h1_server(slow_first) as port:
        reply = await raw(
            port,
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    bodies = [part.rsplit(b"\r\n\r\n", 1)[-1] for part in reply.split(b"HTTP/1.1 200 OK")[1:]]
    assert [b[:2] for b in bodies] == [b"/1", b"/2", b"/3"]


@contextlib.asynccontextmanager
async def http_server() -> AsyncIterator[int]:
    """A real HTTP server (aiohttp) to test our client against."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/chunked":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f"c{i}".encode())
            await resp.write_eof()
            return resp
        body = await request.read()
        return web.Response(body=body or b"empty", headers={"x-seen-host": request.host})

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str("echo:" + msg.data)
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not() -> None:
    limits = H1Limits(idle_timeout=0.3)
    async with h1_server(echo, limits) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Busy for twice the idle limit: a request every 0.1 s keeps it open.
            for _ in range(6):
                writer.write(b"GET /busy HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                await asyncio.sleep(0.1)
            # Then idle: closed after about the limit.
            started = asyncio.get_running_loop().time()
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            assert asyncio.get_running_loop().time() - started < 2
        finally:
            writer.close()


async def test_client_reuses_a_kept_alive_connection() -> None:
    idle: list[H1ClientConnection] = []
    async with http_server() as port:
        conn = H1ClientConnection(await TcpStream.connect("127.0.0.1", port), idle.append)
        first = await conn.request(Request("POST", "/x", "svc", [], Body.of(b"payload")))
        assert first.status == 200 and await first.body.read_all() == b"payload"
        assert first.header("x-seen-host") == "svc"
        await asyncio.sleep(0)
        assert idle == [conn] and conn.is_usable
        second = await conn.request(Request("GET", "/chunked", "svc"))
        assert await second.body.read_all() == b"c0c1c2"
        conn.close()


async def test_responses_leave_no_reference_cycles_for_the_collector() -> None:
    """Each response read must be freed by reference counting alone: a cycle per response
    (the parser and its callbacks' object referring to each other) made the garbage collector
    run every few dozen requests in a busy waypoint, at a cost of 10-20 µs per request."""
    import gc

    idle: list[H1ClientConnection] = []
    async with http_server() as port:
        conn = H1ClientConnection(await TcpStream.connect("127.0.0.1", port), idle.append)
        for path in ("/x", "/chunked"):  # warm up: imports, caches
            await (await conn.request(Request("GET", path, "svc"))).body.read_all()
            await asyncio.sleep(0)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(20):
                response = await conn.request(Request("GET", ("/x", "/chunked")[i % 2], "svc"))
                await response.body.read_all()
                await asyncio.sleep(0)
            del response
            gc.collect()
            leaked = sorted(
                {type(o).__qualname__ for o in gc.garbage if "waypoint" in type(o).__module__}
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        conn.close()
    assert leaked == []


async def test_websocket_upgrade_through_serve_h1() -> None:
    """serve_h1 in front of a real WebSocket server: the 101 and the frames pass through."""
    import aiohttp

    async with http_server() as upstream_port:

        async def forward(request: Request) -> Response:
            stream = await TcpStream.connect("127.0.0.1", upstream_port)
            conn = H1ClientConnection(stream, lambda _: None)
            return await conn.request(request)

        async with (
            h1_server(forward) as port,
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws,
        ):
            await ws.send_str("hi")
            assert (await ws.receive_str()) == "echo:hi"
            await ws.send_str("again")
            assert (await ws.receive_str()) == "echo:again"


async def test_copy_both_ways_half_closes() -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(data.upper())
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def front(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = await TcpStream.connect("127.0.0.1", port)
        await copy_both_ways(TcpStream(reader, writer), up)
        writer.close()

    proxy = await asyncio.start_server(front, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    writer.write(b"abc")
    writer.write_eof()
    assert await reader.read() == b"ABC"
    writer.close()
    proxy.close()
    server.close()


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http2"),
        (b"PRI * HTTP/2", ""),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", "http1"),
        (b"DELETE /x HTTP/1.0\r\n", "http1"),
        (b"GET /incomplete", ""),
        (b"\x16\x03\x01\x02\x00", "tcp"),
        (b"SSH-2.0-OpenSSH\r\n", "tcp"),
        (b"HELLO world\r\n", "tcp"),
    ],
)
def test_sniff(first: bytes, kind: str) -> None:
    assert sniff(first) == kind


def test_the_waypoint_settles_its_heap_before_serving() -> None:
    """What is loaded at start is frozen and young collections are rarer (in a subprocess:
    the collector's settings are the whole process's)."""
    import subprocess
    import sys

    code = (
        "import gc; from meshway.waypoint.server import settle_heap, YOUNG_GC_THRESHOLD;"
        "before = gc.get_freeze_count(); settle_heap();"
        "print(gc.get_freeze_count() > before + 1000, gc.get_threshold()[0] == YOUNG_GC_THRESHOLD)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
