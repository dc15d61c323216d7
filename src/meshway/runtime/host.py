"""The host commands the local runtime drives: `ip` (iproute2), `nft` (nftables) and sysctl.

Every change the runtime makes to the host goes through here, so that a failure says which
command failed and why, and so that tear-down can find what was made by its names.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")


class HostCommandError(RuntimeError):
    pass


def run(args: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    """Run a host command; on failure raise with the command and its stderr."""
    proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise HostCommandError(
            f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    return run([*prefix, *args], check=check)


def nft(script: str, netns: str | None = None) -> None:
    """Load an nftables script atomically (one transaction) in a network namespace."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    run([*prefix, "nft", "-f", "-"], stdin=script)


def nft_tables(netns: str | None = None) -> list[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    out = run([*prefix, "nft", "list", "tables"], check=False)
    return [line.split()[-1] for line in out.splitlines() if line.startswith("table")]


def sysctl(netns: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (written through /proc inside the namespace)."""
    run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"])


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_list(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def netns_add(name: str) -> None:
    if not netns_exists(name):
        ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def netns_delete(name: str) -> None:
    """Delete a namespace (its veth ends go with it) and its /etc/netns files."""
    if netns_exists(name):
        ip("netns", "delete", name, check=False)
    etc = NETNS_ETC / name
    if etc.is_dir():
        for f in etc.iterdir():
            f.unlink()
        etc.rmdir()


def netns_pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def link_name(prefix: str, key: str) -> str:
    """A stable interface name within the kernel's 15 characters."""
    return prefix + hashlib.blake2b(key.encode(), digest_size=5).hexdigest()


def write_netns_file(netns: str, name: str, content: str) -> None:
    """Write /etc/netns/<ns>/<name>, which `ip netns exec` bind-mounts over /etc/<name>.

    Written in place (not replaced) so that processes already running, which see the file
    through a bind mount of its inode, read the new content.
    """
    directory = NETNS_ETC / netns
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    with open(path, "a+") as f:
        f.seek(0)
        if f.read() == content:
            return
        f.seek(0)
        f.truncate()
        f.write(content)
