"""The dialling side of HBONE: one mTLS + HTTP/2 connection that carries CONNECT tunnels."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping

from meshway.hbone.errors import (
    HboneConnectionError,
    HboneError,
    HboneRefused,
    StreamCapacityExhausted,
)
from meshway.hbone.session import DEFAULT_MAX_CONCURRENT_STREAMS, H2Session
from meshway.hbone.stream import HboneStream
from meshway.hbone.tls import IdentityMismatch, WorkloadCredentials, client_context
from meshway.identity import SpiffeId

DEFAULT_CONNECT_TIMEOUT = 10.0

# RFC 9110 token characters, lowercase only as HTTP/2 requires (RFC 9113 8.2.1).
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_CONNECTION_SPECIFIC = frozenset(
    ["connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade", "host"]
)

Dialer = Callable[[], Awaitable[socket.socket]]
"""Returns a connected TCP socket: how the node proxy dials from inside a pod's netns."""


class HboneConnection:
    """A connection to one peer's port 15008, proven to belong to the expected identity."""

    def __init__(
        self,
        session: H2Session,
        *,
        local_identity: SpiffeId,
        peer_identity: SpiffeId,
        peer_address: tuple[str, int],
        max_streams: int,
    ) -> None:
        self._session = session
        self.local_identity = local_identity
        self.peer_identity = peer_identity
        self.peer_address = peer_address
        self.max_streams = max_streams

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        creds: WorkloadCredentials,
        expected_identity: SpiffeId,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        ssl_context: ssl.SSLContext | None = None,
        dial: Dialer | None = None,
    ) -> HboneConnection:
        """Dial, handshake, check the server's SPIFFE ID and wait for its HTTP/2 SETTINGS.

        `dial`, when given, makes the TCP connection to host:port (for example from inside a
        pod's network namespace); the whole setup, dial included, must finish within
        `connect_timeout`. Raises IdentityMismatch for a server with another identity (before
        any HTTP/2 byte is sent to it) and HboneConnectionError for everything else, including
        a server that refused our certificate.
        """
        loop = asyncio.get_running_loop()
        context = ssl_context if ssl_context is not None else client_context(creds)

        def check_server(actual: SpiffeId) -> None:
            if actual != expected_identity:
                raise IdentityMismatch(expected_identity, actual)

        session = H2Session(client_side=True, check_peer=check_server)
        try:
            async with asyncio.timeout(connect_timeout):
                # Our own timeout governs; asyncio's handshake timeout must not fire first.
                handshake_timeout = connect_timeout + 1.0
                if dial is None:
                    await loop.create_connection(
                        lambda: session,
                        host,
                        port,
                        ssl=context,
                        ssl_handshake_timeout=handshake_timeout,
                    )
                else:
                    sock = await dial()
                    # The transport owns the socket from here on, also when the handshake fails.
                    await loop.create_connection(
                        lambda: session,
                        sock=sock,
                        ssl=context,
                        server_hostname=host,  # no SNI is sent for an IP literal
                        ssl_handshake_timeout=handshake_timeout,
                    )
                if session.failure is not None:
                    raise session.failure
                await session.wait_peer_settings()
        except TimeoutError:
            session.abort()
            raise HboneConnectionError(
                f"connecting to {host}:{port} timed out after {connect_timeout}s"
            ) from None
        except HboneError:
            session.abort()
            raise
        except OSError as exc:
            session.abort()
            raise HboneConnectionError(f"connecting to {host}:{port} failed: {exc}") from exc
        except BaseException:
            session.abort()
            raise
        assert session.peer_identity is not None
        return cls(
            session,
            local_identity=creds.identity,
            peer_identity=session.peer_identity,
            peer_address=(host, port),
            max_streams=max_streams,
        )

    async def open_stream(
        self, authority: str, headers: Mapping[str, str] | None = None
    ) -> HboneStream:
        """CONNECT to `authority` (`ip:port`); return the tunnel once the peer answers 200.

        The HEADERS frame is sent before the first suspension point, so a stream counts
        against `available_streams` as soon as this coroutine starts running.
        """
        if not self.is_usable:
            raise self._session.failure or HboneConnectionError("the connection is closing")
        if self.available_streams <= 0:
            raise StreamCapacityExhausted(
                f"connection to {self.peer_address[0]}:{self.peer_address[1]} already carries "
                f"{self.open_streams} streams"
            )
        if not authority or any(char in authority for char in " \t\r\n\0"):
            raise HboneError(f"invalid CONNECT authority {authority!r}")
        request = [(":method", "CONNECT"), (":authority", authority)]
        request += _checked_headers(headers or {})
        # RFC 9113 6.5.2 size: what the peer compares with its SETTINGS_MAX_HEADER_LIST_SIZE.
        size = sum(len(name) + len(value.encode()) + 32 for name, value in request)
        limit = self._session.h2.remote_settings.max_header_list_size
        if limit is not None and size > limit:
            raise HboneError(
                f"invalid CONNECT request headers: {size} bytes, the peer accepts {limit}"
            )
        stream = self._session.start_stream(request)
        try:
            status, _ = await stream.response()
        except BaseException:
            stream.abort()
            raise
        if status != 200:
            reason = stream.take_refusal_reason()
            stream.abort()
            raise HboneRefused(status, reason)
        return stream

    @property
    def peer_certificate_der(self) -> bytes | None:
        """The server's leaf certificate (DER), e.g. to log which certificate was seen."""
        transport = self._session.transport
        ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
        return None if ssl_object is None else ssl_object.getpeercert(binary_form=True)

    @property
    def open_streams(self) -> int:
        return self._session.h2.open_outbound_streams

    @property
    def available_streams(self) -> int:
        """Streams that may still be opened: our cap and the peer's MAX_CONCURRENT_STREAMS."""
        if not self.is_usable:
            return 0
        limit = min(self.max_streams, self._session.h2.remote_settings.max_concurrent_streams)
        return max(0, limit - self.open_streams)

    @property
    def is_usable(self) -> bool:
        """False once the connection is closing, failed or got GOAWAY."""
        return self._session.is_open

    @property
    def idle_since(self) -> float | None:
        """Loop time at which the last stream ended; None while streams are open."""
        return self._session.idle_since

    def close(self) -> None:
        """GOAWAY and close; streams still open fail with HboneConnectionError."""
        self._session.close()

    def abort(self) -> None:
        """Drop the connection at once, for a peer that stopped reading."""
        self._session.abort()

    async def wait_closed(self) -> None:
        await self._session.wait_closed()

    def __repr__(self) -> str:
        host, port = self.peer_address
        state = "usable" if self.is_usable else "closed"
        return (
            f"<HboneConnection {self.local_identity.principal} -> "
            f"{self.peer_identity.principal}@{host}:{port} {state} streams={self.open_streams}>"
        )


def _checked_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Lowercased headers, refused here if the peer would have to reject them.

    Forwarded values (traceparent, baggage) come from applications, and one bad header
    would otherwise make the peer tear down the shared connection with every tunnel on it.
    """
    checked = []
    for raw_name, value in headers.items():
        name = raw_name.lower()
        if not _HEADER_NAME.fullmatch(name) or name in _CONNECTION_SPECIFIC:
            raise HboneError(f"invalid CONNECT request headers: {raw_name!r} is not allowed")
        if name == "te" and value.lower() != "trailers":
            raise HboneError("invalid CONNECT request headers: TE may only be 'trailers'")
        if any(char in value for char in "\r\n\0") or value != value.strip(" \t"):
            raise HboneError(f"invalid CONNECT request headers: bad value for {name!r}")
        checked.append((name, value))
    return checked
