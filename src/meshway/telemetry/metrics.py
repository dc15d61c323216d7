"""One metrics registry per process role, with the metric names in one place."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector


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


class WaypointMetrics:
    """The waypoint's registry: Istio's request metrics (BRIEF §4) plus the proxy's own.

    The label sets are few (one per source, destination, code and flags), so each request's
    children are looked up in a small dict instead of going through `labels()` every time.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("istio_requests", "Requests served.", HTTP_LABELS, registry=r)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration, from the request's first byte to the response's last.",
            HTTP_LABELS,
            buckets=_DURATION_BUCKETS_MS,
            registry=r,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "Request body sizes.",
            HTTP_LABELS,
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response body sizes.",
            HTTP_LABELS,
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.tunnels = Counter(
            "meshway_waypoint_tunnels",
            "HBONE tunnels accepted or refused, by outcome and detected protocol.",
            ["outcome", "protocol"],
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
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}

    def observe(
        self, labels: tuple[str, ...], duration_ms: float, request_size: int, response_size: int
    ) -> None:
        """Count one finished request; `labels` in HTTP_LABELS order."""
        children = self._children.get(labels)
        if children is None:
            children = (
                self.requests.labels(*labels),
                self.duration.labels(*labels),
                self.request_bytes.labels(*labels),
                self.response_bytes.labels(*labels),
            )
            if len(self._children) < 10_000:  # bounded, whatever the label cardinality
                self._children[labels] = children
        children[0].inc()
        children[1].observe(duration_ms)
        children[2].observe(request_size)
        children[3].observe(response_size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
