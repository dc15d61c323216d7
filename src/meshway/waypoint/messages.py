"""HTTP messages as the waypoint sees them, whatever the wire protocol.

HTTP/1.1 and HTTP/2 codecs both turn their input into a `Request` or `Response` whose `Body`
streams: a producer `put`s chunks as they arrive and a consumer `read`s them, with a byte limit
on what waits in between, so a slow reader pushes back on a fast writer instead of growing a
buffer. Header names are lower case; pseudo-headers (`:method`...) live in the fields, and
hop-by-hop headers are not carried from one connection to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from meshway.hbone.errors import HboneError

Headers = list[tuple[str, str]]

# What reading or writing a ByteStream raises when its other end or its tunnel fails: socket
# errors, and an HBONE tunnel's reset or lost connection.
STREAM_ERRORS: tuple[type[Exception], ...] = (ConnectionError, OSError, HboneError)

# Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection and are never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

DEFAULT_BODY_LIMIT = 256 * 1024


class ByteStream(Protocol):
    """A bidirectional byte stream: an HBONE tunnel, or anything shaped like one."""

    async def read(self, n: int = ...) -> bytes: ...

    async def write(self, data: bytes | bytearray | memoryview) -> None: ...

    async def write_eof(self) -> None: ...

    def abort(self, error_code: int = ...) -> None: ...


class BodyError(Exception):
    """The body's producer failed (the peer reset the stream, or sent a malformed body)."""


class Body:
    """A streaming body with bounded buffering: chunks, then optional trailers.

    `put` waits while more than `limit` bytes are buffered; `read` returns b"" once the body
    has ended and everything was read. One producer and one consumer.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_consumed",
        "_ended",
        "_error",
        "_reader",
        "_writer",
        "length",
        "limit",
        "on_done",
        "trailers",
    )

    def __init__(self, limit: int = DEFAULT_BODY_LIMIT, length: int | None = None) -> None:
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._ended = False
        self._error: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None
        self.limit = limit
        self.trailers: Headers | None = None
        # The declared length (content-length), when known.
        self.length = length
        self._consumed = 0
        # Called once with the bytes read when the consumer reached the end, gave up or
        # saw the producer fail: where telemetry learns that a message is over.
        self.on_done: Callable[[int, bool], None] | None = None

    @classmethod
    def of(cls, data: bytes = b"", trailers: Headers | None = None) -> Body:
        body = cls(length=len(data))
        if data:
            body._chunks.append(data)
            body._buffered = len(data)
        body.end(trailers)
        return body

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def finished(self) -> bool:
        """Ended and fully read."""
        return self._ended and not self._chunks

    @property
    def buffered(self) -> int:
        return self._buffered

    def put_nowait(self, chunk: bytes) -> None:
        if self._ended or not chunk:
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        _wake(self._reader)

    async def put(self, chunk: bytes) -> None:
        self.put_nowait(chunk)
        await self.drained()

    async def drained(self) -> None:
        """Wait until the buffered bytes are under the limit (or the consumer went away)."""
        while self._buffered > self.limit and self._error is None:
            self._writer = asyncio.get_running_loop().create_future()
            try:
                await self._writer
            finally:
                self._writer = None

    def end(self, trailers: Headers | None = None) -> None:
        if self._ended:
            return
        self.trailers = trailers
        self._ended = True
        _wake(self._reader)

    def fail(self, error: BaseException) -> None:
        """The producer failed: the consumer's next read raises `error`."""
        if self._ended and not self._chunks:
            return
        self._error = error
        self._ended = True
        _wake(self._reader)
        _wake(self._writer)

    def cancel(self) -> None:
        """The consumer does not want the rest: drop it and release the producer."""
        self._chunks.clear()
        self._buffered = 0
        if self._error is None:
            self._error = BodyError("body discarded")
        _wake(self._writer)
        self._done(False)

    def _done(self, complete: bool) -> None:
        callback = self.on_done
        if callback is not None:
            self.on_done = None
            callback(self._consumed, complete)

    def copy(self) -> Body | None:
        """An independent copy of a body that has ended and of which nothing was read yet
        (so it can be sent again), else None."""
        if not self._ended or self._consumed or self._error is not None:
            return None
        return Body.of(b"".join(self._chunks), self.trailers)

    @property
    def consumed(self) -> int:
        return self._consumed

    async def read(self) -> bytes:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                self._consumed += len(chunk)
                if self._buffered <= self.limit:
                    _wake(self._writer)
                return chunk
            if self._error is not None:
                self._done(False)
                raise self._error
            if self._ended:
                self._done(True)
                return b""
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None

    def read_nowait(self) -> bytes:
        """Everything buffered now (for bodies already complete)."""
        data = b"".join(self._chunks)
        self._consumed += len(data)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def read_all(self, limit: int | None = None) -> bytes:
        """The whole body; BodyError when it is longer than `limit`."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read():
            size += len(chunk)
            if limit is not None and size > limit:
                raise BodyError(f"body longer than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


@dataclass(slots=True)
class Request:
    method: str
    # The request target as sent: path and query, e.g. "/api/v1?x=1".
    path: str
    authority: str
    headers: Headers = field(default_factory=list)
    body: Body = field(default_factory=Body.of)
    scheme: str = "http"
    # "HTTP/1.1" or "HTTP/2".
    protocol: str = "HTTP/1.1"
    # The protocol an HTTP/1.1 `Upgrade` request asks for (e.g. "websocket"), else None.
    upgrade: str | None = None

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


@dataclass(slots=True)
class Response:
    status: int
    headers: Headers = field(default_factory=list)
    body: Body = field(default_factory=Body.of)
    # After a 101 answer to an `Upgrade` request: the upstream's raw byte stream.
    upgraded: ByteStream | None = None

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


def header_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of a header (names are lower case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def end_to_end(headers: Iterable[tuple[str, str]]) -> Headers:
    """The headers without hop-by-hop ones, including those the Connection header names."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for key, value in headers
        if key == "connection"
        for token in value.split(",")
    }
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]


class UpstreamError(Exception):
    """An upstream request failed before a complete response head arrived.

    `reset` tells whether the upstream connection was established (a reset or a protocol
    error: Envoy's `UR`/`UPE`) or not (`UF`: connection failure).
    """

    def __init__(self, message: str, *, connected: bool) -> None:
        super().__init__(message)
        self.connected = connected


def simple_response(status: int, text: str, headers: Headers | None = None) -> Response:
    """A small text/plain response generated by the waypoint itself."""
    data = text.encode()
    return Response(
        status,
        [("content-type", "text/plain"), ("content-length", str(len(data))), *(headers or [])],
        Body.of(data),
    )


class TcpStream:
    """A `ByteStream` over an asyncio stream pair: for tests, tools and plain-TCP upstreams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> TcpStream:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def read(self, n: int = 65536) -> bytes:
        return await self._reader.read(n)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def write_eof(self) -> None:
        if self._writer.can_write_eof() and not self._writer.is_closing():
            self._writer.write_eof()

    def abort(self, error_code: int = 0) -> None:
        self._writer.transport.abort()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
