"""Fixtures that run real control-plane processes on loopback and the real `meshway` CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshway.controlplane.launcher import ControlPlaneProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "mesh.yaml"


class Cli:
    """Runs `python -m meshway ...` against one control plane."""

    def __init__(self, cp: ControlPlaneProcess) -> None:
        self.cp = cp

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshway", *args],
            env=self.cp.env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self(*args, stdin=stdin)
        assert result.returncode == 0, f"meshway {' '.join(args)}: {result.stderr}"
        return result.stdout


@pytest.fixture
def controlplane(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(tmp_path / "state", log_path=tmp_path / "controlplane.log")
    cp.start()
    try:
        yield cp
    finally:
        code = cp.stop()
        assert code == 0, f"control plane exited with {code}:\n{cp.log_tail()}"


@pytest.fixture
def cli(controlplane: ControlPlaneProcess) -> Cli:
    return Cli(controlplane)
