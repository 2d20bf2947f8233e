"""The ops package's metrics: the ``serve --workers N`` parent's own, on its own registry
(:mod:`proxy.ops.workers` serves them beside the workers' merged expositions)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class WorkersMetrics:
    """The ``serve --workers N`` parent's own metrics, beside the workers' merged ones: how
    many workers the last scrape reached, and which ones failed (so a gap in the merged
    counters is visible rather than read as less traffic)."""

    def __init__(self, registry: CollectorRegistry, workers: int) -> None:
        self.registry = registry
        self.up = Gauge(
            "kounta_proxy_workers_up",
            "Workers that answered the last scrape of the parent's /metrics.",
            registry=registry,
        )
        self.scrape_errors = Counter(
            "kounta_proxy_workers_scrape_errors",
            "Scrapes of a worker's metrics that failed (no answer in time, or not parsable).",
            ["worker"],
            registry=registry,
        )
        for k in range(workers):
            self.scrape_errors.labels(str(k))
