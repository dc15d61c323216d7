"""Process entry of `meshway node run`: the proxy, its admin ports, and a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshway.node.admin import ADMIN_PORT, METRICS_PORT, READINESS_PORT, NodeAdmin
from meshway.node.inpod import PodNetns
from meshway.node.proxy import NodeConfig, NodeProxy

log = logging.getLogger(__name__)


async def _admin_sockets(listen_netns: Path | None) -> dict[int, socket.socket]:
    hosts = {ADMIN_PORT: "127.0.0.1", METRICS_PORT: "0.0.0.0", READINESS_PORT: "0.0.0.0"}
    if listen_netns is None:
        sockets = {}
        for port, host in hosts.items():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sockets[port] = sock
        return sockets
    netns = PodNetns(listen_netns)
    try:
        return {port: await netns.listen(host, port) for port, host in hosts.items()}
    finally:
        netns.close()


async def run_node(
    creds: dict[str, Any],
    pod_netns: str,
    listen_netns: Path | None,
    cert_lifetime_seconds: int,
    only_pod: str | None = None,
) -> None:
    config = NodeConfig(
        node=creds["node"],
        xds_address=creds["xdsAddress"],
        token=creds["credential"],
        trust_bundle=creds["trustBundle"].encode(),
        pod_netns=lambda namespace, name: Path(pod_netns.format(namespace=namespace, name=name)),
        cert_lifetime=timedelta(seconds=cert_lifetime_seconds) if cert_lifetime_seconds else None,
        only_pod=only_pod,
    )
    proxy = NodeProxy(config)
    admin = NodeAdmin(proxy)
    await admin.start(await _admin_sockets(listen_netns))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("node proxy for %s starting (xDS %s)", config.node, config.xds_address)
    runner = asyncio.create_task(proxy.run())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            runner.result()
    finally:
        runner.cancel()
        stopper.cancel()
        with contextlib.suppress(BaseException):
            await runner
        await proxy.close()
        await admin.stop()
        log.info("node proxy for %s stopped; pods stay captured (fail closed)", config.node)
