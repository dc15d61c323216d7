"""The node proxy's HTTP side: metrics on 15020, readiness on 15021, admin on 15000.

The admin port (config dump, live connections) listens on 127.0.0.1 only. In the local
runtime all three listen inside the node's network namespace, as they would on a real node.
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from meshway.node.proxy import NodeProxy

ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021


def _json(data: Any) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=2, default=str) + "\n", content_type="application/json"
    )


class NodeAdmin:
    def __init__(self, proxy: NodeProxy) -> None:
        self.proxy = proxy
        self._runners: list[web.AppRunner] = []

    def _metrics_app(self) -> web.Application:
        app = web.Application()

        async def metrics(request: web.Request) -> web.Response:
            self.proxy.refresh_gauges()
            return web.Response(
                body=self.proxy.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/stats/prometheus", metrics)
        return app

    def _readiness_app(self) -> web.Application:
        app = web.Application()

        async def ready(request: web.Request) -> web.Response:
            if not self.proxy.ready.is_set():
                return web.Response(status=503, text="not ready: waiting for xDS state\n")
            return web.Response(text="ready\n")

        app.router.add_get("/healthz/ready", ready)
        return app

    def _admin_app(self) -> web.Application:
        app = web.Application()

        async def config_dump(request: web.Request) -> web.Response:
            return _json(self.proxy.dump())

        async def connections(request: web.Request) -> web.Response:
            return _json(self.proxy.dump()["connections"])

        app.router.add_get("/config_dump", config_dump)
        app.router.add_get("/connections", connections)
        return app

    async def start(self, sockets: dict[int, socket.socket]) -> None:
        """Serve on listening sockets made by the caller (possibly in another namespace)."""
        apps = {
            METRICS_PORT: self._metrics_app(),
            READINESS_PORT: self._readiness_app(),
            ADMIN_PORT: self._admin_app(),
        }
        for port, app in apps.items():
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            await web.SockSite(runner, sockets[port]).start()
            self._runners.append(runner)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
