"""A seconds-long run of the control-plane scale benchmark: it must produce every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_controlplane_scale_quick(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "controlplane_scale.py"),
            "--quick",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "controlplane_scale.json").read_text())
    assert result["full_state_s"]["median"] > 0
    assert result["change_to_all_ms"]["p99"] > 0
    assert result["csr_per_s_grpc"] > 0
    assert result["rss_mb"]["peak"] > 0
    assert set(result["met"]) == {"full_state_s", "change_to_all_p99_ms", "csr_per_s", "rss_mb"}
    assert "| measure | result | target |" in (tmp_path / "controlplane_scale.md").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_dataplane_quick(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "dataplane.py"),
            "--quick",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "dataplane.json").read_text())
    scenarios = ("no-mesh", "ambient", "sidecar", "haproxy", "waypoint", "haproxy-http")
    assert set(result["summary"]) == set(scenarios)
    for scenario in scenarios:
        figures = result["summary"][scenario]
        assert figures["c1"]["rps"] > 0 and figures["c50"]["rps"] > 0, scenario
        assert figures["churn"]["connections_per_s"] > 0, scenario
        assert figures["bulk"]["gbit_per_s"] > 0, scenario
        assert figures["rate1000"]["p90_ms"] > 0 and figures["rate1000"]["achieved_rps"] > 0
    for scenario in scenarios[1:]:
        assert result["summary"][scenario]["c50"]["proxy_cpu_s_per_1000_req"] > 0, scenario
        assert result["summary"][scenario]["rate1000"]["rss_mb_per_proxy"] > 0, scenario
    waypoint = result["summary"]["waypoint"]
    assert waypoint["c50"]["waypoint_cpu_s_per_1000_req"] > 0
    assert waypoint["rate1000"]["waypoint_vcpu"] > 0 and waypoint["rate1000"]["waypoint_rss_mb"] > 0
    assert result["waypoint_node"] in ("node-1", "node-2")
    assert {
        "waypoint_rps_c50_vs_haproxy_http",
        "waypoint_vcpu_at_1000rps",
        "waypoint_rss_mb_at_1000rps",
        "waypoint_added_p50_c1_vs_haproxy_http",
        "waypoint_added_p90_at_1000rps_vs_haproxy_http",
    } <= set(result["ratios"])
    assert all(r["value"] is not None for r in result["ratios"].values())
    report = (tmp_path / "dataplane.md").read_text()
    assert "Meshway waypoint" in report and "HAProxy http sidecars" in report


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_waypoint_features_quick(tmp_path: Path) -> None:
    """The configured waypoint answers every request 200 (nothing it has configured fires:
    wrk's failures would fail the run) and both waypoints' figures are there."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "waypoint_features.py"), "--quick",
         "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "waypoint_features.json").read_text())
    for scenario in ("bare", "full"):
        assert result["summary"][scenario]["rps"] > 0
        assert result["summary"][scenario]["waypoint_cpu_s_per_1000_req"] > 0
    assert result["ratio"]["rps"] > 0
    assert "configured / bare" in (tmp_path / "waypoint_features.md").read_text()
