"""Test applications for the waypoint's end-to-end tests, run inside pods.

l7app.py http PORT VERSION [DELAY [STATUS]]
                             an HTTP/1.1 server (aiohttp): JSON echo of each request (after
                             DELAY seconds, with STATUS), /slow (2 s), /flaky/KEY (503 twice,
                             then 200), /ws (WebSocket echo), /_count (echoes so far, by host)
l7app.py hits URL N C [H..]  N GETs, C at a time (aiohttp); prints what each got (JSON)
l7app.py load URL S C [H..]  GETs for S seconds, C at a time (at most 20000); prints counts by
                             status (and by the first header's value), the retry-after values
                             and bodies of non-200 answers, and the seconds it took (JSON)
l7app.py grpc PORT           a gRPC server (grpcio, generic handlers): demo.Echo/Say (unary),
                             demo.Echo/Count (server streaming), demo.Echo/Fail (NOT_FOUND)
l7app.py grpc-says TARGET N  N demo.Echo/Say calls; prints each one's status and details (JSON)
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys


def http(port: int, version: str, delay: float = 0.0, status: int = 200) -> None:
    from aiohttp import web

    flaky: collections.Counter[str] = collections.Counter()
    hosts: collections.Counter[str] = collections.Counter()

    async def echo(request: web.Request) -> web.Response:
        hosts[request.host] += 1
        body = await request.read()
        if delay:
            await asyncio.sleep(delay)
        data = {
            "version": version,
            "method": request.method,
            "path": request.path_qs,
            "host": request.host,
            "http_version": f"{request.version.major}.{request.version.minor}",
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_bytes": len(body),
        }
        return web.json_response(data, status=status, headers={"x-version": version})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text=f"{version} slow\n")

    async def flaky_handler(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        flaky[key] += 1
        if flaky[key] <= 2:
            return web.Response(status=503, text=f"failure {flaky[key]}\n")
        return web.Response(text=f"{version} ok after {flaky[key]} tries\n")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str(f"{version}:{msg.data}")
        return sock

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"count": sum(hosts.values()), "hosts": dict(hosts)})

    app = web.Application()
    app.router.add_get("/_count", count)
    app.router.add_get("/ws", ws)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/flaky/{key}", flaky_handler)
    app.router.add_route("*", "/{tail:.*}", echo)
    web.run_app(app, host="0.0.0.0", port=port, print=None, access_log=None)


def grpc_server(port: int) -> None:
    import grpc

    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"hello " + request

    def count(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        for i in range(int(request or b"3")):
            yield str(i).encode()

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b""

    handler = grpc.method_handlers_generic_handler(
        "demo.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    server.wait_for_termination()


def grpc_client(target: str) -> None:
    """Prints one JSON line with the results of the three calls."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        say = channel.unary_unary("/demo.Echo/Say")
        count = channel.unary_stream("/demo.Echo/Count")
        fail = channel.unary_unary("/demo.Echo/Fail")
        result: dict[str, object] = {"say": say(b"mesh", timeout=5).decode()}
        result["count"] = [m.decode() for m in count(b"4", timeout=5)]
        try:
            fail(b"", timeout=5)
            result["fail"] = "no error"
        except grpc.RpcError as exc:
            result["fail"] = [exc.code().name, exc.details()]
    print(json.dumps(result))


def grpc_says(target: str, total: int) -> None:
    """`total` unary calls, one after another; prints [[status, details], ...] as JSON."""
    import grpc

    results = []
    with grpc.insecure_channel(target) as channel:
        say = channel.unary_unary("/demo.Echo/Say")
        for _ in range(total):
            try:
                results.append(["OK", say(b"mesh", timeout=5).decode()])
            except grpc.RpcError as exc:
                results.append([exc.code().name, exc.details()])
    print(json.dumps(results))


def ws_client(url: str) -> None:
    import aiohttp

    async def run() -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            replies = []
            for word in ("one", "two", "three"):
                await ws.send_str(word)
                replies.append(await ws.receive_str())
            print(json.dumps(replies))

    asyncio.run(run())


def hits(url: str, total: int, concurrency: int, headers: list[str]) -> None:
    """`total` GETs of `url`, `concurrency` at a time; prints one JSON object: for each request
    in order its status, the answering server's version, and any set-cookie. A header
    "name: value" may use {i}, the request's number."""
    import aiohttp

    results: list[dict[str, object] | None] = [None] * total
    numbers = iter(range(total))

    async def worker(session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        for i in numbers:
            sent = dict(h.format(i=i).split(": ", 1) for h in headers)
            started = loop.time()
            async with session.get(url, headers=sent) as response:
                body = await response.read()
                results[i] = {
                    "code": response.status,
                    "version": response.headers.get("x-version"),
                    "set_cookie": response.headers.get("set-cookie"),
                    "body": body.decode(errors="replace")[:200],
                    "ms": round((loop.time() - started) * 1000, 1),
                }

    async def main() -> None:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))

    asyncio.run(main())
    print(json.dumps(results))


def load(url: str, seconds: float, concurrency: int, headers: list[str]) -> None:
    """As fast as it can for `seconds` (bounded in count too); a header "name: value" may use
    {i}, the request's number, or {k}, i % 2 (two keys taking turns)."""
    import time

    import aiohttp

    codes: collections.Counter[str] = collections.Counter()
    by_key: collections.Counter[str] = collections.Counter()
    retry_after: collections.Counter[str] = collections.Counter()
    bodies: collections.Counter[str] = collections.Counter()
    numbers = iter(range(20000))
    first: list[float] = []
    last: list[float] = []

    async def worker(session: aiohttp.ClientSession, deadline: float) -> None:
        for i in numbers:
            if time.monotonic() >= deadline:
                return
            sent = dict(h.format(i=i, k=i % 2).split(": ", 1) for h in headers)
            if not first:
                first.append(time.monotonic())
            async with session.get(url, headers=sent) as response:
                body = await response.read()
            last[:] = [time.monotonic()]
            codes[str(response.status)] += 1
            if headers:
                by_key[f"{next(iter(sent.values()))} {response.status}"] += 1
            if response.status != 200:
                retry_after[response.headers.get("retry-after", "-")] += 1
                bodies[body.decode(errors="replace")[:60]] += 1

    async def main() -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(worker(session, deadline) for _ in range(concurrency)))

    asyncio.run(main())
    result = {
        "codes": codes,
        "by_key": by_key,
        "retry_after": retry_after,
        "bodies": bodies,
        "seconds": (last[0] - first[0]) if first and last else 0.0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "http":
        extra = sys.argv[4:]
        http(
            int(sys.argv[2]),
            sys.argv[3],
            float(extra[0]) if extra else 0.0,
            int(extra[1]) if len(extra) > 1 else 200,
        )
    elif mode == "hits":
        hits(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    elif mode == "load":
        load(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    elif mode == "grpc":
        grpc_server(int(sys.argv[2]))
    elif mode == "grpc-client":
        grpc_client(sys.argv[2])
    elif mode == "grpc-says":
        grpc_says(sys.argv[2], int(sys.argv[3]))
    elif mode == "ws-client":
        ws_client(sys.argv[2])
    else:
        raise SystemExit(__doc__)
