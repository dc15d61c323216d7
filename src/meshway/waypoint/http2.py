"""HTTP/2 over cleartext (h2c with prior knowledge) on a `ByteStream`: the waypoint's server
side (what a client such as gRPC sends inside its tunnel) and client side (what it sends to an
endpoint), both driven by the sans-IO `h2` state machine.

Each connection has one reader, which feeds h2 and routes its events, and one writer task,
which alone writes to the stream: everything h2 has to send is appended to one output buffer
right after each change of h2's state, so frames leave in the order h2 produced them however
many requests are in flight, and a cancelled request can never cut a frame in half.

Memory is bounded by flow control, not by buffers. A received body goes into a bounded `Body`;
while it holds more than its limit, the bytes that arrived are not acknowledged to h2, so the
peer runs out of window and waits. A sent body waits for the peer's WINDOW_UPDATEs, and every
producer waits while the output buffer is over `WRITE_BUFFER`.

Trailers and DATA pass through untouched, which is what gRPC needs (its status travels in
trailers, or alone in the response HEADERS for "trailers-only" errors). h2 refuses malformed
frames and header blocks itself; an error it treats as a connection error (bad pseudo-headers,
a header list over `MAX_HEADER_LIST_SIZE`, which leaves the HPACK state unusable) ends the
connection with GOAWAY, never with an exception out of `serve_h2`. A GOAWAY from the peer
stops new streams but lets those in flight finish (h2 alone would end them all: see `_H2`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import h2.events
import h2.exceptions
import h2.settings
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

from meshway.waypoint.messages import (
    DEFAULT_BODY_LIMIT,
    HOP_BY_HOP,
    Body,
    BodyError,
    ByteStream,
    Headers,
    Request,
    Response,
    UpstreamError,
    simple_response,
)

log = logging.getLogger(__name__)

# Receive windows: per stream, and for the whole connection (so that a few slow streams do
# not stall the others, while the connection as a whole still holds a bounded amount).
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_HEADER_LIST_SIZE = 64 << 10
# The largest frame we accept: bigger than HTTP/2's 16 KiB default, for fewer frames per byte.
MAX_FRAME_SIZE = 64 << 10
READ_SIZE = 64 << 10
# Output queued for the writer beyond which producers (and the reader) wait for it.
WRITE_BUFFER = 256 << 10
# How long closing waits for queued output (a GOAWAY) to leave and for the peer to hang up.
CLOSE_TIMEOUT = 2.0
# Streams a client connection opens at once, whatever larger limit the server announces.
CLIENT_MAX_STREAMS = 1000
# Streams a client opens before the server's first SETTINGS say how many it takes: HTTP/2
# starts out unlimited, but a server with a lower limit would fail the connection for the
# excess (RFC 9113 6.5.2 recommends allowing at least 100).
INITIAL_MAX_STREAMS = 100
DEFAULT_MAX_CONCURRENT_STREAMS = 1000
_DEFAULT_WINDOW = 65_535
_PREFACE_LENGTH = 24  # the client's "PRI * HTTP/2.0..." (RFC 9113 3.4), which h2 checks
_FRAME_HEADER_LENGTH = 9
_COLON = 0x3A

Handler = Callable[[Request], Awaitable[Response]]
ErrorReporter = Callable[[str], None]
_HeaderBlock = list[tuple[bytes, bytes]]


class _StreamGone(Exception):
    """The stream was reset, or the connection ended, while we were sending on it."""


class _H2(H2Connection):
    """h2's connection, except that a received GOAWAY leaves it open.

    h2 moves its whole state machine to CLOSED on GOAWAY (and drops output it had queued), so
    streams in flight could not even send their WINDOW_UPDATEs. RFC 9113 6.8 lets the streams
    up to the GOAWAY's last stream ID finish; the owner stops opening new ones itself.
    """

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class _StreamBody(Body):
    """A received body that tells its connection when the consumer gives it up (`cancel`),
    so that the stream's flow-control credit is returned and, on the client side, the stream
    is reset at once instead of running to its end for nobody."""

    __slots__ = ("_on_cancel",)

    def __init__(
        self, length: int | None, on_cancel: Callable[[], None], limit: int = DEFAULT_BODY_LIMIT
    ) -> None:
        super().__init__(limit, length)
        self._on_cancel: Callable[[], None] | None = on_cancel

    def cancel(self) -> None:
        super().cancel()
        callback, self._on_cancel = self._on_cancel, None
        if callback is not None:
            callback()


class _Exchange:
    """One stream's state on either side."""

    __slots__ = (
        "acker",
        "body",
        "discard",
        "held",
        "reset",
        "response",
        "stream_id",
        "task",
        "window_waiter",
    )

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        # What the peer sends on this stream (request body on a server, response on a client).
        self.body: _StreamBody | None = None
        # Received bytes whose flow-control credit is held back while `body` is over its limit.
        self.held = 0
        self.acker: asyncio.Task[None] | None = None
        # The body's consumer gave it up: what still arrives is dropped (and acknowledged).
        self.discard = False
        # Reset by either side, or failed with the connection: nothing more is sent on it.
        self.reset = False
        self.window_waiter: asyncio.Future[None] | None = None
        # Server: the handler's task. Client: the task uploading the request body.
        self.task: asyncio.Task[None] | None = None
        # Client: resolved with the response once its HEADERS arrive.
        self.response: asyncio.Future[Response] | None = None


