"""Prometheus metrics on an injected registry (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "kounta_proxy_requests",
            "Requests answered, by method, route template, status class and cache status.",
            ["method", "route", "status_class", "cache"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "kounta_proxy_request_duration_seconds",
            "Time to answer a request (to the end of the body).",
            ["route", "cache"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "kounta_proxy_requests_in_flight",
            "Requests being answered now.",
            registry=registry,
        )
        self.upstream_requests = Counter(
            "kounta_proxy_upstream_requests",
            "Requests sent to the upstream, by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "kounta_proxy_upstream_duration_seconds",
            "Time until the upstream's response headers arrived.",
            ["route"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "kounta_proxy_upstream_errors",
            "Upstream exchanges that failed without a response, by kind.",
            ["kind"],
            registry=registry,
        )
