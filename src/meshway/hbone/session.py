"""One HTTP/2 connection over TLS: the h2 state machine driven by asyncio protocol callbacks.

Client and server share this layer; only who opens streams differs. h2 owns the protocol
(framing, HPACK, stream states, flow-control accounting) and never touches a socket; this
class feeds it the bytes the transport delivers, routes its events to `HboneStream`s and
writes what it wants to send. Everything here runs synchronously inside the event loop's
callbacks, so no lock is needed and ordering is exactly the wire order.

DATA frames, which are nearly all of a tunnel's frames, take a lean path around h2: this
class frames outgoing data itself and parses incoming DATA frames of open streams itself,
with its own receive-window accounting and WINDOW_UPDATEs. h2 still sees every other frame
(and an empty END_STREAM DATA frame in place of a final DATA frame) in wire order, so it keeps
owning stream states, HPACK, SETTINGS, PING and GOAWAY; our outgoing DATA is subtracted from
its send windows, so its flow-control view stays exact. h2 costs about 40 Python calls per
DATA frame each way; this path costs a handful, and the profile of a loaded node proxy had
h2's DATA handling as the largest Python-level cost.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import ssl
import struct
from collections.abc import Callable, Iterable
from typing import cast

import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes

from meshway.hbone.errors import HboneConnectionError, HboneError
from meshway.hbone.stream import HboneStream
from meshway.hbone.tls import ALPN_H2, IdentityError, peer_identity
from meshway.hbone.windows import CONNECTION_WINDOW, STREAM_WINDOW
from meshway.identity import SpiffeId

logger = logging.getLogger(__name__)


def _short_hex_repr(data: bytes | memoryview | None) -> str:
    """hyperframe's `_raw_data_repr` with the same output, hexlifying 10 bytes, not all."""
    if not data:
        return "None"
    text = binascii.hexlify(data[:10]).decode("ascii")
    return "<hex:" + text + ("..." if len(data) > 10 else "") + ">"


# h2 builds repr(frame) for its no-op trace logger on every received frame, and hyperframe's
# repr hexlifies the whole payload only to keep 20 characters: a fifth of the receive path's
# CPU. The replacement returns identical strings.
if hasattr(hyperframe.frame, "_raw_data_repr"):
    hyperframe.frame._raw_data_repr = _short_hex_repr

MAX_HEADER_LIST_SIZE = 64 * 1024
# Bigger than HTTP/2's 16 KiB default to cut per-frame work in h2; still small enough that
# h2's CONTINUATION backlog (64 frames) stays a bounded amount of memory per connection.
MAX_FRAME_SIZE = 64 * 1024
DEFAULT_MAX_CONCURRENT_STREAMS = 100
_DEFAULT_WINDOW = 65_535
# Data is written at once on a connection with fewer open streams than this, and at the end of
# the event loop's turn on a busier one. Deferring lets the frames of every stream written in
# one turn leave in one TLS write, which took a third off the CPU per request at 50 streams;
# with a few streams a frame rarely has company, and the deferral only costs an extra loop
# turn (about 40 us per round trip through two proxies, measured with one stream).
COALESCE_MIN_STREAMS = 8

# A frame header as (length << 8 | type, flags, stream id): RFC 9113 4.1 in one unpack.
_FRAME_HEAD = struct.Struct(">IBI")
_FRAME_DATA = 0x0
_FRAME_WINDOW_UPDATE = 0x8
_FLAG_END_STREAM = 0x1
_FLAG_PADDED = 0x8
_STREAM_ID_MASK = 0x7FFFFFFF
# Connection preface a server reads first (RFC 9113 3.4); h2 checks it.
_PREFACE_LENGTH = 24

Header = tuple[bytes, bytes]
RequestCallback = Callable[[HboneStream, list[Header]], None]
PeerCheck = Callable[[SpiffeId], None]


