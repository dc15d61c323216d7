"""In-pod capture: sockets and nftables rules inside a pod's network namespace.

Nothing runs in the pod. The node proxy keeps one thread per enrolled pod that has entered the
pod's network namespace (`setns`, which Python 3.11 lacks, through libc); sockets created by
that thread belong to the pod's namespace for their whole life, while the rest of the proxy
stays in its own. The capture rules, like ztunnel's in-pod rules:

- outbound TCP from the application is REDIRECTed to 15001 (original destination recovered
  with SO_ORIGINAL_DST);
- inbound TCP, except HBONE on 15008, is TPROXYed to 15006, and refused when no proxy
  listens there, so plaintext cannot go around a stopped proxy (fail closed);
- the proxy's own sockets carry mark 0x539 and are left alone; connections it makes to the
  application from the client's address (IP_TRANSPARENT) get their replies routed back to it
  through connmark 0x111 and a `local` route in table 133.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import struct
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
PROXY_MARK = 0x539
CONN_MARK = 0x111
ROUTE_TABLE = 133
CAPTURE_TABLE = "meshway_inpod"

_CLONE_NEWNET = 0x40000000
_SO_ORIGINAL_DST = 80
_IP_TRANSPARENT = 19
_libc = ctypes.CDLL(None, use_errno=True)

CAPTURE_RULES = f"""
table ip {CAPTURE_TABLE}
delete table ip {CAPTURE_TABLE}
table ip {CAPTURE_TABLE} {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    meta mark {PROXY_MARK:#x} ct mark set {CONN_MARK:#x} accept
    iifname "lo" accept
    meta l4proto tcp socket transparent 1 meta mark set {CONN_MARK:#x} accept
    ct state established,related accept
    tcp dport {HBONE_PORT} accept
    meta l4proto tcp tproxy to 127.0.0.1:{INBOUND_PLAINTEXT_PORT} \
      meta mark set {CONN_MARK:#x} accept
    meta l4proto tcp reject with tcp reset
  }}
  chain output_route {{
    type route hook output priority mangle; policy accept;
    ct mark {CONN_MARK:#x} meta mark set {CONN_MARK:#x}
  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    meta mark {PROXY_MARK:#x} accept
    oifname "lo" accept
    ip daddr 127.0.0.0/8 accept
    meta l4proto tcp redirect to :{OUTBOUND_PORT}
  }}
}}
"""


_RULE = ["fwmark", f"{CONN_MARK:#x}", "lookup", str(ROUTE_TABLE)]
_LOCAL_ROUTE = ["local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)]
T = TypeVar("T")


class NetnsError(OSError):
    pass


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going (struct sockaddr_in from SO_ORIGINAL_DST)."""
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class PodNetns:
    """A pod's network namespace, and a thread living in it to create sockets there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            message = f"cannot open network namespace {path}: {exc.strerror}"
            raise NetnsError(exc.errno, message) from exc
        self.inode = os.fstat(self._fd).st_ino
        self._thread = ThreadPoolExecutor(
            1, thread_name_prefix=f"netns-{path.name}", initializer=self._enter
        )

    def _enter(self) -> None:
        if _libc.setns(self._fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(err, f"setns({self.path}): {os.strerror(err)}")

    def enter_this_thread(self) -> None:
        """Move the calling thread into the namespace (for a thread the process does not own
        through this object, such as a library's worker); never call it from the loop's."""
        self._enter()

    def still_current(self) -> bool:
        """False once the pod's namespace was deleted or replaced by a new one."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    async def _in_netns(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def listen(
        self, host: str, port: int, *, transparent: bool = False, backlog: int = 1024
    ) -> socket.socket:
        return await self._in_netns(_listening_socket, host, port, transparent, backlog)

    async def connect(
        self,
        address: tuple[str, int],
        *,
        source: tuple[str, int] | None = None,
        timeout: float = 10.0,
    ) -> socket.socket:
        """A TCP connection made from inside the pod, marked so capture leaves it alone.

        With `source`, the socket is transparent and bound to the client's address, so that the
        application sees the real peer."""
        sock = await self._in_netns(_client_socket, source)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    async def run(self, args: list[str], stdin: str | None = None) -> str:
        """Run a command inside the namespace (a child forked from the namespace's thread)."""
        return await self._in_netns(_run, args, stdin)

    async def install_capture(self) -> None:
        await self.run(["nft", "-f", "-"], CAPTURE_RULES)
        if f"lookup {ROUTE_TABLE}" not in await self.run(["ip", "rule", "show"]):
            await self.run(["ip", "rule", "add", *_RULE])
        await self.run(["ip", "route", "replace", *_LOCAL_ROUTE])

    async def remove_capture(self) -> None:
        drop = f"table ip {CAPTURE_TABLE}\ndelete table ip {CAPTURE_TABLE}\n"
        await self.run(["nft", "-f", "-"], drop)
        await self.run(["ip", "rule", "del", *_RULE])
        await self.run(["ip", "route", "flush", "table", str(ROUTE_TABLE)])

    async def has_capture(self) -> bool:
        return CAPTURE_TABLE in await self.run(["nft", "list", "tables"])

    def close(self) -> None:
        self._thread.shutdown(wait=False)
        os.close(self._fd)


async def listen_in(netns: PodNetns | None, host: str, port: int) -> socket.socket:
    """A listening socket inside `netns`, or in this process's own namespace for None."""
    if netns is not None:
        return await netns.listen(host, port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _listening_socket(host: str, port: int, transparent: bool, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _client_socket(source: tuple[str, int] | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
            sock.bind(source)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _run(args: list[str], stdin: str | None) -> str:
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and not (args[:3] == ["ip", "rule", "del"] and proc.returncode == 2):
        raise NetnsError(errno.EIO, f"`{' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout
