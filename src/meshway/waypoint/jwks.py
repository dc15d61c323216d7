"""JWK sets named by a `jwksUri`, loaded in the background and refreshed.

A `jwksUri` is `http(s)://...` (fetched from inside the mesh: the waypoint opens its sockets in
its pod's network namespace, so it reaches pod IPs and Service VIPs; `<svc>.<ns>.svc.<domain>`
names are resolved from the waypoint's own xDS state, other names by the host's resolver) or
`file:///path` (a file on the waypoint's host); a rule with only an `issuer` finds its set by
OpenID discovery (`<issuer>/.well-known/openid-configuration`, then its `jwks_uri`). Each set
is loaded when a rule first names it and then every REFRESH_INTERVAL (istiod's default
refresh of JWKS); a failed load is retried sooner, and keeps the last good keys. Requests never
wait for a load, except a request whose token needs a set that has not finished loading the
first time (at most the rule's `timeout`); with no keys at all, such tokens get 401 `Jwks
remote fetch is failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from meshway.policy.requestauth import JwksError, JwtKey, parse_jwks

log = logging.getLogger(__name__)

REFRESH_INTERVAL = 20 * 60.0  # istiod's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL default
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
MAX_JWKS_BYTES = 1024 * 1024

Address = tuple[str, int]
Resolve = Callable[[str, int], Address | None]
Dial = Callable[[Address], Awaitable[socket.socket]]
Fetch = Callable[[str, float], Awaitable[bytes]]


class JwksFetchError(Exception):
    pass


async def _plain_dial(address: Address) -> socket.socket:
    sock = socket.socket(
        socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM
    )
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def mesh_network_backend(resolve: Resolve, dial: Dial) -> Any:
    """httpcore's connections, but with our name resolution and our sockets (opened in the
    waypoint's pod network namespace). httpcore and anyio are imported here, on the first
    fetch: a waypoint without a remote JWK set does not carry them (about 4 MiB)."""
    import anyio
    import httpcore
    from httpcore._backends.anyio import AnyIOStream  # what httpcore's own backend returns

    class MeshNetworkBackend(httpcore.AnyIOBackend):
        async def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> httpcore.AsyncNetworkStream:
            try:
                async with asyncio.timeout(timeout):
                    address = resolve(host, port)
                    if address is None:
                        infos = await asyncio.get_running_loop().getaddrinfo(
                            host, port, type=socket.SOCK_STREAM
                        )
                        if not infos:
                            raise httpcore.ConnectError(f"cannot resolve {host}")
                        address = (str(infos[0][4][0]), port)
                    sock = await dial(address)
            except TimeoutError as exc:
                raise httpcore.ConnectTimeout(f"connecting to {host}:{port}") from exc
            except OSError as exc:
                raise httpcore.ConnectError(f"{host}:{port}: {exc}") from exc
            stream = await anyio.abc.SocketStream.from_socket(sock)
            return AnyIOStream(stream)

    return MeshNetworkBackend()


class JwksFetcher:
    """Reads a `jwksUri`: HTTP(S) GET through `MeshNetworkBackend`, or a file."""

    def __init__(
        self,
        resolve: Resolve | None = None,
        dial: Dial | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._resolve: Resolve = resolve or (lambda host, port: None)
        self._dial: Dial = dial or _plain_dial
        self._backend: Any = None  # on the first HTTP(S) fetch
        # HTTPS issuers are checked against the host's CA bundle (loaded on first use).
        self._ssl = ssl_context

    async def __call__(self, uri: str, timeout: float) -> bytes:
        url = urlparse(uri)
        if url.scheme == "file":
            try:
                data = await asyncio.to_thread(Path(url.path).read_bytes)  # a slow disk waits aside
            except OSError as exc:
                raise JwksFetchError(f"{uri}: {exc.strerror or exc}") from exc
            return data
        import httpcore

        if self._backend is None:
            self._backend = mesh_network_backend(self._resolve, self._dial)
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        errors = (
            httpcore.NetworkError,
            httpcore.TimeoutException,
            httpcore.ProtocolError,
            httpcore.UnsupportedProtocol,
            ssl.SSLError,
            OSError,
        )
        try:
            async with (
                asyncio.timeout(timeout),
                httpcore.AsyncConnectionPool(
                    ssl_context=self._ssl, network_backend=self._backend, retries=0
                ) as pool,
                pool.stream("GET", uri, headers={"accept": "application/json"}) as response,
            ):
                if response.status != 200:
                    raise JwksFetchError(f"{uri}: HTTP {response.status}")
                body = bytearray()
                async for chunk in response.aiter_stream():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksFetchError(f"{uri}: larger than {MAX_JWKS_BYTES} bytes")
                return bytes(body)
        except TimeoutError as exc:
            raise JwksFetchError(f"{uri}: no answer within {timeout:g} s") from exc
        except errors as exc:
            raise JwksFetchError(f"{uri}: {type(exc).__name__}: {exc}") from exc


class RemoteJwks:
    """One `jwksUri`'s keys: loaded by a task of its own, refreshed, last good keys kept."""

    def __init__(
        self,
        uri: str,
        timeout: float,
        fetch: Fetch,
        refresh: float = REFRESH_INTERVAL,
        retry: float = RETRY_FIRST,
        discovery: bool = False,
    ) -> None:
        self.uri = uri
        self.discovery = discovery
        self.timeout = timeout
        self.keys: tuple[JwtKey, ...] | None = None
        self.error: str | None = None
        self.loads = 0  # successful loads
        self._fetch = fetch
        self._refresh = refresh
        self._retry = retry
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: started on first use
                self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def current(self) -> tuple[JwtKey, ...] | None:
        self.start()
        return self.keys

    async def wait(self) -> tuple[JwtKey, ...] | None:
        self.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout):
                await self._loaded.wait()
        return self.keys

    async def _read(self) -> bytes:
        if not self.discovery:
            return await self._fetch(self.uri, self.timeout)
        try:
            config = json.loads(await self._fetch(self.uri, self.timeout))
        except ValueError as exc:
            raise JwksFetchError(f"{self.uri}: not JSON") from exc
        jwks_uri = config.get("jwks_uri") if isinstance(config, dict) else None
        if not isinstance(jwks_uri, str) or urlparse(jwks_uri).scheme not in ("http", "https"):
            raise JwksFetchError(f"{self.uri}: no http(s) jwks_uri")
        return await self._fetch(jwks_uri, self.timeout)

    async def load(self) -> bool:
        """One load; True when it gave keys."""
        try:
            keys = parse_jwks(await self._read())
        except (JwksFetchError, JwksError) as exc:
            self.error = str(exc)
            log.warning(
                "JWKS %s: %s%s",
                self.uri,
                exc,
                "; keeping the last good keys" if self.keys is not None else "",
            )
            return False
        finally:
            self._loaded.set()
        self.keys, self.error = keys, None
        self.loads += 1
        return True

    async def _run(self) -> None:
        backoff = self._retry
        while True:
            if await self.load():
                backoff = self._retry
                await asyncio.sleep(self._refresh)
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX, self._refresh)


