"""HTTP/1.1 on a `ByteStream`: the waypoint's server side (what clients send) and client side
(what it sends to an endpoint), parsed by httptools (llhttp, the parser of Node.js).

The server reads requests in order and answers them in order: keep-alive, pipelining, chunked
and content-length bodies, `Expect: 100-continue`, and `Upgrade` (WebSocket): once the upstream
answers 101, both directions are copied as raw bytes. Bodies stream through a bounded `Body`:
while the handler has not taken what was read, the connection is not read further, so a slow
upstream pushes back on the client instead of filling memory.

Malformed input gets a status and a closed connection, never an exception out of `serve_h1`:
400 for a syntax error (including both Content-Length and Transfer-Encoding), 414 for an
over-long request target, 431 for too many or too large headers, 413 for a declared body over
the limit, 501 for a transfer coding we do not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import httptools

from meshway.waypoint.messages import (
    STREAM_ERRORS,
    Body,
    BodyError,
    ByteStream,
    Headers,
    Request,
    Response,
    UpstreamError,
    end_to_end,
    simple_response,
)

log = logging.getLogger(__name__)

READ_SIZE = 65536
# Methods whose requests carry no body unless they say so: an empty one gets no Content-Length.
_BODY_OR_STREAM: tuple[type[Exception], ...] = (BodyError, *STREAM_ERRORS)
_PARSE_BODY_OR_STREAM: tuple[type[Exception], ...] = (httptools.HttpParserError, *_BODY_OR_STREAM)
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})
MAX_PIPELINED = 16


@dataclass(frozen=True)
class H1Limits:
    max_target: int = 16 * 1024
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_body: int = 1 << 30
    # How long an idle keep-alive connection is kept open by the server.
    idle_timeout: float = 300.0


Handler = Callable[[Request], Awaitable[Response]]


class _RequestError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def _reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def _head(first_line: bytes, headers: Headers) -> bytearray:
    out = bytearray(first_line)
    out += "".join([f"\r\n{name}: {value}" for name, value in headers]).encode("latin-1")
    out += b"\r\n\r\n"
    return out


def _framing(headers: Headers, body: Body, *, bodyless: bool) -> tuple[Headers, bool]:
    """The headers to send with the framing header for `body`, and whether to chunk it."""
    if bodyless:
        return headers, False
    if body.ended:  # all of it is here: its length is known
        headers = [h for h in headers if h[0] != "content-length"]
        headers.append(("content-length", str(body.buffered)))
        return headers, False
    if body.length is not None:
        return [*headers, ("content-length", str(body.length))], False
    return [*headers, ("transfer-encoding", "chunked")], True


async def _write_body(stream: ByteStream, head: bytearray, body: Body, chunked: bool) -> int:
    """Write the head and the body in as few writes as possible; the body bytes written."""
    sent = 0
    while True:
        chunk = await body.read()
        if not chunk:
            break
        sent += len(chunk)
        if chunked:
            head += b"%x\r\n%s\r\n" % (len(chunk), chunk)
        else:
            head += chunk
        if not body.buffered:  # nothing more queued: send what we have
            await stream.write(head)
            head = bytearray()
    if chunked:
        head += b"0\r\n"
        for name, value in body.trailers or []:
            head += b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
        head += b"\r\n"
    if head:
        await stream.write(head)
    return sent


class _ServerParser:
    """httptools callbacks for one connection's requests."""

    def __init__(self, limits: H1Limits) -> None:
        self.limits = limits
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[Request] = deque()
        self.body: Body | None = None
        self._url = bytearray()
        self._headers: Headers = []
        self._header_bytes = 0
        self._in_trailers = False
        self._trailers: Headers = []
        self.keep_alive: deque[bool] = deque()

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = []
        self._header_bytes = 0
        self._in_trailers = False
        self._trailers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_target:
            raise _RequestError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._in_trailers:
            self._trailers.append((name.decode("latin-1").lower(), value.decode("latin-1")))
            return
        if self._header_bytes > self.limits.max_header_bytes:
            raise _RequestError(431, "request headers too large")
        if len(self._headers) >= self.limits.max_headers:
            raise _RequestError(431, "too many request headers")
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self.parser
        headers = self._headers
        length: int | None = None
        authority = ""
        upgrade: str | None = None
        te = ""
        connection = ""
        for name, value in headers:
            if name == "content-length":
                length = int(value)
            elif name == "host":
                authority = value  # carried as the authority, not as a header
            elif name == "transfer-encoding":
                te = value.lower()
            elif name == "connection":
                connection = value.lower()
            elif name == "upgrade":
                upgrade = value
        if te and te.rsplit(",", 1)[-1].strip() != "chunked":
            raise _RequestError(501, f"transfer coding {te!r} not implemented")
        if length is not None and length > self.limits.max_body:
            raise _RequestError(413, "request body too large")
        if upgrade is not None and "upgrade" not in connection:
            upgrade = None
        method = parser.get_method().decode()
        body = Body(length=length)
        if length == 0 or (length is None and not te):
            body.end()
        else:
            self.body = body
        headers = [h for h in headers if h[0] != "host"]
        request = Request(
            method,
            self._url.decode("latin-1"),
            authority,
            end_to_end(headers) if upgrade is None else _with_upgrade(headers, upgrade),
            body,
            "http",
            "HTTP/1.1" if parser.get_http_version() == "1.1" else "HTTP/1.0",
            upgrade,
        )
        self.ready.append(request)
        self.keep_alive.append(parser.should_keep_alive() and upgrade is None)
        self._in_trailers = True

    def on_body(self, data: bytes) -> None:
        if self.body is not None:
            self.body.put_nowait(data)

    def on_message_complete(self) -> None:
        if self.body is not None:
            self.body.end(self._trailers or None)
            self.body = None


