"""Start `meshway controlplane` as a child process and wait until it serves.

The demo, the end-to-end tests and the benchmarks all start control planes this one way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ControlPlaneProcess:
    """A control plane on loopback with its own state directory and free ports."""

    def __init__(
        self,
        state_dir: Path,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        grpc_port: int | None = None,
        admin_port: int | None = None,
        detach: bool = False,
    ) -> None:
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.grpc_port = grpc_port or free_port()
        self.admin_port = admin_port or free_port()
        self.log_path = log_path or state_dir.parent / f"{state_dir.name}-controlplane.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # Detached: its own session, so it outlives the command that started it.
        self.detach = detach

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def token(self) -> str:
        return (self.state_dir / "admin.token").read_text().strip()

    def env(self) -> dict[str, str]:
        """Environment for a `meshway` CLI talking to this control plane."""
        return {
            **os.environ,
            "MESHWAY_SERVER": self.server,
            "MESHWAY_TOKEN": self.token,
            "MESHWAY_STATE_DIR": str(self.state_dir),
        }

    def start(self, timeout: float = 30.0) -> ControlPlaneProcess:
        cmd = [
            sys.executable,
            "-m",
            "meshway",
            "controlplane",
            "--state-dir",
            str(self.state_dir),
            "--grpc-address",
            self.grpc_address,
            "--admin-address",
            f"127.0.0.1:{self.admin_port}",
            *self.extra_args,
        ]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=self.detach,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"control plane exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.server}/readyz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"control plane not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop in time; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ControlPlaneProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
