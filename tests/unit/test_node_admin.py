"""The node proxy's small HTTP responder: routes, readiness, and bad requests."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from meshway.node.admin import ADMIN_PORT, METRICS_PORT, READINESS_PORT, NodeAdmin
from meshway.telemetry.metrics import NodeMetrics

pytestmark = pytest.mark.unit


class Proxy:
    """Just what NodeAdmin reads from a NodeProxy."""

    def __init__(self) -> None:
        self.metrics = NodeMetrics()
        self.ready = asyncio.Event()
        self.refreshed = 0

    def refresh_gauges(self) -> None:
        self.refreshed += 1

    def dump(self) -> dict[str, Any]:
        return {"node": "n1", "connections": [{"id": 1}]}


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def ask(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_routes_readiness_and_errors() -> None:
    proxy = Proxy()
    admin = NodeAdmin(proxy)  # type: ignore[arg-type]
    sockets = {p: listener() for p in (ADMIN_PORT, METRICS_PORT, READINESS_PORT)}
    ports = {p: s.getsockname()[1] for p, s in sockets.items()}
    await admin.start(sockets)
    try:
        get = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"
        ready = await ask(ports[READINESS_PORT], get % b"/healthz/ready")
        assert ready.startswith(b"HTTP/1.1 503")
        proxy.ready.set()
        assert (await ask(ports[READINESS_PORT], get % b"/healthz/ready")).endswith(b"ready\n")
        metrics = await ask(ports[METRICS_PORT], get % b"/metrics")
        assert b"istio_tcp_connections_opened_total" in metrics or b"process_" in metrics
        assert proxy.refreshed == 1
        dump = await ask(ports[ADMIN_PORT], get % b"/config_dump?x=1")
        assert b'"node": "n1"' in dump
        assert (await ask(ports[ADMIN_PORT], get % b"/nope")).startswith(b"HTTP/1.1 404")
        assert (await ask(ports[ADMIN_PORT], b"POST /config_dump HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 405"
        )
        assert (await ask(ports[ADMIN_PORT], b"\x16\x03\x01garbage\r\n\r\n")).startswith(
            b"HTTP/1.1 400"
        )
        # A client that sends half a request and goes away does not hurt the next one.
        _, writer = await asyncio.open_connection("127.0.0.1", ports[ADMIN_PORT])
        writer.write(b"GET /conn")
        writer.close()
        assert b'"id": 1' in await ask(ports[ADMIN_PORT], get % b"/connections")
    finally:
        await admin.stop()
