"""One metrics registry per process role, with the metric names in one place."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString


class ControlPlaneMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.xds_connections = Gauge(
            "meshway_xds_connected_proxies", "Proxies with an open xDS stream.", registry=r
        )
        self.xds_pushes = Counter(
            "meshway_xds_pushes", "xDS responses sent, by type.", ["type_url"], registry=r
        )
        self.xds_push_latency = Histogram(
            "meshway_xds_push_latency_seconds",
            "Time from a configuration change to its xDS response being written to a proxy.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.xds_nacks = Counter(
            "meshway_xds_nacks", "xDS responses rejected by proxies.", ["type_url"], registry=r
        )
        self.config_applies = Counter(
            "meshway_config_applies",
            "Accepted apply or delete requests.",
            ["operation"],
            registry=r,
        )
        self.config_rejections = Counter(
            "meshway_config_rejections",
            "Rejected apply or delete requests.",
            ["operation"],
            registry=r,
        )
        self.config_objects = Gauge(
            "meshway_config_objects", "Objects in the store, by kind.", ["kind"], registry=r
        )
        self.certs_issued = Counter(
            "meshway_certificates_issued", "Workload certificates signed.", registry=r
        )
        self.certs_refused = Counter(
            "meshway_certificates_refused",
            "Certificate requests refused, by reason.",
            ["reason"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


CONTROLPLANE = ControlPlaneMetrics()


TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_principal",
    "connection_security_policy",
    "response_flags",
    "request_protocol",
)


class NodeMetrics:
    """The node proxy's registry: Istio's TCP metrics (BRIEF §4) plus the proxy's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened.", TCP_LABELS, registry=r
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed.", TCP_LABELS, registry=r
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes", "Bytes sent to the destination.", TCP_LABELS, registry=r
        )
        self.received = Counter(
            "istio_tcp_received_bytes",
            "Bytes received from the destination.",
            TCP_LABELS,
            registry=r,
        )
        self.rejected = Counter(
            "meshway_node_rejected_connections",
            "Connections closed by the proxy, by reason (policy, bad input, ...).",
            ["reason"],
            registry=r,
        )
        self.enrolled = Gauge(
            "meshway_node_enrolled_pods", "Pods captured by this proxy.", registry=r
        )
        self.hbone_errors = Gauge(
            "meshway_node_hbone_rejected_connections",
            "HBONE connections and requests closed for bad input, by reason (since capture).",
            ["reason"],
            registry=r,
        )
        self.cert_expiry = Gauge(
            "meshway_node_certificate_expiry_timestamp_seconds",
            "When each local identity's certificate expires.",
            ["identity"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


HTTP_LABELS = (*TCP_LABELS[:-2], "response_code", "response_flags", "request_protocol")

# Istio's default buckets for request durations (ms) and sizes (bytes).
_DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_SIZE_BUCKETS = (1, 10, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000)


class RequestMetrics:
    """Istio's four request metrics, counted in plain Python and read by Prometheus at scrape
    time.

    prometheus-client takes a lock and walks the buckets for every observation: three
    histograms and a counter cost more than the rest of a small request's bookkeeping. Here a
    request adds to one list per label set (the event loop is the only writer, and the scrape
    runs on the same loop), and `collect` turns the lists into metric families.
    """

    _BOUNDS = (_DURATION_BUCKETS_MS, _SIZE_BUCKETS, _SIZE_BUCKETS)
    # Beyond this many label sets, new ones are folded into one "overflow" set.
    MAX_SERIES = 10_000

    def __init__(self) -> None:
        # labels -> [count, duration sum, request-size sum, response-size sum,
        #            *duration bucket counts, *request-size counts, *response-size counts]
        # (non-cumulative counts; the last bucket of each is +Inf).
        self._series: dict[tuple[str, ...], list[float]] = {}
        offsets = [4]
        for bounds in self._BOUNDS:
            offsets.append(offsets[-1] + len(bounds) + 1)
        self._width = offsets.pop()
        self._offsets = tuple(offsets)

    def observe(
        self, labels: tuple[str, ...], duration_ms: float, request_size: int, response_size: int
    ) -> None:
        row = self._series.get(labels)
        if row is None:
            if len(self._series) >= self.MAX_SERIES:
                labels = ("overflow",) * len(HTTP_LABELS)
            row = self._series.setdefault(labels, [0] * self._width)
        d, q, r = self._offsets
        row[0] += 1
        row[1] += duration_ms
        row[2] += request_size
        row[3] += response_size
        row[d + bisect_left(_DURATION_BUCKETS_MS, duration_ms)] += 1
        row[q + bisect_left(_SIZE_BUCKETS, request_size)] += 1
        row[r + bisect_left(_SIZE_BUCKETS, response_size)] += 1

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        return list(self._families(list(self._series.items())))

    def _families(
        self, series: Iterable[tuple[tuple[str, ...], list[float]]] = ()
    ) -> Iterator[Metric]:
        requests = CounterMetricFamily("istio_requests", "Requests served.", labels=HTTP_LABELS)
        histograms = [
            HistogramMetricFamily(name, doc, labels=HTTP_LABELS)
            for name, doc in (
                (
                    "istio_request_duration_milliseconds",
                    "Request duration, from the request's first byte to the response's last.",
                ),
                ("istio_request_bytes", "Request body sizes."),
                ("istio_response_bytes", "Response body sizes."),
            )
        ]
        for labels, row in series:
            requests.add_metric(labels, row[0])
            for i, family in enumerate(histograms):
                start = self._offsets[i]
                buckets = []
                total = 0.0
                bounds = (*self._BOUNDS[i], "+Inf")
                for bound, count in zip(bounds, row[start : start + len(bounds)], strict=True):
                    total += count
                    buckets.append((floatToGoString(bound), total))
                family.add_metric(labels, buckets, row[1 + i])
        yield requests
        yield from histograms


class WaypointMetrics:
    """The waypoint's registry: Istio's request metrics (BRIEF §4) plus the proxy's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.request_metrics = RequestMetrics()
        r.register(self.request_metrics)
        self.tunnels = Counter(
            "meshway_waypoint_tunnels",
            "HBONE tunnels accepted or refused, by outcome and detected protocol.",
            ["outcome", "protocol"],
            registry=r,
        )
        self.mirrors = Counter(
            "meshway_waypoint_mirrored_requests",
            "RequestMirror copies, by outcome (sent, failed, no_endpoint, body_not_copied, "
            "too_many_in_flight).",
            ["outcome"],
            registry=r,
        )
        # RateLimitPolicy (waypoint/ratelimit.py).
        self.rate_limited = Counter(
            "meshway_waypoint_rate_limited",
            "Requests answered 429 by a RateLimitPolicy, by policy, limit, target and scope.",
            ["policy", "limit", "target", "scope"],
            registry=r,
        )
        self.rate_limit_store_failures = Counter(
            "meshway_waypoint_rate_limit_store_failures",
            "Requests whose Global limits the store did not answer, by the failure mode that "
            "decided them (Open: let through, Closed: answered 503 RLSE).",
            ["failure_mode"],
            registry=r,
        )
        self.hbone_errors = Gauge(
            "meshway_waypoint_hbone_rejected_connections",
            "HBONE connections and requests closed for bad input, by reason.",
            ["reason"],
            registry=r,
        )
        self.cert_expiry = Gauge(
            "meshway_waypoint_certificate_expiry_timestamp_seconds",
            "When the waypoint's certificate expires.",
            ["identity"],
            registry=r,
        )
        # Counts one finished request; labels in HTTP_LABELS order.
        self.observe = self.request_metrics.observe

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
