"""gRPC calls from the proxies to the control plane, over the proxies' own HTTP/2 client.

Envoy does the same with its "Envoy gRPC" client (as opposed to its "Google gRPC" one): a
proxy already carries an HTTP/2 stack (h2, `waypoint.http2`) and an event loop (uvloop), and
grpcio would add a second HTTP/2 implementation, its own event engine and about ten threads:
some 15 MB of memory in every node proxy and waypoint, for one long-lived stream and a
certificate request a day. The control plane keeps grpcio's server.

What the proxies need, and nothing more: unary and bidirectional-streaming calls carrying
protobuf messages, metadata, deadlines (`grpc-timeout`), the status from the trailers (or
from a trailers-only response), TLS against the control plane's CA with a fixed server name,
and keepalive PINGs, so that a control plane that vanished without closing its connections
is noticed within `keepalive + keepalive_timeout` seconds.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import struct
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Generic, TypeVar
from urllib.parse import unquote

from google.protobuf.message import DecodeError, Message

from meshway.waypoint.http2 import H2ClientConnection
from meshway.waypoint.messages import (
    STREAM_ERRORS,
    Body,
    BodyError,
    Request,
    Response,
    TcpStream,
    UpstreamError,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

MAX_MESSAGE = 256 * 1024 * 1024
# Per stream and per connection (HTTP/2's largest window is 2**31 - 1).
RECEIVE_WINDOW = 64 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
_PREFIX = struct.Struct(">BI")
_CALL_ERRORS: tuple[type[Exception], ...] = (BodyError, *STREAM_ERRORS)


class StatusCode(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# gRPC's "HTTP to gRPC status code mapping", for answers without a grpc-status.
_HTTP_TO_GRPC = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}


class GrpcError(Exception):
    """A call ended with a status other than OK (UNAVAILABLE when the connection failed)."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class GrpcChannel:
    """Calls to one target over one HTTP/2 connection, opened on first use and again after
    it failed. Not thread-safe: one event loop, like the rest of a proxy."""

    def __init__(
        self,
        target: str,
        *,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
        keepalive: float = 30.0,
        keepalive_timeout: float = 10.0,
        max_message: int = MAX_MESSAGE,
    ) -> None:
        self.host, self.port = _split_target(target)
        self._tls: ssl.SSLContext | None = None
        if root_certificates is not None:
            self._tls = ssl.create_default_context(cadata=root_certificates.decode())
            self._tls.set_alpn_protocols(["h2"])
        self._server_name = server_name or self.host
        self._authority = server_name or target
        self._keepalive = keepalive
        self._keepalive_timeout = keepalive_timeout
        self.max_message = max_message
        self._conn: H2ClientConnection | None = None
        self._dialing: asyncio.Future[H2ClientConnection] | None = None
        self._pinger: asyncio.Task[None] | None = None

    # -- calls -----------------------------------------------------------------------------

    async def unary(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        metadata: Iterable[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> M:
        """One request, one response."""
        try:
            async with asyncio.timeout(timeout):
                call = StreamCall(self, method, response_type, metadata, timeout)
                async with call:
                    call.send(request)
                    call.done_sending()
                    responses = [r async for r in call]
        except TimeoutError:
            raise GrpcError(
                StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s"
            ) from None
        if len(responses) != 1:
            raise GrpcError(StatusCode.INTERNAL, f"a unary call got {len(responses)} responses")
        return responses[0]

    def stream(
        self,
        method: str,
        response_type: type[M],
        *,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> StreamCall[M]:
        """A bidirectional stream: `async with` it, `send` requests, iterate the responses."""
        return StreamCall(self, method, response_type, metadata, None)

    async def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    # -- the connection --------------------------------------------------------------------

    async def connection(self) -> H2ClientConnection:
        conn = self._conn
        if conn is not None and conn.is_usable:
            return conn
        if self._dialing is None:
            self._dialing = asyncio.ensure_future(self._dial())
            self._dialing.add_done_callback(self._dialed)
        return await asyncio.shield(self._dialing)

    def _dialed(self, dialing: asyncio.Future[H2ClientConnection]) -> None:
        self._dialing = None
        if dialing.cancelled() or dialing.exception() is not None:
            return
        self._conn = dialing.result()
        if self._pinger is not None:
            self._pinger.cancel()
        self._pinger = asyncio.ensure_future(self._keep_alive(self._conn))

    async def _dial(self) -> H2ClientConnection:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._tls,
                    server_hostname=self._server_name if self._tls is not None else None,
                )
        except TimeoutError:
            raise GrpcError(
                StatusCode.UNAVAILABLE,
                f"cannot connect to {self.host}:{self.port} within {CONNECT_TIMEOUT:g} s",
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise GrpcError(
                StatusCode.UNAVAILABLE, f"cannot connect to {self.host}:{self.port}: {exc}"
            ) from None
        if self._tls is not None:
            ssl_object = writer.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                writer.close()
                raise GrpcError(
                    StatusCode.UNAVAILABLE, f"{self.host}:{self.port} does not speak HTTP/2"
                )
        # Whole messages are held anyway: windows large enough for a full state at once let
        # the control plane hand it over and free it, however busy this reader is (grpcio
        # grows its windows to the same end).
        return H2ClientConnection(
            TcpStream(reader, writer),
            body_limit=self.max_message,
            stream_window=RECEIVE_WINDOW,
            connection_window=RECEIVE_WINDOW,
        )

    async def _keep_alive(self, conn: H2ClientConnection) -> None:
        """PING every `keepalive` seconds; a missing acknowledgement closes the connection,
        which fails its calls with UNAVAILABLE (their owners reconnect)."""
        while conn.is_usable:
            await asyncio.sleep(self._keepalive)
            try:
                await conn.ping(self._keepalive_timeout)
            except UpstreamError as exc:
                if conn.is_usable:
                    log.warning("gRPC connection to %s:%s is dead: %s", self.host, self.port, exc)
                    await conn.close()
                return

    def _request(
        self, method: str, metadata: Iterable[tuple[str, str]], timeout: float | None, body: Body
    ) -> Request:
        headers = [
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "meshway-grpc"),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", f"{max(1, int(timeout * 1000))}m"))
        headers.extend((name.lower(), value) for name, value in metadata)
        scheme = "https" if self._tls is not None else "http"
        return Request("POST", method, self._authority, headers, body, scheme, "HTTP/2")


class StreamCall(Generic[M]):
    """One call: requests go out as `send` queues them, responses arrive by iteration, which
    ends with the call's OK status or raises GrpcError with any other."""

    def __init__(
        self,
        channel: GrpcChannel,
        method: str,
        response_type: type[M],
        metadata: Iterable[tuple[str, str]],
        timeout: float | None,
    ) -> None:
        self._channel = channel
        self._method = method
        self._type = response_type
        self._metadata = list(metadata)
        self._timeout = timeout
        self._body = Body()
        self._response: asyncio.Future[Response] | None = None
        self._buffer = bytearray()

    async def __aenter__(self) -> StreamCall[M]:
        conn = await self._channel.connection()
        request = self._channel._request(self._method, self._metadata, self._timeout, self._body)
        # The response headers may wait for our first message: send while waiting for them.
        self._response = asyncio.ensure_future(conn.request(request))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

    def send(self, message: Message) -> None:
        data = message.SerializeToString()
        self._body.put_nowait(_PREFIX.pack(0, len(data)) + data)

    def done_sending(self) -> None:
        self._body.end()

    def cancel(self) -> None:
        """End the call from this side (a reset stream, if it was still open)."""
        if self._response is None:
            return
        if not self._response.done():
            self._response.cancel()
        elif not self._response.cancelled() and self._response.exception() is None:
            body = self._response.result().body
            if not body.finished:
                body.cancel()
        if not self._body.ended:
            self._body.cancel()

    def __aiter__(self) -> AsyncIterator[M]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[M]:
        assert self._response is not None, "use the call in `async with`"
        try:
            response = await self._response
        except UpstreamError as exc:
            raise GrpcError(StatusCode.UNAVAILABLE, str(exc)) from None
        _check_head(response)
        body = response.body
        buffer = self._buffer
        while True:
            try:
                chunk = await body.read()
            except _CALL_ERRORS as exc:
                raise GrpcError(StatusCode.UNAVAILABLE, f"the call broke: {exc}") from None
            if not chunk:
                break
            buffer += chunk
            while len(buffer) >= _PREFIX.size:
                compressed, length = _PREFIX.unpack_from(buffer)
                if length > self._channel.max_message:
                    raise GrpcError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"a {length}-byte message is over the {self._channel.max_message} limit",
                    )
                if len(buffer) < _PREFIX.size + length:
                    break
                if compressed:
                    raise GrpcError(StatusCode.INTERNAL, "a compressed message was not asked for")
                message = self._type()
                try:
                    message.ParseFromString(bytes(buffer[_PREFIX.size : _PREFIX.size + length]))
                except DecodeError as exc:
                    raise GrpcError(
                        StatusCode.INTERNAL, f"cannot decode a response: {exc}"
                    ) from None
                del buffer[: _PREFIX.size + length]
                yield message
        if buffer:
            raise GrpcError(StatusCode.INTERNAL, "the call ended in the middle of a message")
        _check_status(body.trailers or [], "the call ended without a grpc-status")


def _check_head(response: Response) -> None:
    """A response head: a trailers-only status, or a sound start of a gRPC response."""
    if response.header("grpc-status") is not None:
        _check_status(response.headers, "")
        if not response.body.finished:  # status in the head, yet a body follows: not gRPC
            raise GrpcError(StatusCode.INTERNAL, "a body after a trailers-only status")
        return
    if response.status != 200:
        code = _HTTP_TO_GRPC.get(response.status, StatusCode.UNKNOWN)
        raise GrpcError(code, f"HTTP status {response.status}")
    content_type = response.header("content-type") or ""
    if not content_type.startswith("application/grpc"):
        raise GrpcError(
            StatusCode.UNKNOWN, f"not a gRPC response: {content_type or 'no content-type'}"
        )


def _check_status(headers: Iterable[tuple[str, str]], missing: str) -> None:
    status = message = None
    for name, value in headers:
        if name == "grpc-status":
            status = value
        elif name == "grpc-message":
            message = unquote(value)
    if status is None:
        raise GrpcError(StatusCode.INTERNAL, missing)
    try:
        code = StatusCode(int(status))
    except ValueError:
        code = StatusCode.UNKNOWN
    if code is not StatusCode.OK:
        raise GrpcError(code, message or code.name)


def _split_target(target: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, optionally after a gRPC `dns:///` or `ipv4:` scheme."""
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"gRPC target {target!r} is not host:port")
    return host.strip("[]"), int(port)
