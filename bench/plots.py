"""PNG plots of the latest benchmark results (bench/results/*.json → docs/img/*.png)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "img"
LABELS = {
    "no-mesh": "no mesh",
    "ambient": "Meshway ambient",
    "sidecar": "Meshway sidecars",
    "haproxy": "HAProxy sidecars",
    "waypoint": "Meshway waypoint",
    "haproxy-http": "HAProxy http sidecars",
}
COLORS = {
    "no-mesh": "#9e9e9e",
    "ambient": "#1f77b4",
    "sidecar": "#6baed6",
    "haproxy": "#ff7f0e",
    "waypoint": "#2ca02c",
    "haproxy-http": "#d62728",
}


def dataplane(result: dict, out: Path) -> None:
    summary = result["summary"]
    scenarios = [s for s in LABELS if s in summary]
    panels = [
        ("requests/s, 50 connections", lambda s: summary[s]["c50"]["rps"]),
        ("requests/s, 1 connection", lambda s: summary[s]["c1"]["rps"]),
        ("connections/s (new per request)", lambda s: summary[s]["churn"]["connections_per_s"]),
        ("bulk Gbit/s, one connection", lambda s: summary[s]["bulk"]["gbit_per_s"]),
        ("p90 ms at 1000 rps (lower is better)", lambda s: summary[s]["rate1000"]["p90_ms"]),
        (
            "proxy CPU s per 1000 requests (lower is better)",
            lambda s: summary[s]["c50"].get("proxy_cpu_s_per_1000_req", 0.0),
        ),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (title, value) in zip(axes.flat, panels, strict=True):
        values = [value(s) for s in scenarios]
        bars = ax.bar([LABELS[s] for s in scenarios], values, color=[COLORS[s] for s in scenarios])
        ax.bar_label(bars, fmt=lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.3g}", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(
        f"Data path, {result['rounds']} interleaved rounds of {result['seconds']} s "
        f"({result['date']}, {result['machine']['cpus']} CPUs)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    source = RESULTS / "dataplane.json"
    if not source.exists():
        print(f"no {source}: run bench/dataplane.py first", file=sys.stderr)
        return 1
    dataplane(json.loads(source.read_text()), OUT / "dataplane.png")
    print(f"wrote {OUT / 'dataplane.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