class JwksCache:
    """The remote JWK sets in use, shared by every rule that names the same URI, kept across
    configuration changes (a new snapshot does not fetch again)."""

    def __init__(self, fetch: Fetch, refresh: float = REFRESH_INTERVAL) -> None:
        self._fetch = fetch
        self._refresh = refresh
        self._sets: dict[tuple[str, float, bool], RemoteJwks] = {}
        self._used: set[tuple[str, float, bool]] = set()

    def source(self, uri: str, timeout: float, discovery: bool = False) -> RemoteJwks:
        key = (uri, timeout, discovery)
        self._used.add(key)
        found = self._sets.get(key)
        if found is None:
            found = RemoteJwks(uri, timeout, self._fetch, self._refresh, discovery=discovery)
            self._sets[key] = found
            found.start()
        return found

    def begin(self) -> None:
        """A new snapshot is being compiled: what it does not name again is dropped at `end`."""
        self._used = set()

    def end(self) -> None:
        for key in [k for k in self._sets if k not in self._used]:
            self._sets.pop(key).close()

    def dump(self) -> dict[str, Any]:
        return {
            uri: {"keys": len(s.keys or ()), "loads": s.loads, "error": s.error}
            for (uri, _, _), s in self._sets.items()
        }

    def close(self) -> None:
        for found in self._sets.values():
            found.close()
        self._sets.clear()


def mesh_resolver(services: Callable[[], Any], cluster_domain: str) -> Resolve:
    """Resolves `<name>.<ns>.svc.<domain>` to the Service's VIP from the proxy's xDS state
    (`services()` gives `ProxyState.services`); IP literals as they are; others: None."""
    suffix = f".svc.{cluster_domain}"

    def resolve(host: str, port: int) -> Address | None:
        with contextlib.suppress(ValueError):
            return (str(ipaddress.ip_address(host.strip("[]"))), port)
        if not host.endswith(suffix):
            return None
        namespace = host[: -len(suffix)].rpartition(".")[2]
        svc = services().get(f"{namespace}/{host}")
        if svc is None or not svc.addresses:
            return None
        return (str(ipaddress.ip_address(svc.addresses[0].address)), port)

    return resolve
