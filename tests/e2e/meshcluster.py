"""A local-runtime cluster driven through the real `meshway` CLI, for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meshway.controlplane.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]

# A TCP echo server on port 9000, standard library only: the pods' plain-TCP application.
ECHO_SERVER = """\
import socketserver
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 9000), Echo).serve_forever()
"""


class Cluster:
    def __init__(self, name: str, state: Path) -> None:
        self.name = name
        # The CLI finds this cluster through its state directory, never an outside server.
        ignored = ("MESHWAY_SERVER", "MESHWAY_TOKEN")
        self.env = {k: v for k, v in os.environ.items() if k not in ignored}
        self.env["MESHWAY_STATE_DIR"] = str(state)
        self.state = state

    def meshway(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "meshway", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        if check:
            assert proc.returncode == 0, f"meshway {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def exec(self, pod: str, *cmd: str, check: bool = True) -> str:
        return self.meshway("exec", pod, "--", *cmd, check=check).stdout

    def curl(self, pod: str, url: str) -> str:
        """HTTP status and peer address as seen by curl inside `pod`."""
        return self.exec(
            pod, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{remote_ip}",
            "--max-time", "5", url, check=False,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.meshway("cluster", "status", "-o", "json").stdout)
        return data

    def wait(self, predicate: Any, seconds: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            state = self.status()
            if predicate(state):
                return state
            assert time.monotonic() < deadline, f"condition not met: {json.dumps(state)[:1500]}"
            time.sleep(0.2)

    @property
    def directory(self) -> Path:
        return self.state / "clusters" / self.name

    def node_log(self, node: str) -> str:
        return (self.directory / "logs" / f"node.{node}.log").read_text(errors="replace")

    def connection_logs(self, node: str) -> list[dict[str, Any]]:
        marker = "meshway.connections: "
        return [
            json.loads(line.split(marker, 1)[1])
            for line in self.node_log(node).splitlines()
            if marker in line
        ]

    def in_node(self, node: str, *cmd: str) -> str:
        return self.in_netns(f"mw.{self.name}.node.{node}", *cmd)

    def in_netns(self, netns: str, *cmd: str) -> str:
        """stdout of `cmd` run in the network namespace `netns`."""
        return subprocess.run(
            ["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, timeout=30
        ).stdout

    def apply(self, text: str) -> None:
        path = self.state / f"apply-{secrets.token_hex(4)}.yaml"
        path.write_text(text)
        self.meshway("apply", "-f", str(path))

    def delete(self, text: str) -> None:
        path = self.state / f"delete-{secrets.token_hex(4)}.yaml"
        path.write_text(text)
        self.meshway("delete", "-f", str(path), "--ignore-not-found")

    def eventually(self, check: Any, seconds: float = 15.0, interval: float = 0.2) -> Any:
        """Poll `check` until it returns something truthy; bounded in time. A check that
        fails an assertion (a command in a pod that failed while the mesh settles, say) is
        tried again; past the deadline its last failure is raised."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                result = check()
            except AssertionError:
                if time.monotonic() >= deadline:
                    raise
                result = None
            if result:
                return result
            assert time.monotonic() < deadline, f"not true after {seconds}s: {check}"
            time.sleep(interval)


@contextlib.contextmanager
def running_cluster(state: Path, manifest: str, *extra: str) -> Iterator[Cluster]:
    """`cluster up` with free ports; `cluster down` afterwards, whatever happened."""
    cluster = Cluster(f"t{secrets.token_hex(3)}", state)
    path = state / "cluster.yaml"
    path.write_text(manifest)
    try:
        cluster.meshway(
            "cluster", "up", "-f", str(path), "--name", cluster.name,
            "--grpc-port", str(free_port()), "--admin-port", str(free_port()), *extra,
        )  # fmt: skip
        yield cluster
    finally:
        cluster.meshway("cluster", "down", "--name", cluster.name, check=False)
