"""One HBONE tunnel (an HTTP/2 CONNECT stream) as a flow-controlled byte stream.

Flow control is what keeps a node proxy's memory flat: received bytes are handed back to the
peer's window only when the application *reads* them, so a slow reader stalls its sender
instead of growing a buffer here, and `write` waits for window instead of queueing. Either
way at most one stream window of data per direction is held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from h2.errors import ErrorCodes

from meshway.hbone.errors import HboneConnectionError, HboneError, HboneStreamReset
from meshway.hbone.windows import STREAM_WINDOW

if TYPE_CHECKING:
    from meshway.hbone.session import H2Session

logger = logging.getLogger(__name__)

RELAY_CHUNK = 64 * 1024
# Most bytes handed to the transport per step before waiting for it to drain: with a 16 MiB
# connection window, sending a whole window at once would park it all in the TLS buffer.
WRITE_BURST = 256 * 1024
_MAX_REFUSAL_BODY = 1024


class StreamSink(Protocol):
    """Takes a stream's events as they happen instead of `read` (see `hbone.relay`)."""

    def stream_data(self, data: bytes) -> None:
        """Received bytes; the sink calls `acknowledge` once it has passed them on."""

    def stream_ended(self) -> None:
        """The peer sent END_STREAM after all its data."""

    def stream_failed(self, error: HboneError) -> None:
        """A reset or a lost connection."""

    def stream_writable(self) -> None:
        """Flow-control window opened after `wait_for_window`."""