def _with_upgrade(headers: Headers, upgrade: str) -> Headers:
    kept = end_to_end(headers)
    return [*kept, ("connection", "upgrade"), ("upgrade", upgrade)]


async def serve_h1(
    stream: ByteStream,
    handler: Handler,
    *,
    initial: bytes = b"",
    limits: H1Limits | None = None,
) -> None:
    """Serve HTTP/1.1 requests on `stream` until the client closes or an error ends it."""
    server = _H1Server(stream, handler, limits or H1Limits())
    await server.run(initial)


class _H1Server:
    def __init__(self, stream: ByteStream, handler: Handler, limits: H1Limits) -> None:
        self.stream = stream
        self.handler = handler
        self.limits = limits
        self.parse = _ServerParser(limits)
        self._wakeup: asyncio.Future[None] | None = None
        self._eof = False
        self._upgraded: bytes | None = None
        self._closing = False
        self._failed = False
        self._loop = asyncio.get_running_loop()
        self._last_read = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._timed_out = False

    def _check_idle(self) -> None:
        """The idle timer: one per connection, pushed back while reads arrive (instead of a
        timeout scope around every read)."""
        idle = self._loop.time() - self._last_read
        if idle >= self.limits.idle_timeout:
            log.debug("HTTP/1.1 connection idle for %.0f s: closing it", idle)
            self._timed_out = True
            self.stream.abort()
        else:
            self._idle_timer = self._loop.call_later(
                self.limits.idle_timeout - idle, self._check_idle
            )

    async def run(self, initial: bytes) -> None:
        responder = asyncio.ensure_future(self._respond_loop())
        self._idle_timer = self._loop.call_later(self.limits.idle_timeout, self._check_idle)
        try:
            await self._read_loop(initial)
        except _RequestError as exc:
            await self._fail(exc.status, str(exc), responder)
            return
        except httptools.HttpParserError as exc:
            # Our own checks, raised inside a parser callback, arrive wrapped.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, _RequestError):
                await self._fail(cause.status, str(cause), responder)
            else:
                await self._fail(400, f"malformed request: {exc}", responder)
            return
        except _BODY_OR_STREAM as exc:
            log.debug("HTTP/1.1 connection ended: %s", exc)
        except BaseException:
            responder.cancel()
            raise
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
        if self._timed_out:
            responder.cancel()
            raise TimeoutError("HTTP/1.1 connection idle for too long")
        self._eof = True
        if self.parse.body is not None:  # the client went away in the middle of a body
            self.parse.body.fail(BodyError("client closed the connection mid-body"))
            self.parse.body = None
        self._wake()
        try:
            await responder
        finally:
            if not responder.done():
                responder.cancel()

    async def _read_loop(self, data: bytes) -> None:
        parse = self.parse
        while True:
            if data:
                try:
                    parse.parser.feed_data(data)
                except httptools.HttpParserUpgrade as upgrade:
                    self._upgraded = data[upgrade.args[0] :]
                    self._wake()
                    return  # the responder owns the stream from here
                self._wake()
            if self._closing:
                return
            body = parse.body
            if body is not None and body.buffered > body.limit:
                await body.drained()
            while len(parse.ready) > MAX_PIPELINED and not self._closing:
                await asyncio.sleep(0.001)
            data = await self.stream.read(READ_SIZE)
            self._last_read = self._loop.time()
            if not data:
                return

    def _wake(self) -> None:
        waiter = self._wakeup
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next_request(self) -> Request | None:
        parse = self.parse
        while not parse.ready:
            if self._eof or self._closing:
                return None
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        return parse.ready.popleft()

    async def _respond_loop(self) -> None:
        parse = self.parse
        while True:
            request = await self._next_request()
            if request is None:
                break
            keep_alive = parse.keep_alive.popleft()
            if request.header("expect") == "100-continue":
                request.headers = [h for h in request.headers if h[0] != "expect"]
                await self.stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                response = await self.handler(request)
            except Exception:
                log.exception("request handler failed")
                response = simple_response(500, "internal error\n")
            if response.upgraded is not None:
                await self._switch(request, response)
                return
            if not request.body.ended:
                # The handler answered without reading the whole request (a 403, a redirect):
                # the rest cannot be skipped reliably, so this is the last response.
                keep_alive = False
                request.body.cancel()
            ok = await self._send(request, response, keep_alive)
            if not ok or not keep_alive:
                break
        self._closing = True
        if not self._failed:  # after a parse error, `_fail` writes the last response
            with contextlib.suppress(*STREAM_ERRORS):
                await self.stream.write_eof()

    async def _send(self, request: Request, response: Response, keep_alive: bool) -> bool:
        status = response.status
        bodyless = request.method == "HEAD" or status in (204, 304) or status < 200
        headers, chunked = _framing(end_to_end(response.headers), response.body, bodyless=bodyless)
        if not keep_alive:
            headers.append(("connection", "close"))
        head = _head(b"HTTP/1.1 %d %s" % (status, _reason(status)), headers)
        try:
            if bodyless:
                response.body.cancel()
                await self.stream.write(head)
            else:
                await _write_body(self.stream, head, response.body, chunked)
        except BodyError as exc:
            # The upstream failed mid-body: the client must not take a truncated body for a
            # whole one, so the connection is reset.
            log.debug("response body failed: %s", exc)
            self.stream.abort()
            return False
        except STREAM_ERRORS:
            response.body.cancel()
            return False
        return True

    async def _switch(self, request: Request, response: Response) -> None:
        """Answer 101 and copy raw bytes both ways between the client and the upstream."""
        upstream = response.upgraded
        assert upstream is not None
        head = _head(b"HTTP/1.1 101 Switching Protocols", response.headers)
        await self.stream.write(head)
        while self._upgraded is None and not self._eof:  # the reader stops at the upgrade
            await asyncio.sleep(0)
        leftover = self._upgraded or b""
        await copy_both_ways(self.stream, upstream, leftover)

    async def _fail(self, status: int, text: str, responder: asyncio.Future[None]) -> None:
        self._closing = True
        self._failed = True
        self._wake()
        with contextlib.suppress(BaseException):
            await responder
        response = simple_response(status, text + "\n")
        with contextlib.suppress(*STREAM_ERRORS):
            head = _head(
                b"HTTP/1.1 %d %s" % (status, _reason(status)),
                [*response.headers, ("connection", "close")],
            )
            await _write_body(self.stream, head, response.body, False)
            await self.stream.write_eof()


