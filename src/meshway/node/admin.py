"""The node proxy's HTTP side: metrics on 15020, readiness on 15021, admin on 15000.

The admin port (config dump, live connections) listens on 127.0.0.1 only. In the local
runtime all three listen inside the node's network namespace, as they would on a real node.

A few GET endpoints answered with `Connection: close` need no web framework: this small
responder keeps a framework's ~15 MiB out of a process that runs on every node (and, in
sidecar mode, in every pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from meshway.node.proxy import NodeProxy

log = logging.getLogger(__name__)

ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021
MAX_REQUEST_HEAD = 16 * 1024
READ_TIMEOUT = 5.0

Response = tuple[int, str, bytes]
Route = Callable[[], Response]


def _json(data: object) -> Response:
    return 200, "application/json", (json.dumps(data, indent=2, default=str) + "\n").encode()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class NodeAdmin:
    def __init__(self, proxy: NodeProxy) -> None:
        self.proxy = proxy
        self._servers: list[asyncio.AbstractServer] = []
        self.routes: dict[int, dict[str, Route]] = {
            METRICS_PORT: {"/metrics": self._metrics, "/stats/prometheus": self._metrics},
            READINESS_PORT: {"/healthz/ready": self._ready},
            ADMIN_PORT: {
                "/config_dump": lambda: _json(self.proxy.dump()),
                "/connections": lambda: _json(self.proxy.dump()["connections"]),
            },
        }

    def _metrics(self) -> Response:
        self.proxy.refresh_gauges()
        return 200, CONTENT_TYPE_LATEST, self.proxy.metrics.exposition()

    def _ready(self) -> Response:
        if not self.proxy.ready.is_set():
            return 503, "text/plain", b"not ready: waiting for xDS state\n"
        return 200, "text/plain", b"ready\n"

    async def start(self, sockets: dict[int, socket.socket]) -> None:
        """Serve on listening sockets made by the caller (possibly in another namespace)."""
        for port, sock in sockets.items():
            routes = self.routes[port]
            server = await asyncio.start_server(self._handler(routes), sock=sock)
            self._servers.append(server)

    def _handler(
        self, routes: dict[str, Route]
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
                status, ctype, body = self._answer(head, routes)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                status, ctype, body = 400, "text/plain", b"bad request\n"
            except ConnectionError:
                writer.close()
                return
            header = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            with contextlib.suppress(ConnectionError):
                writer.write(header.encode() + body)
                await writer.drain()
            writer.close()

        return handle

    @staticmethod
    def _answer(head: bytes, routes: dict[str, Route]) -> Response:
        if len(head) > MAX_REQUEST_HEAD:
            return 400, "text/plain", b"request head too large\n"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "text/plain", b"bad request\n"
        if parts[0] != b"GET":
            return 405, "text/plain", b"only GET\n"
        path = parts[1].decode("latin-1").split("?", 1)[0]
        route = routes.get(path)
        if route is None:
            known = ", ".join(sorted(routes))
            return 404, "text/plain", f"unknown path {path}; try {known}\n".encode()
        return route()

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
