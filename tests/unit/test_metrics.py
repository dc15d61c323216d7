"""The waypoint's request metrics, counted in plain Python, read exactly as prometheus-client's
own Counter and Histograms would have exposed the same observations."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshway.telemetry.metrics import (
    _DURATION_BUCKETS_MS,
    _SIZE_BUCKETS,
    HTTP_LABELS,
    RequestMetrics,
    WaypointMetrics,
)

pytestmark = pytest.mark.unit

NAMES = (
    "istio_requests",
    "istio_request_duration_milliseconds",
    "istio_request_bytes",
    "istio_response_bytes",
)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        if family.name not in NAMES:
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exposition_matches_prometheus_client_for_the_same_observations() -> None:
    rng = random.Random(7)
    label_sets = [tuple(f"{name}-{i}" for name in HTTP_LABELS) for i in range(3)]
    # Values on bucket bounds, between them and beyond the last one.
    durations = [0.5, 1, 2.5, 60000, 70000, *(rng.uniform(0, 2000) for _ in range(200))]
    sizes = [0, 1, 10, 11, 10**9, *(rng.randrange(0, 2_000_000) for _ in range(200))]

    reference = CollectorRegistry()
    counter = Counter("istio_requests", "x", HTTP_LABELS, registry=reference)
    hist = [
        Histogram(name, "x", HTTP_LABELS, buckets=buckets, registry=reference)
        for name, buckets in zip(
            NAMES[1:], (_DURATION_BUCKETS_MS, _SIZE_BUCKETS, _SIZE_BUCKETS), strict=True
        )
    ]
    ours = WaypointMetrics()
    for i, duration in enumerate(durations):
        labels = label_sets[i % 3]
        request, response = sizes[i % len(sizes)], sizes[-1 - i % len(sizes)]
        ours.observe(labels, duration, request, response)
        counter.labels(*labels).inc()
        for h, value in zip(hist, (duration, request, response), strict=True):
            h.labels(*labels).observe(value)

    expected = samples(generate_latest(reference))
    got = samples(ours.exposition())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert (
        got[("istio_requests_total", tuple(sorted(zip(HTTP_LABELS, label_sets[0], strict=True))))]
        == 69
    )


def test_label_sets_beyond_the_limit_are_folded_into_one() -> None:
    metrics = RequestMetrics()
    metrics.MAX_SERIES = 2
    for i in range(5):
        metrics.observe((str(i),) * len(HTTP_LABELS), 1.0, 0, 0)
    counts = {
        s.labels["response_code"]: s.value
        for family in metrics.collect()
        if family.name == "istio_requests"
        for s in family.samples
    }
    assert counts == {"0": 1, "1": 1, "overflow": 3}