async def copy_both_ways(a: ByteStream, b: ByteStream, a_leftover: bytes = b"") -> tuple[int, int]:
    """Copy a -> b and b -> a until both sides ended; the bytes copied each way."""

    async def pump(src: ByteStream, dst: ByteStream, first: bytes) -> int:
        total = 0
        try:
            if first:
                await dst.write(first)
                total += len(first)
            while data := await src.read(READ_SIZE):
                await dst.write(data)
                total += len(data)
            await dst.write_eof()
        except _BODY_OR_STREAM:
            src.abort()
            dst.abort()
        return total

    up, down = await asyncio.gather(pump(a, b, a_leftover), pump(b, a, b""))
    return up, down


class _ResponseParser:
    """One response's head, body and trailers, from httptools' callbacks.

    The httptools parser that calls these is *not* kept here: it holds bound methods of this
    object, so an attribute back to it would make a reference cycle per response, which only
    the garbage collector can free (in a busy waypoint that cycle alone made the collector
    run every few dozen requests). The exchange holds both instead.
    """

    def __init__(self, body_limit: int) -> None:
        self.headers: Headers = []
        self.headers_done = False
        self.complete = False
        self.body: Body | None = None
        self.trailers: Headers = []
        self.body_limit = body_limit

    def on_header(self, name: bytes, value: bytes) -> None:
        target = self.trailers if self.headers_done else self.headers
        target.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        length = None
        for name, value in self.headers:
            if name == "content-length":
                length = int(value)
        self.body = Body(self.body_limit, length)

    def on_body(self, data: bytes) -> None:
        assert self.body is not None
        self.body.put_nowait(data)

    def on_message_complete(self) -> None:
        self.complete = True
        if self.body is not None:
            self.body.end(self.trailers or None)


