"""Process entry of `meshway node run`: the proxy, its admin ports, and a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshway.node.admin import ADMIN_PORT, METRICS_PORT, READINESS_PORT, NodeAdmin
from meshway.node.inpod import PodNetns, listen_in
from meshway.node.proxy import NodeConfig, NodeProxy

log = logging.getLogger(__name__)


async def _admin_sockets(listen_netns: Path | None) -> dict[int, socket.socket]:
    hosts = {ADMIN_PORT: "127.0.0.1", METRICS_PORT: "0.0.0.0", READINESS_PORT: "0.0.0.0"}
    netns = PodNetns(listen_netns) if listen_netns is not None else None
    try:
        return {port: await listen_in(netns, host, port) for port, host in hosts.items()}
    finally:
        if netns is not None:
            netns.close()


async def run_until_signalled(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` until it ends (its error is raised) or SIGINT/SIGTERM arrives (it is
    cancelled); the caller cleans up afterwards. The proxies' processes end this way."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(main)
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
    log.info("node proxy for %s starting (xDS %s)", config.node, config.xds_address)
    try:
        await run_until_signalled(proxy.run())
    finally:
        await proxy.close()
        await admin.stop()
        log.info("node proxy for %s stopped; pods stay captured (fail closed)", config.node)
