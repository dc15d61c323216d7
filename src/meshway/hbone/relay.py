"""Relays at the protocol level: bytes move inside the event loop's callbacks, no task hops.

A node proxy spends its life copying bytes between an application's TCP socket and an HBONE
tunnel (or, for plaintext, between two sockets). Doing that with StreamReader/StreamWriter
costs a future, a task step and a buffer copy for every chunk in each direction; here the
socket's `data_received` hands the bytes straight to HTTP/2 and a DATA frame straight to the
socket's `write`, so one chunk is one callback.

Back-pressure is kept without buffers of our own:
- socket → tunnel: reading from the socket pauses while the stream has no flow-control window
  or the HBONE connection's TLS buffer is over its high-water mark, and resumes when either
  opens again; at most one chunk waits here meanwhile.
- tunnel → socket: received bytes are handed back to the peer's window only once the socket
  has taken them; while the socket's buffer is over its high-water mark the window stays
  closed, so the peer stops sending. Memory per relay is bounded by one stream window.

Half-close crosses the relay both ways (EOF ↔ END_STREAM, EOF ↔ EOF); a reset or a broken
socket on one side aborts the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import Protocol, cast

from h2.errors import ErrorCodes

from meshway.hbone.errors import HboneError, HboneStreamReset
from meshway.hbone.stream import HboneStream

logger = logging.getLogger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


class _Relay(Protocol):
    def socket_data(self, end: SocketEnd, data: bytes) -> None: ...
    def socket_eof(self, end: SocketEnd) -> None: ...
    def socket_lost(self, end: SocketEnd, exc: Exception | None) -> None: ...
    def socket_writable(self, end: SocketEnd) -> None: ...


class SocketEnd(asyncio.Protocol):
    """One TCP socket of a relay: forwards every transport callback to the relay.

    Nothing reaches the relay before `start`: uvloop may deliver the first bytes (or EOF)
    even before `connection_made`, so early events are held here, reading is paused, and
    `start` replays them once the relay has all of its ends.
    """

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.read_paused = False
        self.eof = False
        self.lost = False
        self._started = False
        self._early: list[bytes] = []
        self._early_lost: tuple[Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as ones.
        self.transport = cast(asyncio.Transport, transport)
        if not self._started:
            self.pause_reading()

    def start(self) -> None:
        """Begin relaying: replay what arrived early, then read."""
        self._started = True
        early, self._early = self._early, []
        for data in early:
            self.relay.socket_data(self, data)
        if self.eof:
            self.relay.socket_eof(self)
        if self._early_lost is not None:
            self.relay.socket_lost(self, self._early_lost[0])
            return
        self.resume_reading()

    def data_received(self, data: bytes) -> None:
        if not self._started:
            self._early.append(data)
            self.pause_reading()
            return
        self.relay.socket_data(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        if self._started:
            self.relay.socket_eof(self)
        return True  # keep our sending side open: the other direction may still be busy

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.write_paused = False
        if not self._started:
            self._early_lost = (exc,)
            return
        self.relay.socket_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._started:
            self.relay.socket_writable(self)

    # --- helpers for the relays ------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.lost:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.lost:
            self.read_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def write_eof(self) -> None:
        assert self.transport is not None
        if not self.lost and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self, *, graceful: bool) -> None:
        """Close after the buffer drains (graceful), or reset: the peer gets a TCP RST, the
        way a failure on the far side of the relay shows on this side."""
        if self.transport is None:
            return
        if graceful:
            self.transport.close()
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None and not self.lost:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.transport.abort()


async def _attach(end: SocketEnd, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: end, sock=sock)


class _TunnelRelay:
    """A TCP socket and an HBONE stream, copied both ways (see the module docstring)."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream
        self.end = SocketEnd(self)
        self.sent = 0  # socket → tunnel
        self.received = 0  # tunnel → socket
        self._pending: memoryview | None = None  # socket bytes waiting for window
        self._unacked = 0  # tunnel bytes the socket has not taken yet
        self._up_done = False  # END_STREAM sent (or sending stopped for good)
        self._down_done = False  # the peer's END_STREAM turned into a FIN
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()

    # --- socket → tunnel -------------------------------------------------------------------

    def socket_data(self, end: SocketEnd, data: bytes) -> None:
        if self._up_done or self.done.done():
            return  # the peer said "stop sending" (RST NO_ERROR after END_STREAM): drop
        self.sent += len(data)
        if self._pending is not None:
            self._pending = memoryview(bytes(self._pending) + data)
            end.pause_reading()
            return
        self._push(memoryview(data))

    def _push(self, view: memoryview) -> None:
        """Send what the window allows; park the rest and stop reading until it opens."""
        try:
            sent = self.stream.send_nowait(view)
        except HboneError as exc:
            self._fail(exc)
            return
        if sent < len(view):
            self._pending = view[sent:]
            self.end.pause_reading()
            self.stream.wait_for_window()
            return
        self._pending = None
        if self.stream.writing_paused:
            self.end.pause_reading()
            self.stream.when_writable(self._resume_up)
        elif self.end.eof:
            self._end_up()
        else:
            self.end.resume_reading()

    def stream_writable(self) -> None:
        """The stream's window opened (a WINDOW_UPDATE or new SETTINGS)."""
        if self._pending is not None and not self.done.done():
            self._push(self._pending)

    def _resume_up(self) -> None:
        if self.done.done() or self._up_done:
            return
        if self._pending is not None:
            self._push(self._pending)
        elif self.end.eof:
            self._end_up()
        else:
            self.end.resume_reading()

    def socket_eof(self, end: SocketEnd) -> None:
        # END_STREAM is an empty frame: it needs no window and may join a full TLS buffer.
        # With bytes still parked, _push sends it after them.
        if self._pending is None:
            self._end_up()

    def _end_up(self) -> None:
        if self._up_done:
            return
        self._up_done = True
        try:
            self.stream.write_eof_nowait()
        except HboneStreamReset as reset:
            if reset.error_code != ErrorCodes.NO_ERROR:
                self._fail(reset)
                return
        except HboneError as exc:
            self._fail(exc)
            return
        self._maybe_finish()

    # --- tunnel → socket -------------------------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        if self.end.lost:
            self.stream.acknowledge(len(data))  # nobody can take it: keep the window open
            return
        self.received += len(data)
        self.end.write(data)
        if self.end.write_paused:
            self._unacked += len(data)
        else:
            self.stream.acknowledge(len(data))

    def socket_writable(self, end: SocketEnd) -> None:
        if self._unacked:
            unacked, self._unacked = self._unacked, 0
            self.stream.acknowledge(unacked)

    def stream_ended(self) -> None:
        """The peer sent END_STREAM: all its data is in the socket's buffer; send a FIN."""
        if self._down_done:
            return
        self._down_done = True
        self.end.write_eof()
        self._maybe_finish()

    def stream_failed(self, error: HboneError) -> None:
        if (
            isinstance(error, HboneStreamReset)
            and error.error_code == ErrorCodes.NO_ERROR
            and self._down_done
        ):
            # RFC 9113 8.1: the peer has all it wants. Stop sending; what it sent is delivered.
            self._up_done = True
            self._pending = None
            self._maybe_finish()
            return
        self._fail(error)

    # --- ending ----------------------------------------------------------------------------

    def socket_lost(self, end: SocketEnd, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is None and self._up_done and self._down_done:
            self._finish(graceful=True)
            return
        self._fail(exc or ConnectionResetError("the socket closed before the relay finished"))

    def _maybe_finish(self) -> None:
        if self._up_done and self._down_done:
            self._finish(graceful=True)

    def _fail(self, error: BaseException) -> None:
        logger.debug("hbone: relay on stream %d ended: %s", self.stream.stream_id, error)
        self._finish(graceful=False)

    def _finish(self, *, graceful: bool) -> None:
        if self.done.done():
            return
        self.stream.detach()
        self.stream.abort()  # no-op after a clean finish; a reset otherwise
        self.end.close(graceful=graceful)
        self.done.set_result(None)


async def relay(stream: HboneStream, sock: socket.socket) -> tuple[int, int]:
    """Copy a connected TCP socket and a tunnel both ways until both sides are done.

    Half-close is carried across (EOF becomes END_STREAM, END_STREAM becomes a FIN), so
    request/response protocols that shut down their sending side keep working. A reset or a
    broken socket on either side aborts the other; cancelling the call aborts both. The
    socket belongs to the relay from here on and is closed on return. Returns (bytes sent
    into the tunnel, bytes received from it), also after an error, so telemetry stays right.
    """
    state = _TunnelRelay(stream)
    try:
        await _attach(state.end, sock)
        stream.attach(state)
        if not state.done.done():
            state.end.start()
        await asyncio.shield(state.done)
    finally:
        if not state.done.done():
            state._finish(graceful=False)
    return state.sent, state.received


class _SocketRelay:
    """Two TCP sockets copied both ways, for plaintext paths (no HBONE on either side)."""

    def __init__(self) -> None:
        self.a = SocketEnd(self)
        self.b = SocketEnd(self)
        self.counts = {id(self.a): 0, id(self.b): 0}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _other(self, end: SocketEnd) -> SocketEnd:
        return self.b if end is self.a else self.a

    def socket_data(self, end: SocketEnd, data: bytes) -> None:
        other = self._other(end)
        if other.lost:
            return
        self.counts[id(end)] += len(data)
        other.write(data)
        if other.write_paused:
            end.pause_reading()

    def socket_writable(self, end: SocketEnd) -> None:
        self._other(end).resume_reading()

    def socket_eof(self, end: SocketEnd) -> None:
        self._other(end).write_eof()
        if self.a.eof and self.b.eof:
            self._finish(graceful=True)

    def socket_lost(self, end: SocketEnd, exc: Exception | None) -> None:
        self._finish(graceful=exc is None and self.a.eof and self.b.eof)

    def _finish(self, *, graceful: bool) -> None:
        if self.done.done():
            return
        self.a.close(graceful=graceful)
        self.b.close(graceful=graceful)
        self.done.set_result(None)


async def splice(first: socket.socket, second: socket.socket) -> tuple[int, int]:
    """Copy two connected sockets both ways with half-close; returns (bytes 1→2, bytes 2→1).

    Both sockets belong to the relay from here on and are closed on return; a reset on one
    side resets the other, and cancelling the call drops both.
    """
    state = _SocketRelay()
    try:
        await _attach(state.a, first)
        await _attach(state.b, second)
        state.a.start()
        state.b.start()
        await asyncio.shield(state.done)
    finally:
        if not state.done.done():
            state._finish(graceful=False)
        with contextlib.suppress(OSError):
            first.close()
        with contextlib.suppress(OSError):
            second.close()
    return state.counts[id(state.a)], state.counts[id(state.b)]