class H2Session(asyncio.Protocol):
    """The asyncio protocol of one HBONE connection (after the TLS handshake).

    `failure_reason` is a short, bounded label for why the connection ended badly, which the
    server counts; `failure` is the exception streams and callers see.
    """

    def __init__(
        self,
        *,
        client_side: bool,
        on_request: RequestCallback | None = None,
        check_peer: PeerCheck | None = None,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.client_side = client_side
        self.on_request = on_request
        self._check_peer = check_peer
        self.h2 = H2Connection(H2Configuration(client_side=client_side, header_encoding=None))
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        }
        if client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.h2.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
        # h2 copied these from its default settings in its constructor.
        self.h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE

        self.streams: dict[int, HboneStream] = {}
        self.peer_identity: SpiffeId | None = None
        self._flush_pending = False
        self.failure: HboneError | None = None
        self.failure_reason: str | None = None
        self.idle_since: float | None = self._loop.time()
        self._transport: asyncio.Transport | None = None
        self._closing = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._peer_settings: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._blocked_writers: set[HboneStream] = set()
        self._on_writable: list[Callable[[], None]] = []
        # The lean DATA path: bytes not parsed yet, output queued ahead of h2's, and the
        # connection's receive window as we granted it.
        self._inbuf = bytearray()
        self._preface_left = 0 if client_side else _PREFACE_LENGTH
        self._outbuf = bytearray()
        self._recv_window = CONNECTION_WINDOW
        self._recv_unacked = 0

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's SSL transport is not an asyncio.Transport subclass, but it behaves as one.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        refusal = self._check_tls(transport)
        if refusal is not None:
            # Refused before a single HTTP/2 byte went out: a wrong peer learns nothing.
            reason, error = refusal
            self._shut(error, reason)
            transport.abort()
            return
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self.flush()

    def data_received(self, data: bytes) -> None:
        """Split what arrived into frames: DATA of open streams here, the rest to h2."""
        if self._closing:
            return
        buf: bytes | bytearray
        if self._inbuf:
            self._inbuf += data
            buf = self._inbuf
        else:
            buf = data
        size = len(buf)
        pos = start = 0  # h2 gets buf[start:pos] before anything after it is handled
        if self._preface_left:
            pos = min(self._preface_left, size)
            self._preface_left -= pos
        max_frame = self.h2.max_inbound_frame_size
        while size - pos >= 9 and not self._closing:
            word, flags, stream_id = _FRAME_HEAD.unpack_from(buf, pos)
            length = word >> 8
            if length > max_frame:
                # h2 refuses it from the header alone (FRAME_SIZE_ERROR).
                self._to_h2(buf[start : pos + 9])
                return
            end = pos + 9 + length
            if end > size:
                break
            if word & 0xFF == _FRAME_DATA:
                # The frames before it may open or end its stream: h2 handles them first.
                if start < pos:
                    if not self._to_h2(buf[start:pos]):
                        return
                    start = pos
                stream = self.streams.get(stream_id & _STREAM_ID_MASK)
                if stream is not None and stream._receiving:
                    if not self._receive_data_frame(stream, flags, buf[pos + 9 : end]):
                        return
                    start = end
            pos = end
        if start < pos and not self._to_h2(buf[start:pos]):
            return
        if pos < size:
            if buf is self._inbuf:
                del self._inbuf[:pos]
            else:
                self._inbuf += memoryview(buf)[pos:]
        elif buf is self._inbuf:
            self._inbuf.clear()
        self.flush()

    def _to_h2(self, data: bytes | bytearray) -> bool:
        """Feed whole frames to h2 and handle its events; False once the connection failed."""
        try:
            events = self.h2.receive_data(bytes(data))
        except h2.exceptions.DenialOfServiceError as exc:
            self._fail("h2_header_list_too_large", HboneConnectionError(str(exc)))
            return False
        except h2.exceptions.ProtocolError as exc:
            self._fail("h2_protocol_error", HboneConnectionError(f"HTTP/2 protocol error: {exc}"))
            return False
        try:
            for event in events:
                if self._closing:
                    break  # a GOAWAY in this batch ended the connection
                self._dispatch(event)
        except Exception as exc:
            logger.exception("hbone: internal error handling HTTP/2 events")
            self._fail("internal_error", HboneConnectionError(f"internal error: {exc!r}"))
            return False
        return not self._closing

    def _receive_data_frame(
        self, stream: HboneStream, flags: int, payload: bytes | bytearray
    ) -> bool:
        """One DATA frame of an open stream; False when it broke the protocol."""
        flow_controlled = len(payload)
        if flow_controlled > self._recv_window or flow_controlled > stream._recv_window:
            return self._protocol_error(
                ErrorCodes.FLOW_CONTROL_ERROR, "flow_control_error", "the peer overran a window"
            )
        self._recv_window -= flow_controlled
        stream._recv_window -= flow_controlled
        data = payload
        if flags & _FLAG_PADDED:
            padding = payload[0] if payload else 0
            if not payload or padding >= flow_controlled:
                return self._protocol_error(
                    ErrorCodes.PROTOCOL_ERROR, "h2_protocol_error", "DATA padding too long"
                )
            data = payload[1 : flow_controlled - padding]
        unused = flow_controlled - len(data)
        if data and not stream._on_data(bytes(data), flow_controlled):
            unused = flow_controlled
        if unused:
            self.acknowledge(stream.stream_id, unused)
        if flags & _FLAG_END_STREAM:
            # h2 owns stream states: it sees the end as an empty final DATA frame.
            return self._to_h2(_FRAME_HEAD.pack(_FRAME_DATA, _FLAG_END_STREAM, stream.stream_id))
        return True

    def _protocol_error(self, code: ErrorCodes, reason: str, message: str) -> bool:
        self._take_h2_output()
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(code, additional_data=message.encode())
        self._fail(reason, HboneConnectionError(f"HTTP/2 protocol error: {message}"))
        return False

    def eof_received(self) -> bool:
        # A half-closed TCP connection is useless for HTTP/2: close our side too.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._shut(HboneConnectionError("the HBONE connection was closed"))
        else:
            error = HboneConnectionError(f"the HBONE connection was lost: {exc}")
            self._shut(error, "connection_lost")
        self._writable.set()
        self._on_writable.clear()  # the streams were failed, which ended their relays
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()
        self._call_writable_callbacks()

    def _call_writable_callbacks(self) -> None:
        callbacks, self._on_writable = self._on_writable, []
        for callback in callbacks:
            callback()

    # --- connection-level API --------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True while new streams may be started on this connection."""
        return (
            self._transport is not None
            and not self._closing
            and self.failure is None
            and not self._transport.is_closing()
        )

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    async def wait_peer_settings(self) -> None:
        """Return once the peer's first SETTINGS arrived; raise if the connection died first.

        In TLS 1.3 the client finishes its handshake before the server has checked the client
        certificate, so this is also where a client learns that it was refused.
        """
        await asyncio.shield(self._peer_settings)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def close(self) -> None:
        """Send GOAWAY and close the transport; open streams fail with a connection error."""
        if self._closing:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):  # h2 may already be closed
            self.h2.close_connection(ErrorCodes.NO_ERROR)
        self.flush()
        self._shut(HboneConnectionError("the HBONE connection was closed by this side"))
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection without goodbye (for a peer that stopped reading)."""
        self._shut(HboneConnectionError("the HBONE connection was aborted by this side"))
        if self._transport is not None:
            self._transport.abort()

    def flush(self) -> None:
        self._flush_pending = False
        if self._outbuf:
            self._take_h2_output()
            data: bytes | bytearray = self._outbuf
            self._outbuf = bytearray()  # the transport may keep the old one: never reuse it
        else:
            data = self.h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _take_h2_output(self) -> None:
        """Queue what h2 has to send, so that frames we add go out after it, in order."""
        pending = self.h2.data_to_send()
        if pending:
            self._outbuf += pending

    def flush_soon(self) -> None:
        """Flush once at the end of this turn of the event loop (see COALESCE_MIN_STREAMS)."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if not self._writable.is_set():
            await self._writable.wait()

    @property
    def writing_paused(self) -> bool:
        return not self._writable.is_set()

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call `callback` at the next `resume_writing` (synchronous producers' drain)."""
        if self._writable.is_set():
            self._loop.call_soon(callback)
        else:
            self._on_writable.append(callback)

    @property
    def write_buffer_size(self) -> int:
        return 0 if self._transport is None else self._transport.get_write_buffer_size()

    # --- stream-level API (used by HboneStream and the client) ----------------------------

    def start_stream(self, headers: Iterable[tuple[str, str]]) -> HboneStream:
        """Open a client stream by sending its HEADERS; the response arrives as an event."""
        if not self.is_open:
            raise self.failure or HboneConnectionError("the HBONE connection is closed")
        try:
            stream_id = self.h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self.close()
            raise HboneConnectionError("the connection ran out of stream IDs") from None
        try:
            self.h2.send_headers(stream_id, _encode(headers))
        except h2.exceptions.ProtocolError as exc:
            # h2 validates while HPACK-encoding, so its encoder state no longer matches the
            # peer's decoder: the connection cannot carry another header block.
            self.close()
            raise HboneError(f"invalid CONNECT request headers: {exc}") from None
        stream = HboneStream(self, stream_id)
        self.streams[stream_id] = stream
        self.idle_since = None
        self.flush()
        return stream

    def send_headers(
        self,
        stream_id: int,
        headers: Iterable[tuple[str, str]],
        *,
        end_stream: bool = False,
        flush: bool = True,
    ) -> None:
        self._check_open()
        self.h2.send_headers(stream_id, _encode(headers), end_stream=end_stream)
        if flush:
            self.flush()

    def sendable(self, stream_id: int) -> int:
        """How many bytes flow control lets us send on the stream right now."""
        self._check_open()
        try:
            return self.h2.local_flow_control_window(stream_id)
        except h2.exceptions.StreamClosedError:
            raise _closed_under_us(stream_id) from None

    def send_data(self, stream_id: int, data: memoryview, *, end_stream: bool = False) -> None:
        """Send `data` (which must fit the window) in frames of the peer's maximum size; if it
        does not fit, nothing is sent."""
        if len(data) > self.sendable(stream_id):
            raise HboneError(f"{len(data)} bytes do not fit the flow-control window")
        self.send_some(stream_id, data, end_stream=end_stream)

    def send_some(self, stream_id: int, data: memoryview, *, end_stream: bool = False) -> int:
        """Send as much of `data` as the flow-control windows allow now (in frames of the
        peer's maximum size); how much that was. `end_stream` applies only when all of it
        was sent. One call per write on the data path: `sendable` and `send_data` in one."""
        self._check_open()
        h2_stream = self.h2.streams.get(stream_id)
        if h2_stream is None or h2_stream.closed:
            raise _closed_under_us(stream_id)
        wanted = len(data)
        size = wanted and min(
            wanted, self.h2.outbound_flow_control_window, h2_stream.outbound_flow_control_window
        )
        if size < wanted:
            if size <= 0:
                return 0
            data = data[:size]
            end_stream = False
        # Keep h2's send windows exact: it handles the peer's WINDOW_UPDATEs and SETTINGS.
        self.h2.outbound_flow_control_window -= size
        h2_stream.outbound_flow_control_window -= size
        self._take_h2_output()
        out = self._outbuf
        frame_size = self.h2.max_outbound_frame_size
        for start in range(0, size, frame_size):
            chunk = data[start : start + frame_size]
            out += _FRAME_HEAD.pack(len(chunk) << 8 | _FRAME_DATA, 0, stream_id)
            out += chunk
        if end_stream:
            self.end_stream(stream_id)
        elif len(self.streams) < COALESCE_MIN_STREAMS:
            self.flush()
        else:
            self.flush_soon()
        return size

    def end_stream(self, stream_id: int) -> None:
        self._check_open()
        try:
            self.h2.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            raise _closed_under_us(stream_id) from None
        self.flush()

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if self._closing:
            return  # the whole connection is going away; nothing to reset
        with contextlib.suppress(h2.exceptions.StreamClosedError):  # closed in the meantime
            self.h2.reset_stream(stream_id, error_code)
        self.flush()

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Hand `size` consumed bytes back to the peer's flow-control windows.

        Like h2's window manager, a WINDOW_UPDATE goes out once half a window is consumed,
        so a stream of small messages costs one update per many messages, not one each.
        """
        if not size or self._closing:
            return
        stream = self.streams.get(stream_id)
        if stream is not None and stream._receiving:
            stream._recv_unacked += size
            if stream._recv_unacked >= STREAM_WINDOW // 2:
                self._window_update(stream_id, stream._recv_unacked)
                stream._recv_window += stream._recv_unacked
                stream._recv_unacked = 0
        self._recv_unacked += size
        if self._recv_unacked >= CONNECTION_WINDOW // 2:
            self._window_update(0, self._recv_unacked)
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0

    def _window_update(self, stream_id: int, increment: int) -> None:
        self._take_h2_output()
        self._outbuf += _FRAME_HEAD.pack(4 << 8 | _FRAME_WINDOW_UPDATE, 0, stream_id)
        self._outbuf += increment.to_bytes(4, "big")
        self.flush_soon()

    def wait_for_window(self, stream: HboneStream) -> None:
        self._blocked_writers.add(stream)

    def forget_if_closed(self, stream: HboneStream) -> None:
        """Stop routing events to a stream h2 has closed, so it no longer counts as open."""
        h2_stream = self.h2.streams.get(stream.stream_id)
        if h2_stream is not None and not h2_stream.closed:
            return
        self.streams.pop(stream.stream_id, None)
        self._blocked_writers.discard(stream)
        if not self.streams:
            self.idle_since = self._loop.time()

    # --- internals -------------------------------------------------------------------------

    def _check_tls(self, transport: asyncio.Transport) -> tuple[str, HboneError] | None:
        """Check ALPN and the peer's identity; return (reason, error) when the peer is refused."""
        ssl_object = transport.get_extra_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject):
            return "not_tls", HboneConnectionError("HBONE requires TLS")
        if ssl_object.selected_alpn_protocol() != ALPN_H2:
            return "alpn_not_h2", HboneConnectionError("the peer did not negotiate ALPN h2")
        try:
            identity = peer_identity(ssl_object)
            if self._check_peer is not None:
                self._check_peer(identity)
        except IdentityError as exc:
            return "peer_identity_invalid", exc
        self.peer_identity = identity
        return None

    def _check_open(self) -> None:
        if self._closing:
            raise self.failure or HboneConnectionError("the HBONE connection is closed")

    def _shut(self, error: HboneError, reason: str | None = None) -> None:
        """Mark the connection as ending and fail its streams; the first cause is kept.

        Streams fail at once rather than at connection_lost, because h2 refuses every
        further call after a GOAWAY and the transport may take a while to close.
        """
        if not self._closing:
            self._closing = True
            self.failure = error
            self.failure_reason = reason
        for stream in list(self.streams.values()):
            stream._on_connection_lost(self.failure or error)
        self.streams.clear()
        self._blocked_writers.clear()
        if not self._peer_settings.done():
            self._peer_settings.set_exception(self.failure or error)
            self._peer_settings.exception()  # retrieved: nobody may be waiting for it

    def _fail(self, reason: str, error: HboneError) -> None:
        """End the connection after a protocol violation, telling the peer with GOAWAY."""
        self.flush()  # h2 queued a GOAWAY describing the error
        self._shut(error, reason)
        if self._transport is not None:
            self._transport.close()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            # Only DATA h2 accepted although no stream of ours reads it reaches h2 (the lean
            # path takes the rest): return its window at once so the connection never leaks.
            assert event.stream_id is not None
            self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                # h2 handles a whole read before we see its events: a RST_STREAM later in
                # the same read may have closed the stream already. Its event comes next.
                if stream is not None and not self._closed_in_h2(event.stream_id):
                    self._blocked_writers.discard(stream)
                    stream._on_window_open()
            else:
                self._wake_all_writers()
        elif isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None and event.headers is not None
            self._on_request_received(event.stream_id, list(event.headers))
        elif isinstance(event, h2.events.ResponseReceived):
            assert event.stream_id is not None and event.headers is not None
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_response(list(event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_remote_end()
                self.forget_if_closed(stream)
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_reset(int(event.error_code or 0), by_peer=event.remote_reset)
                self.forget_if_closed(stream)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self._peer_settings.done():
                self._peer_settings.set_result(None)
            self._wake_all_writers()  # the initial window or frame size may have grown
        elif isinstance(event, h2.events.ConnectionTerminated):
            # h2 cannot carry on after GOAWAY, so the whole connection ends here.
            code = event.error_code
            error = HboneConnectionError(f"the peer closed the connection (GOAWAY {code!r})")
            self._shut(error, None if code == ErrorCodes.NO_ERROR else "goaway_received")
            if self._transport is not None:
                self._transport.close()
        # Pings are answered by h2 itself; priority, trailers and 1xx carry nothing for a tunnel.

    def _on_request_received(self, stream_id: int, headers: list[Header]) -> None:
        stream = HboneStream(self, stream_id)
        stream._receiving = True
        self.streams[stream_id] = stream
        self.idle_since = None
        if self.on_request is None:
            self.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self.streams.pop(stream_id, None)
            return
        self.on_request(stream, headers)

    def _wake_all_writers(self) -> None:
        blocked, self._blocked_writers = self._blocked_writers, set()
        for stream in blocked:
            if not self._closed_in_h2(stream.stream_id):
                stream._on_window_open()

    def _closed_in_h2(self, stream_id: int) -> bool:
        h2_stream = self.h2.streams.get(stream_id)
        return h2_stream is None or h2_stream.closed


def _closed_under_us(stream_id: int) -> HboneError:
    return HboneError(f"stream {stream_id} was closed by the peer")


def _encode(headers: Iterable[tuple[str, str]]) -> list[Header]:
    """Headers as bytes: h2 only validates outbound headers (TE, Connection, ...) given bytes."""
    return [(name.encode("ascii"), value.encode("utf-8")) for name, value in headers]
