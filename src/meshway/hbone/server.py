"""The accepting side of HBONE (port 15008): mTLS, HTTP/2, one handler call per CONNECT.

The server authenticates and frames; it decides nothing. Whether a tunnel is allowed and
where it goes is the handler's business (the node proxy's inbound path or a waypoint), which
gets the client's proven identity with every request.

Every failure of one connection (garbage, a bad or missing certificate, a handshake that
never finishes, an HTTP/2 violation) ends only that connection, is logged on one line and is
counted in `errors` under a short reason, so an attacker cannot disturb other tunnels and an
operator can see what is happening.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

from h2.errors import ErrorCodes

from meshway.hbone.errors import HboneError
from meshway.hbone.session import DEFAULT_MAX_CONCURRENT_STREAMS, H2Session, Header
from meshway.hbone.stream import HboneStream
from meshway.hbone.tls import TlsContextCache, WorkloadCredentials, server_context
from meshway.identity import SpiffeId

logger = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_CLOSE_TIMEOUT = 5.0
_ACCEPT_ERROR_BACKOFF = 0.1

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HboneRequest:
    """One CONNECT request: who asks (proven by mTLS), for which `ip:port`, with which headers."""

    def __init__(
        self,
        *,
        authority: str,
        target: tuple[IpAddress, int],
        headers: dict[str, str],
        peer_identity: SpiffeId,
        peer_address: tuple[str, int],
        local_identity: SpiffeId,
        stream: HboneStream,
    ) -> None:
        self.authority = authority
        self.target_ip, self.target_port = target
        self.headers = headers
        self.peer_identity = peer_identity
        self.peer_address = peer_address
        self.local_identity = local_identity
        self.stream = stream
        self.status: int | None = None

    def accept(self) -> None:
        """Answer 200: the tunnel is open and `stream` carries the bytes."""
        self._answer(200, "")

    def refuse(self, status: int, reason: str = "") -> None:
        """Answer with an error status; `reason` goes to the client as a short text body."""
        if not 400 <= status <= 599:
            raise ValueError(f"a refusal needs a 4xx or 5xx status, got {status}")
        self._answer(status, reason)

    @property
    def answered(self) -> bool:
        return self.status is not None

    def _answer(self, status: int, reason: str) -> None:
        if self.status is not None:
            raise HboneError(f"the request was already answered with {self.status}")
        self.status = status
        self.stream.send_response(status, reason)

    def __repr__(self) -> str:
        return (
            f"<HboneRequest {self.peer_identity.principal}@{self.peer_address[0]} "
            f"CONNECT {self.authority}>"
        )


RequestHandler = Callable[[HboneRequest], Awaitable[None]]


class HboneServer:
    """Serves HBONE on a listening socket it takes ownership of (and closes at the end).

    The socket is passed in because the node proxy creates it inside a pod's network
    namespace. `creds_provider` is asked for every new connection, so a rotated certificate
    is used as soon as it is installed.
    """

    def __init__(
        self,
        sock: socket.socket,
        creds_provider: Callable[[], WorkloadCredentials],
        handler: RequestHandler,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)  # kept: the socket is closed at the end
        self._creds_provider = creds_provider
        self._handler = handler
        self.handshake_timeout = handshake_timeout
        self.max_concurrent_streams = max_concurrent_streams
        self.close_timeout = close_timeout
        self.errors: collections.Counter[str] = collections.Counter()
        self.connections_accepted = 0
        self._contexts = TlsContextCache(server_context)
        self._tasks: set[asyncio.Task[None]] = set()
        self._established: dict[asyncio.Task[None], H2Session] = {}
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._serving = False

    @property
    def active_connections(self) -> int:
        return len(self._established)

    async def start(self) -> None:
        """Serve in a background task; pair with `close()` and `wait_closed()`."""
        if self._task is None:
            self._task = asyncio.create_task(self.serve(), name=f"hbone-server {self.address}")
            await asyncio.sleep(0)

    async def serve(self) -> None:
        """Accept and serve until `close()`; returns after every connection has ended."""
        if self._serving:
            raise RuntimeError("HboneServer.serve() is already running")
        self._serving = True
        self._sock.setblocking(False)
        try:
            async with asyncio.TaskGroup() as group:
                accepting = group.create_task(self._accept_loop(group))
                await self._stop.wait()
                accepting.cancel()
                await self._close_connections()
        finally:
            self._sock.close()
            self._done.set()

    async def _close_connections(self) -> None:
        """GOAWAY to established connections, give them `close_timeout`, then drop the rest."""
        for task in list(self._tasks):
            session = self._established.get(task)
            if session is None:
                task.cancel()  # handshaking, or its connection already ended: no goodbye due
            else:
                session.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.close_timeout)
            for task in pending:
                session = self._established.get(task)
                if session is not None:
                    session.abort()  # a peer that does not read would hold close() forever
                task.cancel()

    def close(self) -> None:
        """Stop accepting and close every connection (GOAWAY); handlers see their streams fail."""
        self._stop.set()

    async def wait_closed(self) -> None:
        """Wait until serving has stopped; re-raises what broke a `start()`ed server."""
        if self._task is not None:
            await asyncio.shield(self._task)
        else:
            await self._done.wait()

    async def __aenter__(self) -> HboneServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    # --- connections -----------------------------------------------------------------------

    async def _accept_loop(self, group: asyncio.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(self._sock)
            except OSError as exc:
                if self._sock.fileno() == -1:
                    return  # the socket was closed under us: nothing more to accept
                # Out of file descriptors and the like: back off instead of spinning.
                self._count("accept_failed", None, exc)
                await asyncio.sleep(_ACCEPT_ERROR_BACKOFF)
                continue
            self.connections_accepted += 1
            task = group.create_task(self._serve_connection(conn, (address[0], address[1])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        """One connection from accept to close; never raises, so no sibling is disturbed."""
        try:
            creds = self._creds_provider()
            context = self._contexts.get(creds)
        except Exception as exc:
            conn.close()
            self._count("credentials_unavailable", peer, exc)
            return
        try:
            await self._serve_session(conn, peer, creds, context)
        except Exception as exc:
            logger.exception("hbone: internal error serving %s:%s", *peer)
            self._count("internal_error", peer, repr(exc))

    async def _serve_session(
        self,
        conn: socket.socket,
        peer: tuple[str, int],
        creds: WorkloadCredentials,
        context: ssl.SSLContext,
    ) -> None:
        async with asyncio.TaskGroup() as requests:

            def on_request(stream: HboneStream, headers: list[Header]) -> None:
                try:
                    requests.create_task(self._serve_request(session, creds, peer, stream, headers))
                except RuntimeError:  # the connection is already shutting down
                    stream.abort(ErrorCodes.REFUSED_STREAM)

            session = H2Session(
                client_side=False,
                on_request=on_request,
                max_concurrent_streams=self.max_concurrent_streams,
            )
            if not await self._handshake(session, conn, context, peer):
                return
            task = asyncio.current_task()
            assert task is not None
            self._established[task] = session
            try:
                await session.wait_closed()
            finally:
                del self._established[task]
                session.close()
        if session.failure_reason is not None:
            self._count(session.failure_reason, peer, session.failure)

    async def _handshake(
        self,
        session: H2Session,
        conn: socket.socket,
        context: ssl.SSLContext,
        peer: tuple[str, int],
    ) -> bool:
        """TLS within the handshake timeout, then the identity checks of `session`."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await loop.connect_accepted_socket(
                    lambda: session,
                    conn,
                    ssl=context,
                    # Ours fires first; asyncio's would report a vaguer error.
                    ssl_handshake_timeout=self.handshake_timeout + 1.0,
                )
        except TimeoutError:
            self._count("tls_handshake_timeout", peer, f"no handshake in {self.handshake_timeout}s")
            return False
        except ssl.SSLCertVerificationError as exc:
            self._count("tls_untrusted_certificate", peer, exc)
            return False
        except ssl.SSLError as exc:
            reason = (
                "tls_no_client_certificate"
                if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
                else "tls_handshake_failed"
            )
            self._count(reason, peer, exc)
            return False
        except OSError as exc:
            self._count("tls_handshake_failed", peer, exc)
            return False
        if session.failure is not None:
            self._count(session.failure_reason or "peer_refused", peer, session.failure)
            return False
        return True

    # --- requests --------------------------------------------------------------------------

    async def _serve_request(
        self,
        session: H2Session,
        creds: WorkloadCredentials,
        peer: tuple[str, int],
        stream: HboneStream,
        raw_headers: list[Header],
    ) -> None:
        """Validate one request and run the handler; never raises into the connection's group."""
        try:
            request = self._admit(session, creds, peer, stream, raw_headers)
            if request is not None:
                await self._run_handler(request)
            await stream.close()
        except HboneError as exc:
            logger.debug("hbone: stream %d from %s:%s ended: %s", stream.stream_id, *peer, exc)
        except Exception as exc:
            logger.exception("hbone: internal error on a stream from %s:%s", *peer)
            self._count_stream("internal_error", peer, repr(exc))
        finally:
            stream.abort()  # a no-op after a clean close; covers errors and cancellation

    def _admit(
        self,
        session: H2Session,
        creds: WorkloadCredentials,
        peer: tuple[str, int],
        stream: HboneStream,
        raw_headers: list[Header],
    ) -> HboneRequest | None:
        """The request for the handler, or None after answering 405/400 ourselves."""
        method, authority, headers = _split_headers(raw_headers)
        if method != "CONNECT":
            self._count_stream("method_not_allowed", peer, f"{method} {authority}")
            stream.send_response(405, "HBONE accepts only CONNECT")
            return None
        target = parse_authority(authority)
        if target is None:
            self._count_stream("bad_authority", peer, repr(authority))
            stream.send_response(400, "the CONNECT authority must be <ip>:<port>")
            return None
        assert session.peer_identity is not None
        return HboneRequest(
            authority=authority,
            target=target,
            headers=headers,
            peer_identity=session.peer_identity,
            peer_address=peer,
            local_identity=creds.identity,
            stream=stream,
        )

    async def _run_handler(self, request: HboneRequest) -> None:
        try:
            await self._handler(request)
        except HboneError as exc:
            logger.debug("hbone: tunnel %r ended: %s", request, exc)
        except Exception as exc:
            self._count_stream("handler_error", request.peer_address, f"{request!r}: {exc!r}")
            if request.answered:
                request.stream.abort(ErrorCodes.INTERNAL_ERROR)
            else:
                request.refuse(500, "internal error")
            return
        if not request.answered and not request.stream.is_closed:
            request.refuse(503, "the handler returned without answering")

    def _count(self, reason: str, peer: tuple[str, int] | None, detail: object) -> None:
        self.errors[reason] += 1
        where = f" from {peer[0]}:{peer[1]}" if peer is not None else ""
        logger.info("hbone: closed connection%s: %s (%s)", where, reason, detail)

    def _count_stream(self, reason: str, peer: tuple[str, int], detail: str) -> None:
        self.errors[reason] += 1
        logger.info("hbone: refused request from %s:%s: %s (%s)", peer[0], peer[1], reason, detail)


def _split_headers(raw: list[Header]) -> tuple[str, str, dict[str, str]]:
    """(:method, :authority, regular headers); repeated headers are joined with ", "."""
    method = authority = ""
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw:
        name = raw_name.decode("ascii", errors="replace").lower()
        value = raw_value.decode("utf-8", errors="replace")
        if name == ":method":
            method = value
        elif name == ":authority":
            authority = value
        elif name.startswith(":"):
            continue
        elif name in headers:
            headers[name] = f"{headers[name]}, {value}"
        else:
            headers[name] = value
    return method, authority, headers


def parse_authority(authority: str) -> tuple[IpAddress, int] | None:
    """`ip:port` or `[ipv6]:port` with a literal address and a port in 1..65535, else None."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not port_text.isdigit() or len(port_text) > 5:
        return None
    port = int(port_text)
    if not 1 <= port <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if "%" in host:
            return None  # zone IDs are meaningless to the receiving node
        try:
            return ipaddress.IPv6Address(host), port
        except ValueError:
            return None
    try:
        return ipaddress.IPv4Address(host), port
    except ValueError:
        return None