class _Connection:
    """What both sides share: h2 set up with our settings, the writer, flow control both ways."""

    def __init__(
        self,
        stream: ByteStream,
        *,
        client_side: bool,
        max_concurrent_streams: int | None,
        on_error: ErrorReporter | None,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._stream = stream
        self._on_error = on_error
        conn = _H2(H2Configuration(client_side=client_side, header_encoding=None))
        codes = h2.settings.SettingCodes
        settings = {
            codes.INITIAL_WINDOW_SIZE: stream_window,
            codes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            codes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        }
        if max_concurrent_streams is not None:
            settings[codes.MAX_CONCURRENT_STREAMS] = max_concurrent_streams
        if client_side:
            settings[codes.ENABLE_PUSH] = 0
        conn.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
        # h2 copied these from its default settings in its constructor.
        conn.max_inbound_frame_size = MAX_FRAME_SIZE
        conn.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self._h2 = conn
        self._exchanges: dict[int, _Exchange] = {}
        self._blocked: set[_Exchange] = set()
        self._ackers: set[asyncio.Task[None]] = set()
        self._closed = False
        self._out = bytearray()
        self._write_wakeup: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        # Where the next frame header starts in what the peer sends, and a header cut in two
        # by a read: see `_frames_fit`.
        self._frame_left = 0 if client_side else _PREFACE_LENGTH
        self._frame_head = bytearray()
        conn.initiate_connection()
        conn.increment_flow_control_window(connection_window - _DEFAULT_WINDOW)
        self._flush()
        self._writer = self._loop.create_task(self._write_loop())

    # --- output ----------------------------------------------------------------------------

    def _flush(self) -> None:
        """Queue what h2 has to send for the writer: called after every change of h2's state."""
        data = self._h2.data_to_send()
        if data:
            self._out += data
            _wake(self._write_wakeup)

    async def _write_loop(self) -> None:
        stream = self._stream
        try:
            while True:
                if not self._out:
                    if self._closed:
                        break
                    self._write_wakeup = self._loop.create_future()
                    try:
                        await self._write_wakeup
                    finally:
                        self._write_wakeup = None
                    continue
                # A fresh buffer each time: the stream may keep a reference to the old one.
                data, self._out = self._out, bytearray()
                await stream.write(data)
                if len(self._out) <= WRITE_BUFFER:
                    self._wake_drain_waiters()
            await stream.write_eof()
        except Exception as exc:  # the stream failed: nothing more can be sent
            self._shutdown(f"HTTP/2 connection write failed: {exc!r}")
            stream.abort()
        finally:
            self._out.clear()
            self._wake_drain_waiters()

    async def _drained(self) -> None:
        """Wait while more than WRITE_BUFFER bytes wait for the writer."""
        while len(self._out) > WRITE_BUFFER and not self._writer.done():
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            _wake(waiter)

    async def _finish_writing(self) -> None:
        """Let the writer send what is queued and half-close; abort if it cannot."""
        _wake(self._write_wakeup)
        if self._writer.done():
            return
        done, _ = await asyncio.wait({self._writer}, timeout=CLOSE_TIMEOUT)
        if not done:  # the peer stopped reading
            self._writer.cancel()
            self._stream.abort()

    # --- input -----------------------------------------------------------------------------

    def _receive(self, data: bytes) -> bool:
        """Feed h2 and handle its events; False once the connection is over."""
        if self._closed:
            return False
        if not self._frames_fit(data):
            return False
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._flush()  # h2 queued a GOAWAY describing the error
            self._report(f"HTTP/2 protocol error: {exc}")
            self._shutdown(f"HTTP/2 protocol error: {exc}")
            return False
        for event in events:
            self._dispatch(event)
            if self._closed:
                break
        self._flush()
        return not self._closed

    def _frames_fit(self, data: bytes) -> bool:
        """Check the length of each frame from its header, as the header passes by.

        h2 buffers a whole frame before it checks its length against our MAX_FRAME_SIZE, so a
        peer announcing 16 MiB (or sending bytes that are not HTTP/2 at all) would be buffered,
        and waited for, instead of refused. This refuses it from the header alone.
        """
        pos, size = 0, len(data)
        head = self._frame_head
        while pos < size:
            if self._frame_left:
                step = min(self._frame_left, size - pos)
                self._frame_left -= step
                pos += step
                continue
            take = _FRAME_HEADER_LENGTH - len(head)
            head += data[pos : pos + take]
            pos += take
            if len(head) < _FRAME_HEADER_LENGTH:
                break
            length = int.from_bytes(head[:3], "big")
            head.clear()
            if length > MAX_FRAME_SIZE:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._h2.close_connection(ErrorCodes.FRAME_SIZE_ERROR)
                self._flush()
                message = f"HTTP/2 protocol error: a {length}-byte frame (not HTTP/2?)"
                self._report(message)
                self._shutdown(message)
                return False
            self._frame_left = length
        return True

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event.stream_id, event.data, event.flow_controlled_length or 0)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                exchange = self._exchanges.get(event.stream_id)
                if exchange is not None:
                    _wake(exchange.window_waiter)
            else:
                self._wake_blocked()
        elif isinstance(event, h2.events.StreamEnded):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None:
                if exchange.body is not None:
                    exchange.body.end()
                self._on_remote_end(exchange)
        elif isinstance(event, h2.events.TrailersReceived):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None and exchange.body is not None:
                exchange.body.end(_decode(event.headers))
        elif isinstance(event, h2.events.StreamReset):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.reset = True
                _wake(exchange.window_waiter)
                self._on_reset(exchange, _error_name(event.error_code))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._wake_blocked()  # the initial window or the frame size may have grown
            self._on_settings()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)
        else:
            self._on_other(event)
        # PING, SETTINGS ACK and PRIORITY need nothing from us: h2 answers PINGs itself.

    def _on_data(self, stream_id: int, data: bytes | None, size: int) -> None:
        exchange = self._exchanges.get(stream_id)
        body = None if exchange is None or exchange.discard else exchange.body
        if exchange is None or body is None or body.ended:
            if size:
                self._h2.acknowledge_received_data(size, stream_id)
            return
        if data:
            body.put_nowait(data)
        if exchange.held or body.buffered > body.limit:
            # The consumer is behind: the peer gets this credit back once it has caught up.
            exchange.held += size
            if exchange.acker is None:
                acker = self._loop.create_task(self._acknowledge_when_drained(exchange, body))
                exchange.acker = acker
                self._ackers.add(acker)
                acker.add_done_callback(self._ackers.discard)
        elif size:
            self._h2.acknowledge_received_data(size, stream_id)

    async def _acknowledge_when_drained(self, exchange: _Exchange, body: Body) -> None:
        try:
            while exchange.held:
                await body.drained()
                held, exchange.held = exchange.held, 0
                if not self._closed:
                    self._h2.acknowledge_received_data(held, exchange.stream_id)
                    self._flush()
        finally:
            exchange.acker = None

    def _abandon(self, exchange: _Exchange) -> None:
        """The consumer cancelled the received body: what still arrives is dropped (the
        credit held for what it had buffered returns through its acker, which `cancel` woke)."""
        exchange.discard = True

    def _wake_blocked(self) -> None:
        blocked, self._blocked = self._blocked, set()
        for exchange in blocked:
            _wake(exchange.window_waiter)

    # --- sending a body --------------------------------------------------------------------

    async def _send_body(self, exchange: _Exchange, body: Body) -> None:
        """Send `body` as DATA within the peer's windows, then its trailers or END_STREAM."""
        while chunk := await body.read():
            await self._send_data(exchange, chunk)
        self._check_sendable(exchange)
        trailers = _trailer_block(body.trailers) if body.trailers else None
        try:
            if trailers:
                self._h2.send_headers(exchange.stream_id, trailers, end_stream=True)
            else:
                self._h2.end_stream(exchange.stream_id)
        except h2.exceptions.StreamClosedError:
            raise _StreamGone from None
        self._flush()

    async def _send_data(self, exchange: _Exchange, data: bytes) -> None:
        conn = self._h2
        stream_id = exchange.stream_id
        view = memoryview(data)
        offset, size = 0, len(data)
        while offset < size:
            self._check_sendable(exchange)
            try:
                window = conn.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError:
                raise _StreamGone from None
            if window <= 0:
                await self._wait_window(exchange)
                continue
            frame_size = conn.max_outbound_frame_size
            end = offset + min(window, size - offset)
            try:
                while offset < end:
                    step = min(frame_size, end - offset)
                    conn.send_data(stream_id, view[offset : offset + step])
                    offset += step
            except h2.exceptions.StreamClosedError:
                raise _StreamGone from None
            self._flush()
            if len(self._out) > WRITE_BUFFER:
                await self._drained()

    async def _wait_window(self, exchange: _Exchange) -> None:
        waiter = self._loop.create_future()
        exchange.window_waiter = waiter
        self._blocked.add(exchange)
        try:
            await waiter
        finally:
            exchange.window_waiter = None
            self._blocked.discard(exchange)

    def _check_sendable(self, exchange: _Exchange) -> None:
        if exchange.reset or self._closed:
            raise _StreamGone

    def _reset(self, exchange: _Exchange, code: ErrorCodes) -> None:
        """Send RST_STREAM (unless the stream or the connection is already over)."""
        if exchange.reset:
            return
        exchange.reset = True
        _wake(exchange.window_waiter)
        if self._closed:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(exchange.stream_id, code)
        self._flush()

    def _stream_closed(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is None or stream.closed

    # --- ending ----------------------------------------------------------------------------

    def _shutdown(self, reason: str) -> None:
        """The connection is over: fail every stream in flight (idempotent)."""
        if self._closed:
            return
        self._closed = True
        exchanges = list(self._exchanges.values())
        self._exchanges.clear()
        for exchange in exchanges:
            exchange.reset = True
            _wake(exchange.window_waiter)
            self._fail_exchange(exchange, reason)
        self._blocked.clear()
        for acker in list(self._ackers):
            acker.cancel()
        self._wake_drain_waiters()
        _wake(self._write_wakeup)

    def _goodbye(self) -> None:
        """Send GOAWAY (NO_ERROR) unless h2 has already ended the connection."""
        if not self._closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(ErrorCodes.NO_ERROR)
            self._flush()

    def _report(self, message: str) -> None:
        if self._on_error is not None:
            self._on_error(message)
        else:
            log.debug("%s", message)

    # --- side-specific hooks ---------------------------------------------------------------

    def _on_remote_end(self, exchange: _Exchange) -> None:
        raise NotImplementedError

    def _on_reset(self, exchange: _Exchange, reason: str) -> None:
        raise NotImplementedError

    def _on_settings(self) -> None:
        """The peer's SETTINGS changed."""

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        raise NotImplementedError

    def _on_other(self, event: h2.events.Event) -> None:
        """Request or response HEADERS (and events both sides ignore)."""

    def _fail_exchange(self, exchange: _Exchange, reason: str) -> None:
        raise NotImplementedError


# --- the server side -------------------------------------------------------------------------


async def serve_h2(
    stream: ByteStream,
    handler: Handler,
    *,
    initial: bytes = b"",
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
    on_error: ErrorReporter | None = None,
) -> None:
    """Serve HTTP/2 (prior knowledge) on `stream` until the connection ends.

    `initial` holds the bytes already read from the stream (the client preface the waypoint
    sniffed). Each request runs `handler` in a task of its own. `on_error` hears a short
    description of each protocol error (which ends the connection with GOAWAY) and of each
    handler failure (which becomes a 500). The stream is half-closed, not closed, at the end:
    its owner closes it.
    """
    server = _H2Server(stream, handler, max_concurrent_streams, on_error)
    await server.run(initial)


class _H2Server(_Connection):
    def __init__(
        self,
        stream: ByteStream,
        handler: Handler,
        max_concurrent_streams: int,
        on_error: ErrorReporter | None,
    ) -> None:
        super().__init__(
            stream,
            client_side=False,
            max_concurrent_streams=max_concurrent_streams,
            on_error=on_error,
        )
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, initial: bytes) -> None:
        try:
            if initial:
                self._receive(initial)
            while not self._closed:
                try:
                    data = await self._stream.read(READ_SIZE)
                except Exception as exc:  # OSError, or a reset tunnel's own error
                    self._shutdown(f"HTTP/2 connection read failed: {exc!r}")
                    break
                if not data:
                    break
                if not self._receive(data):
                    break
                if len(self._out) > WRITE_BUFFER:
                    await self._drained()
        except Exception as exc:
            log.exception("HTTP/2 server failed")
            self._report(f"HTTP/2 server internal error: {exc!r}")
        finally:
            await self._close()

    async def _close(self) -> None:
        """GOAWAY, stop the handlers still running, send what is queued and half-close."""
        self._goodbye()
        self._shutdown("the HTTP/2 connection ended")
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._finish_writing()

    def _on_other(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        pseudo, headers, length = _read_block(event.headers)
        # Host is carried as the authority, like the HTTP/1.1 server does.
        hosts = [value for name, value in headers if name == "host"]
        if hosts:
            headers = [h for h in headers if h[0] != "host"]
        host = hosts[-1] if hosts else None
        method = pseudo.get(":method", "")
        path = pseudo.get(":path", "")
        authority = pseudo.get(":authority", "")
        scheme = pseudo.get(":scheme", "http")
        exchange = _Exchange(stream_id)
        body = _StreamBody(length, lambda: self._abandon(exchange))
        if event.stream_ended is not None:
            body.end()
        exchange.body = body
        request = Request(method, path, authority or host or "", headers, body, scheme, "HTTP/2")
        self._exchanges[stream_id] = exchange
        task = self._loop.create_task(self._serve_stream(exchange, request))
        exchange.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_stream(self, exchange: _Exchange, request: Request) -> None:
        try:
            try:
                response = await self._handler(request)
            except Exception as exc:
                log.exception("HTTP/2 request handler failed")
                self._report(f"request handler failed: {exc!r}")
                response = simple_response(500, "internal error\n")
            await self._respond(exchange, request, response)
        except _StreamGone:
            pass  # the client reset the stream, or the connection ended
        except Exception as exc:
            # The response body failed after its HEADERS went out: the client must not take
            # what it got for a whole response.
            log.debug("HTTP/2 response body failed: %r", exc)
            self._reset(exchange, ErrorCodes.INTERNAL_ERROR)
        finally:
            self._exchanges.pop(exchange.stream_id, None)
            body = request.body
            if not body.ended:
                # Answered before the whole request arrived: the rest is not wanted.
                body.fail(BodyError("the HTTP/2 stream ended before the request body"))
                self._reset(exchange, ErrorCodes.NO_ERROR)

    async def _respond(self, exchange: _Exchange, request: Request, response: Response) -> None:
        body = response.body
        try:
            bodyless = request.method == "HEAD" or response.status in (204, 304)
            if bodyless:
                body.cancel()
            end = bodyless or (body.finished and not body.trailers)
            self._check_sendable(exchange)
            block = _response_block(response)
            try:
                self._h2.send_headers(exchange.stream_id, block, end_stream=end)
            except h2.exceptions.StreamClosedError:
                raise _StreamGone from None
            except h2.exceptions.ProtocolError as exc:
                # h2 validates while HPACK-encoding, so its encoder no longer matches the
                # peer's decoder: the connection cannot carry another header block.
                self._report(f"invalid response headers: {exc}")
                self._h2.close_connection(ErrorCodes.INTERNAL_ERROR)
                self._flush()
                self._shutdown(f"invalid response headers: {exc}")
                raise _StreamGone from None
            self._flush()
            if not end:
                await self._send_body(exchange, body)
        finally:
            if not body.finished:
                body.cancel()

    def _on_remote_end(self, exchange: _Exchange) -> None:
        """The request is complete; the handler's task goes on with the response."""

    def _on_reset(self, exchange: _Exchange, reason: str) -> None:
        self._exchanges.pop(exchange.stream_id, None)
        self._fail_exchange(exchange, f"the client reset the stream ({reason})")

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """A client's GOAWAY only says it opens no more streams: the ones in flight finish."""

    def _fail_exchange(self, exchange: _Exchange, reason: str) -> None:
        body = exchange.body
        if body is not None and not body.ended:
            body.fail(BodyError(reason))
        if exchange.task is not None:
            exchange.task.cancel()


# --- the client side -------------------------------------------------------------------------

_PING_IDS = itertools.count(1)


class H2ClientConnection(_Connection):
    """One HTTP/2 connection to an endpoint, multiplexing requests.

    `request` returns when the response HEADERS arrive; the body keeps streaming. A pool picks
    a connection by `is_usable` and `available_streams`, and reaps it by `idle_since`.
    """

    def __init__(
        self,
        stream: ByteStream,
        *,
        body_limit: int = DEFAULT_BODY_LIMIT,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        """`body_limit`: how much of a response body is buffered before the peer's flow-control
        credit waits for the consumer (a proxy passes bodies on in small steps; a gRPC client
        that must hold whole messages anyway takes them as fast as they come), with the
        receive windows to match."""
        super().__init__(
            stream,
            client_side=True,
            max_concurrent_streams=None,
            on_error=None,
            stream_window=stream_window,
            connection_window=connection_window,
        )
        self._body_limit = body_limit
        self._goaway = False
        self._error = "the HTTP/2 connection is closed"
        self._idle_since: float | None = time.monotonic()
        # Kept by the pool: requests sent, whether it takes no more (maxRequestsPerConnection),
        # how long it may sit idle.
        self.requests = 0
        self.retired = False
        self.idle_limit = 60.0
        self._slot_waiters: list[asyncio.Future[None]] = []
        self._closer: asyncio.Task[None] | None = None
        self._peer_settings = False
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._reader = self._loop.create_task(self._read_loop())

    @property
    def is_usable(self) -> bool:
        """True while new requests may be sent: not closed, no GOAWAY received."""
        return not self._closed and not self._goaway

    @property
    def available_streams(self) -> int:
        """How many more requests may be in flight now (the peer's limit minus open ones)."""
        if not self.is_usable:
            return 0
        if self._peer_settings:
            limit = min(self._h2.remote_settings.max_concurrent_streams, CLIENT_MAX_STREAMS)
        else:
            limit = INITIAL_MAX_STREAMS
        return max(0, limit - len(self._exchanges))

    @property
    def idle_since(self) -> float | None:
        """`time.monotonic()` when the last stream ended; None while streams are open."""
        return self._idle_since

    async def close(self) -> None:
        """GOAWAY, fail what is in flight, and close the stream."""
        self._goodbye()
        self._shutdown("the HTTP/2 connection was closed by this side")
        await self._finish_writing()
        # Give the peer a moment to read the GOAWAY and hang up before the stream is dropped.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.wait({self._reader})
        self._reader.cancel()
        self._stream.abort()

    async def request(self, request: Request) -> Response:
        """Send `request`; return the response as soon as its HEADERS arrive.

        Raises UpstreamError(connected=True) when the stream is reset or the connection dies
        before that. Cancelling the caller resets the stream (CANCEL).
        """
        await self._wait_for_stream()
        body = request.body
        block = _request_block(request)
        end = body.finished and not body.trailers
        conn = self._h2
        try:
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, block, end_stream=end)
        except h2.exceptions.NoAvailableStreamIDError:
            self._goaway = True  # stream IDs ran out: finish what is in flight, then close
            raise UpstreamError(
                "the HTTP/2 connection ran out of stream IDs", connected=True
            ) from None
        except h2.exceptions.ProtocolError as exc:
            # h2 validates while HPACK-encoding, so the encoder no longer matches the peer's.
            self._goodbye()
            self._shutdown(f"invalid request headers: {exc}")
            self._stream.abort()
            raise UpstreamError(f"invalid request headers: {exc}", connected=True) from None
        exchange = _Exchange(stream_id)
        exchange.response = self._loop.create_future()
        self._exchanges[stream_id] = exchange
        self._idle_since = None
        self._flush()
        try:
            if not end:
                if body.ended and body.buffered <= conn.local_flow_control_window(stream_id):
                    # All of it is here and fits the window: no task needed to send it.
                    await self._upload(exchange, body)
                else:
                    exchange.task = self._loop.create_task(self._upload(exchange, body))
            return await exchange.response
        except BaseException:
            # Cancelled (a timeout), or failed: either way the stream must not linger.
            self._cancel(exchange)
            raise

    async def ping(self, timeout: float) -> None:
        """Send a PING and wait for its acknowledgement: how a keepalive finds a peer that is
        gone without a word. UpstreamError when none arrives within `timeout` seconds, or
        the connection ends first."""
        if self._closed:
            raise UpstreamError(self._error, connected=True)
        payload = next(_PING_IDS).to_bytes(8, "big")
        waiter = self._loop.create_future()
        self._pings[payload] = waiter
        try:
            self._h2.ping(payload)
            self._flush()
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise UpstreamError(
                f"no PING acknowledgement within {timeout:g} s", connected=True
            ) from None
        finally:
            self._pings.pop(payload, None)

    async def _wait_for_stream(self) -> None:
        while True:
            if not self.is_usable:
                raise UpstreamError(self._error, connected=True)
            if self.available_streams > 0:
                return
            waiter = self._loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._slot_waiters.remove(waiter)

    async def _upload(self, exchange: _Exchange, body: Body) -> None:
        """Send the request body; on failure reset the stream, which fails the response."""
        try:
            await self._send_body(exchange, body)
        except _StreamGone:
            pass
        except BodyError as exc:  # the request's producer failed (its client went away)
            self._reset(exchange, ErrorCodes.CANCEL)
            self._fail_exchange(exchange, f"the request body failed: {exc}")
            self._forget(exchange)
        finally:
            if not body.finished:
                body.cancel()
        if not exchange.reset:
            self._forget_if_closed(exchange)

    def _cancel(self, exchange: _Exchange) -> None:
        """The caller gave up on the exchange: reset the stream and forget it."""
        self._reset(exchange, ErrorCodes.CANCEL)
        if exchange.task is not None:
            exchange.task.cancel()
        self._forget(exchange)

    def _abandon(self, exchange: _Exchange) -> None:
        super()._abandon(exchange)
        if not exchange.reset and not self._stream_closed(exchange.stream_id):
            self._cancel(exchange)

    # --- connection life -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        stream = self._stream
        try:
            while True:
                data = await stream.read(READ_SIZE)
                if not data:
                    self._lost("the upstream closed the HTTP/2 connection")
                    return
                if self._closed:
                    continue  # closing: wait for the peer to hang up
                if not self._receive(data):
                    continue  # a protocol error: GOAWAY is on its way
                if len(self._out) > WRITE_BUFFER:
                    await self._drained()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost(f"the upstream HTTP/2 connection failed: {exc!r}")

    def _lost(self, reason: str) -> None:
        self._shutdown(reason)
        self._stream.abort()

    def _shutdown(self, reason: str) -> None:
        if not self._closed:
            self._error = reason
        super()._shutdown(reason)
        self._wake_slot_waiters()
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_exception(UpstreamError(reason, connected=True))

    def _forget(self, exchange: _Exchange) -> None:
        if self._exchanges.pop(exchange.stream_id, None) is None:
            return
        if not self._exchanges:
            self._idle_since = time.monotonic()
            self._close_if_drained()
        self._wake_slot_waiters()

    def _close_if_drained(self) -> None:
        """After a GOAWAY, the connection ends with its last stream."""
        if self._goaway and not self._exchanges and not self._closed:
            self._goodbye()
            self._shutdown(self._error)
            self._closer = self._loop.create_task(self._finish_writing())

    def _forget_if_closed(self, exchange: _Exchange) -> None:
        if self._stream_closed(exchange.stream_id):
            self._forget(exchange)

    def _on_other(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self._on_response(event)
        elif isinstance(event, h2.events.PingAckReceived) and event.ping_data is not None:
            _wake(self._pings.get(event.ping_data))

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        exchange = self._exchanges.get(event.stream_id)
        if exchange is None or exchange.response is None:
            return
        pseudo, headers, length = _read_block(event.headers)
        status_text = pseudo.get(":status", "")
        status = int(status_text) if status_text.isdigit() else 0
        if not 200 <= status <= 999:
            self._reset(exchange, ErrorCodes.PROTOCOL_ERROR)
            self._fail_exchange(exchange, f"invalid upstream response status {status}")
            self._forget(exchange)
            return
        body = _StreamBody(length, lambda: self._abandon(exchange), self._body_limit)
        if event.stream_ended is not None:
            body.end()
        exchange.body = body
        if not exchange.response.done():
            exchange.response.set_result(Response(status, headers, body))

    def _on_remote_end(self, exchange: _Exchange) -> None:
        task = exchange.task
        if task is not None and not task.done():
            # A complete response ends the exchange: the rest of the request is not wanted.
            self._reset(exchange, ErrorCodes.CANCEL)
            task.cancel()
        self._forget_if_closed(exchange)

    def _on_reset(self, exchange: _Exchange, reason: str) -> None:
        self._fail_exchange(exchange, f"the upstream reset the stream ({reason})")
        self._forget(exchange)

    def _on_settings(self) -> None:
        self._peer_settings = True
        self._wake_slot_waiters()  # the stream limit may have changed

    def _wake_slot_waiters(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for waiter in waiters:
            _wake(waiter)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self._goaway = True
        last = event.last_stream_id or 0
        code = _error_name(event.error_code)
        self._error = f"the upstream sent GOAWAY ({code})"
        for exchange in [e for e in self._exchanges.values() if e.stream_id > last]:
            # Never processed by the peer: safe for the caller to send again elsewhere.
            self._reset(exchange, ErrorCodes.REFUSED_STREAM)
            self._fail_exchange(exchange, f"the upstream refused the stream with GOAWAY ({code})")
            self._forget(exchange)
        self._close_if_drained()
        self._wake_slot_waiters()  # they fail: no new streams on this connection

    def _fail_exchange(self, exchange: _Exchange, reason: str) -> None:
        response = exchange.response
        if response is not None and not response.done():
            response.set_exception(UpstreamError(reason, connected=True))
        elif exchange.body is not None and not exchange.body.ended:
            exchange.body.fail(BodyError(reason))
        if exchange.task is not None and exchange.task is not asyncio.current_task():
            exchange.task.cancel()


# --- header blocks ---------------------------------------------------------------------------


def _request_block(request: Request) -> _HeaderBlock:
    """The request's HEADERS: pseudo-headers first, without hop-by-hop headers.

    `te: trailers` is the one TE value HTTP/2 allows, and gRPC servers require it.
    """
    authority = request.authority
    named = _connection_tokens(request.headers)
    regular: _HeaderBlock = []
    for name, value in request.headers:
        if name == "te":
            if value.strip().lower() == "trailers":
                regular.append((b"te", b"trailers"))
            continue
        if name in HOP_BY_HOP or name in named or name.startswith(":"):
            continue
        if name == "host":
            if not authority:
                authority = value
            continue
        regular.append((_encode(name.lower()), _encode(value)))
    method = request.method or "GET"
    if method == "CONNECT":
        return [(b":method", b"CONNECT"), (b":authority", _encode(authority)), *regular]
    return [
        (b":method", _encode(method)),
        (b":scheme", _encode(request.scheme or "http")),
        (b":authority", _encode(authority)),
        (b":path", _encode(request.path or "/")),
        *regular,
    ]


def _response_block(response: Response) -> _HeaderBlock:
    named = _connection_tokens(response.headers)
    block = [(b":status", b"%d" % response.status)]
    for name, value in response.headers:
        if name in HOP_BY_HOP or name in named or name.startswith(":"):
            continue
        block.append((_encode(name.lower()), _encode(value)))
    return block


def _trailer_block(trailers: Headers) -> _HeaderBlock:
    return [
        (_encode(name.lower()), _encode(value))
        for name, value in trailers
        if name not in HOP_BY_HOP and not name.startswith(":")
    ]


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Header names a Connection header marks as hop-by-hop (rare: usually empty)."""
    tokens: set[str] = set()
    for name, value in headers:
        if name == "connection":
            tokens.update(token.strip().lower() for token in value.split(","))
    return frozenset(tokens)


def _encode(text: str) -> bytes:
    """Header text as it came off the wire (the codecs decode latin-1), UTF-8 if it never was."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _read_block(
    block: Iterable[tuple[bytes, bytes]],
) -> tuple[dict[str, str], Headers, int | None]:
    """A received header block: its pseudo-headers (the last of each name), its regular
    headers in order, and the content-length when one is given as digits."""
    pseudo: dict[str, str] = {}
    headers: Headers = []
    length: int | None = None
    for raw_name, raw_value in block:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        if raw_name[0] == _COLON:
            pseudo[name] = value
            continue
        if name == "content-length" and value.isdigit():
            length = int(value)
        headers.append((name, value))
    return pseudo, headers, length


def _decode(block: Iterable[tuple[bytes, bytes]]) -> Headers:
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in block
        if name[:1] != b":"
    ]


def _error_name(code: ErrorCodes | int | None) -> str:
    return code.name if isinstance(code, ErrorCodes) else str(code)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