class HboneStream:
    """A CONNECT tunnel: `read`/`write` bytes, `write_eof` to half-close, `abort` to reset.

    One reader task and one writer task may use a stream at the same time; two concurrent
    readers or two concurrent writers are a programming error. The data path uses the
    synchronous side instead: `attach` a sink for what arrives, `send_nowait` and
    `write_eof_nowait` to send, all inside event-loop callbacks.
    """

    def __init__(self, session: H2Session, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._loop = asyncio.get_running_loop()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._remote_ended = False
        self._local_ended = False
        self._reset: HboneStreamReset | None = None
        self._connection_error: HboneError | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._response: asyncio.Future[tuple[int, dict[str, str]]] | None = None
        self._sink: StreamSink | None = None
        # For the session's lean DATA path: whether DATA may arrive now (after the request
        # or response headers, before END_STREAM or a reset), and this stream's receive
        # window as granted to the peer.
        self._receiving = False
        self._recv_window = STREAM_WINDOW
        self._recv_unacked = 0

    # --- reading -------------------------------------------------------------------------

    async def read(self, n: int = RELAY_CHUNK) -> bytes:
        """Up to `n` bytes; b"" once the peer has half-closed (END_STREAM) and all was read."""
        if n <= 0:
            raise ValueError(f"read size must be positive, got {n}")
        while not self._chunks:
            if self._remote_ended:
                return b""
            if self._reset is not None:
                raise self._reset
            if self._connection_error is not None:
                raise self._connection_error
            await self._wait_readable()
        chunk = self._chunks[0]
        if len(chunk) <= n:
            self._chunks.popleft()
        else:
            self._chunks[0] = chunk[n:]
            chunk = chunk[:n]
        self._buffered -= len(chunk)
        self._session.acknowledge(self.stream_id, len(chunk))
        return chunk

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not read yet (never more than the stream window)."""
        return self._buffered

    @property
    def at_eof(self) -> bool:
        return self._remote_ended and not self._chunks

    # --- writing -------------------------------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of `data`, waiting for flow-control window and transport buffer space."""
        view = memoryview(data).cast("B")
        while view:
            sent = self.send_nowait(view[:WRITE_BURST])
            if not sent:
                self._session.wait_for_window(self)
                await self._wait_writable()
                continue
            view = view[sent:]
            await self._session.drain()

    async def write_eof(self) -> None:
        """Half-close: send END_STREAM; the peer can still send until it half-closes too."""
        if self._local_ended:
            return
        self.write_eof_nowait()
        await self._session.drain()

    @property
    def write_buffer_size(self) -> int:
        """Bytes written but still queued in this connection's transport (shared by streams)."""
        return self._session.write_buffer_size

    # --- the synchronous side, for relays ------------------------------------------------

    def attach(self, sink: StreamSink) -> None:
        """Hand everything received, buffered now and arriving later, to `sink`."""
        if self._read_waiter is not None:
            raise RuntimeError("a task is reading from this stream")
        self._sink = sink
        while self._chunks:
            chunk = self._chunks.popleft()
            self._buffered -= len(chunk)
            sink.stream_data(chunk)
        failure = self._reset or self._connection_error
        if self._remote_ended:
            sink.stream_ended()
        if failure is not None:
            sink.stream_failed(failure)

    def detach(self) -> None:
        self._sink = None

    def send_nowait(self, data: memoryview) -> int:
        """Send as much of `data` as flow control allows now; returns how much that was."""
        self._check_writable()
        return self._session.send_some(self.stream_id, data)

    def write_eof_nowait(self) -> None:
        """`write_eof` without waiting for the transport to drain."""
        if self._local_ended:
            return
        self._check_writable()
        self._session.end_stream(self.stream_id)
        self._local_ended = True
        self._session.forget_if_closed(self)

    def wait_for_window(self) -> None:
        """Call the sink's `stream_writable` once the peer opens the window again."""
        self._session.wait_for_window(self)

    @property
    def writing_paused(self) -> bool:
        """True while the connection's TLS buffer is over its high-water mark."""
        return self._session.writing_paused

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the connection's TLS buffer has drained below its low mark."""
        self._session.when_writable(callback)

    def acknowledge(self, size: int) -> None:
        """Give `size` bytes the sink has passed on back to the peer's window."""
        self._session.acknowledge(self.stream_id, size)

    # --- ending --------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish the tunnel: a graceful END_STREAM when the peer is done, else a reset.

        A stream whose peer is still sending is reset (CANCEL if we did not finish our side,
        NO_ERROR if we did, the RFC 9113 8.1 way of saying "stop sending, we are done").
        """
        if self.is_closed:
            return
        if self._remote_ended:
            with contextlib.suppress(HboneError):
                await self.write_eof()
            return
        self.abort(ErrorCodes.NO_ERROR if self._local_ended else ErrorCodes.CANCEL)

    def abort(self, error_code: int = ErrorCodes.CANCEL) -> None:
        """Reset the stream (RST_STREAM); unread data is dropped and its window returned."""
        if self.is_closed:
            return
        self._reset = HboneStreamReset(error_code, by_peer=False)
        self._receiving = False
        self._session.reset_stream(self.stream_id, error_code)
        self._discard_buffered()
        self._session.forget_if_closed(self)
        self._wake_all()

    @property
    def is_closed(self) -> bool:
        """True once nothing more can be sent or received on the wire."""
        return (
            self._reset is not None
            or self._connection_error is not None
            or (self._local_ended and self._remote_ended)
        )

    @property
    def is_finished(self) -> bool:
        """True when both sides sent END_STREAM and nothing was reset: a clean tunnel end."""
        return self._local_ended and self._remote_ended and self._reset is None

    @property
    def reset_reason(self) -> int | None:
        """The HTTP/2 error code of the RST_STREAM that ended the stream, if one did."""
        return None if self._reset is None else self._reset.error_code

    @property
    def reset_by_peer(self) -> bool:
        return self._reset is not None and self._reset.by_peer

    # --- used by the client and the server -----------------------------------------------

    async def response(self) -> tuple[int, dict[str, str]]:
        """Wait for the response HEADERS of a stream we opened: (status, headers)."""
        if self._response is None:
            self._response = self._loop.create_future()
            self._fail_response_if_ended()
        return await asyncio.shield(self._response)

    def take_refusal_reason(self) -> str:
        """The body of a refusal that has already arrived (at most 1 KiB), without waiting."""
        body = b"".join(self._chunks)[:_MAX_REFUSAL_BODY]
        self._discard_buffered()
        return body.decode("utf-8", errors="replace")

    def send_response(self, status: int, reason: str = "") -> None:
        """Answer a CONNECT: 200 keeps the tunnel open; any other status ends our side."""
        self._check_writable()
        headers = [(":status", str(status))]
        if status == 200:
            self._session.send_headers(self.stream_id, headers)
            return
        body = reason.encode("utf-8")[:_MAX_REFUSAL_BODY]
        body = body[: max(0, self._session.sendable(self.stream_id))]
        if body:
            headers.append(("content-type", "text/plain; charset=utf-8"))
        self._local_ended = True
        # Headers and reason leave in one write, so the client sees both in one read.
        self._session.send_headers(self.stream_id, headers, end_stream=not body, flush=not body)
        if body:
            self._session.send_data(self.stream_id, memoryview(body), end_stream=True)
        self._session.forget_if_closed(self)

    # --- events from the session ---------------------------------------------------------

    def _on_data(self, data: bytes, flow_controlled_length: int) -> bool:
        """Buffer received data; False when the stream no longer wants it (already reset)."""
        if self._reset is not None or not data:
            return False
        if self._sink is not None:
            self._sink.stream_data(data)
            return True
        self._chunks.append(data)
        self._buffered += len(data)
        _wake(self._read_waiter)
        return True

    def _on_remote_end(self) -> None:
        self._remote_ended = True
        self._receiving = False
        self._fail_response_if_ended()
        _wake(self._read_waiter)
        if self._sink is not None:
            self._sink.stream_ended()

    def _on_response(self, headers: list[tuple[bytes, bytes]]) -> None:
        status = 0
        decoded: dict[str, str] = {}
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif not name.startswith(b":"):
                decoded[name.decode("ascii")] = value.decode("utf-8", errors="replace")
        if self._response is None:
            self._response = self._loop.create_future()
        if not self._response.done():
            self._receiving = True
            self._response.set_result((status, decoded))

    def _on_reset(self, error_code: int, *, by_peer: bool) -> None:
        self._receiving = False
        if self._reset is None:
            self._reset = HboneStreamReset(error_code, by_peer=by_peer)
        if not self._remote_ended:
            # A reset before END_STREAM means the data was never complete: drop it. After
            # END_STREAM (RFC 9113 8.1 "stop sending") what we received is whole and stays.
            self._discard_buffered()
        self._fail_response_if_ended()
        self._wake_all()
        if self._sink is not None:
            self._sink.stream_failed(self._reset)

    def _on_connection_lost(self, error: HboneError) -> None:
        self._receiving = False
        if self._connection_error is None and not (self._local_ended and self._remote_ended):
            self._connection_error = error
        self._fail_response_if_ended()
        self._wake_all()
        if self._sink is not None and self._connection_error is not None:
            self._sink.stream_failed(self._connection_error)

    def _on_window_open(self) -> None:
        _wake(self._write_waiter)
        if self._sink is not None:
            self._sink.stream_writable()

    # --- internals -----------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._reset is not None:
            raise self._reset
        if self._connection_error is not None:
            raise self._connection_error
        if self._local_ended:
            raise HboneError("the stream was already half-closed (write_eof) by this side")

    def _discard_buffered(self) -> None:
        if self._buffered:
            self._session.acknowledge(self.stream_id, self._buffered)
        self._chunks.clear()
        self._buffered = 0

    def _fail_response_if_ended(self) -> None:
        if self._response is None or self._response.done():
            return
        if self._reset is not None:
            self._response.set_exception(self._reset)
        elif self._connection_error is not None:
            self._response.set_exception(self._connection_error)
        elif self._remote_ended:
            self._response.set_exception(
                HboneConnectionError("the peer ended the stream without a response")
            )
        else:
            return
        self._response.exception()  # mark retrieved: the waiter may have been cancelled

    def _wake_all(self) -> None:
        _wake(self._read_waiter)
        _wake(self._write_waiter)

    async def _wait_readable(self) -> None:
        if self._read_waiter is not None:
            raise RuntimeError("another task is already reading from this stream")
        self._read_waiter = self._loop.create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    async def _wait_writable(self) -> None:
        if self._write_waiter is not None:
            raise RuntimeError("another task is already writing to this stream")
        self._write_waiter = self._loop.create_future()
        try:
            await self._write_waiter
        finally:
            self._write_waiter = None

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<HboneStream id={self.stream_id} {state} buffered={self._buffered}>"


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
