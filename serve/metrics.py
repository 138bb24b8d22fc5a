"""Prometheus metrics of the server, in a registry of its own (``GET /metrics``).

- ``crossmetric_requests_total{route, status}``: answered requests;
- ``crossmetric_request_duration_seconds{route}``: time from the request's arrival to its answer;
- ``crossmetric_queue_duration_seconds``: time a request's images wait for the model;
- ``crossmetric_batch_size``: images per forward pass (above 1 when concurrent requests share a pass);
- ``crossmetric_forward_duration_seconds``: time of one forward pass;
- ``crossmetric_requests_in_flight``, ``crossmetric_index_size``, ``crossmetric_index_reloads_total``.

Routes are labelled by their template among the known ones (anything else is ``other``), so a client cannot grow
the label set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
KNOWN_ROUTES = frozenset(
    {"/", "/embed", "/search", "/info", "/health", "/metrics", "/thumbnail", "/docs", "/openapi.json"}
)


class ServerMetrics:
    """The server's metrics and the calls that record them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("crossmetric_requests", "Answered requests", ["route", "status"], registry=r)
        self.latency = Histogram(
            "crossmetric_request_duration_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Histogram(
            "crossmetric_queue_duration_seconds", "Time images wait for the model", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "crossmetric_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward = Histogram(
            "crossmetric_forward_duration_seconds", "Forward pass time", buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("crossmetric_requests_in_flight", "Requests being served", registry=r)
        self.index_size = Gauge("crossmetric_index_size", "Entries in the served index", registry=r)
        self.index_reloads = Counter("crossmetric_index_reloads", "Index reloads after a rebuild", registry=r)

    @staticmethod
    def route_label(path: str) -> str:
        return path if path in KNOWN_ROUTES else "other"

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = self.route_label(path)
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_batch(self, size: int, queue_seconds: list[float], forward_seconds: float) -> None:
        self.batch_size.observe(size)
        self.forward.observe(forward_seconds)
        for seconds in queue_seconds:
            self.queue.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