class H1ClientConnection:
    """One HTTP/1.1 connection to an endpoint, used for one request at a time.

    `request` returns when the response head has arrived; the body keeps streaming. The
    connection is reusable (`idle`) once the response body has been read to its end and
    both sides want keep-alive. `on_idle` is called at that moment, so a pool can take it back.
    """

    def __init__(self, stream: ByteStream, on_idle: Callable[[H1ClientConnection], None]) -> None:
        self.stream = stream
        self._on_idle = on_idle
        self.busy = False
        self.closed = False
        self._leftover = b""
        self._body_reader: asyncio.Future[None] | None = None
        self.idle_since: float | None = None
        # Kept by the pool: requests sent on this connection, how long it may sit idle.
        self.requests = 0
        self.idle_limit = 60.0

    @property
    def is_usable(self) -> bool:
        return not self.busy and not self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stream.abort()

    async def request(self, request: Request) -> Response:
        self.busy = True
        try:
            return await self._exchange(request)
        except BaseException:
            self.close()
            raise

    async def _exchange(self, request: Request) -> Response:
        body = request.body
        headers = [("host", request.authority), *request.headers]
        if request.upgrade is None:
            bodyless = body.ended and not body.buffered and request.method in _NO_BODY_METHODS
            headers, chunked = _framing(headers, body, bodyless=bodyless)
        else:
            chunked = False
        head = _head(b"%s %s HTTP/1.1" % (request.method.encode(), request.path.encode()), headers)
        sender: asyncio.Future[int] | None = None
        try:
            if body.ended or request.upgrade is not None:
                await _write_body(self.stream, head, body, chunked)
            else:
                await self.stream.write(head)
                sender = asyncio.ensure_future(_write_body(self.stream, bytearray(), body, chunked))
        except STREAM_ERRORS as exc:
            raise UpstreamError(f"upstream write failed: {exc}", connected=True) from exc
        try:
            parse, parser, data = await self._read_head(request, sender)
        except BaseException:
            if sender is not None:
                sender.cancel()
            raise
        response_body = parse.body
        assert response_body is not None
        status = parser.get_status_code()
        keep_alive = parser.should_keep_alive() or (
            parse.complete
            and "close" not in (_header(parse.headers, "connection") or "")
            and parser.get_http_version() == "1.1"
        )
        response = Response(status, parse.headers, response_body)
        if status == 101 and request.upgrade is not None:
            response.upgraded = _Prefixed(self.stream, data)
            self.closed = True  # the stream now belongs to the upgraded exchange
            return response
        if request.method == "HEAD" or status in (204, 304):
            response_body.cancel()
            response.body = Body.of()
            parse.complete = True
        if parse.complete:
            self._finish(keep_alive and (sender is None or sender.done()), sender)
        else:
            self._body_reader = asyncio.ensure_future(
                self._read_body(parse, parser, response_body, sender)
            )
        return response

    async def _read_head(
        self, request: Request, sender: asyncio.Future[int] | None
    ) -> tuple[_ResponseParser, httptools.HttpResponseParser, bytes]:
        data = self._leftover
        self._leftover = b""
        while True:
            parse = _ResponseParser(request.body.limit)
            parser = httptools.HttpResponseParser(parse)
            while not parse.headers_done:
                if not data:
                    if sender is not None and sender.done() and sender.exception() is not None:
                        raise UpstreamError("upstream stopped reading the request", connected=True)
                    try:
                        data = await self.stream.read(READ_SIZE)
                    except STREAM_ERRORS as exc:
                        raise UpstreamError(f"upstream read failed: {exc}", connected=True) from exc
                    if not data:
                        raise UpstreamError("upstream closed the connection", connected=True)
                try:
                    parser.feed_data(data)
                    data = b""
                except httptools.HttpParserUpgrade as upgrade:
                    data = data[upgrade.args[0] :]
                except httptools.HttpParserError as exc:
                    raise UpstreamError(
                        f"malformed upstream response: {exc}", connected=True
                    ) from exc
            status = parser.get_status_code()
            if 100 <= status < 200 and status != 101:
                continue  # 100 Continue and other interim responses are not forwarded
            return parse, parser, data

    async def _read_body(
        self,
        parse: _ResponseParser,
        parser: httptools.HttpResponseParser,
        body: Body,
        sender: asyncio.Future[int] | None,
    ) -> None:
        try:
            while not parse.complete:
                if body.buffered > body.limit:
                    await body.drained()
                data = await self.stream.read(READ_SIZE)
                if not data:
                    # A body delimited by the connection's end is complete now; any other is not.
                    if (
                        parse.body is not None
                        and parse.body.length is None
                        and not _header(parse.headers, "transfer-encoding")
                    ):
                        body.end()
                        self.close()
                        return
                    raise BodyError("upstream closed the connection mid-body")
                parser.feed_data(data)
        except _PARSE_BODY_OR_STREAM as exc:
            body.fail(exc if isinstance(exc, BodyError) else BodyError(str(exc)))
            self.close()
            if sender is not None:
                sender.cancel()
            return
        keep_alive = parser.should_keep_alive() or (
            "close" not in (_header(parse.headers, "connection") or "")
        )
        self._finish(keep_alive, sender)

    def _finish(self, keep_alive: bool, sender: asyncio.Future[int] | None) -> None:
        if sender is not None and not sender.done():
            # The response is complete before the request body was sent (an early error).
            sender.cancel()
            keep_alive = False
        if not keep_alive:
            self.close()
            return
        self.busy = False
        self._on_idle(self)


def _header(headers: Headers, name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class _Prefixed:
    """A ByteStream that first returns bytes already read from it."""

    def __init__(self, stream: ByteStream, first: bytes) -> None:
        self._stream = stream
        self._first = first

    async def read(self, n: int = READ_SIZE) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        return await self._stream.read(n)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.write(data)

    async def write_eof(self) -> None:
        await self._stream.write_eof()

    def abort(self, error_code: int = 8) -> None:
        self._stream.abort(error_code)
