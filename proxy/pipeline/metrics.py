"""The pipeline package's metrics, declared against the injected registry (prometheus
client's ``registry=`` idiom): upstream exchanges, the rate budget, retries and circuit
breakers. One :class:`PipelineMetrics` is made with every other package's group
(:class:`proxy.edge.metrics.PackageMetrics`) and handed to
:class:`~proxy.pipeline.upstream.Upstream`, :class:`~proxy.pipeline.budget.Budget` and
:class:`~proxy.pipeline.retry.Retry`; the conventions are :mod:`proxy.metrics`'s
(``kounta_proxy_`` prefix, base units, :data:`~proxy.metrics.BUCKETS`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.collectors import LoopCounter, LoopHistogram
from proxy.metrics import BUCKETS

# The states of an account's circuit breaker, one-hot like the token's (``state`` label).
BREAKER_STATES = ("closed", "half_open", "open")
# The kinds of upstream failure counted by ``upstream_errors`` (created at 0 per account).
UPSTREAM_ERROR_KINDS = (
    *("timeout", "connect", "tls", "reset", "truncated", "too_large"),
    *("invalid", "busy"),
)


class PipelineMetrics:
    """Below the cache: recorded by :mod:`proxy.pipeline.upstream`, :mod:`proxy.pipeline.budget`
    and :mod:`proxy.pipeline.retry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.upstream_requests = LoopCounter(
            "kounta_proxy_upstream_requests",
            "Requests sent to the upstream, by method, route template, status and account.",
            ["method", "route", "status", "account"],
            registry=registry,
        )
        self.upstream_duration = LoopHistogram(
            "kounta_proxy_upstream_duration_seconds",
            "Time until the upstream's response headers arrived.",
            ["route"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "kounta_proxy_upstream_errors",
            "Upstream exchanges that failed, by kind (timeout, connect, tls, reset, truncated: a "
            "gzip body incomplete or corrupt, too_large: a gzip body past the caps, invalid: a "
            "status outside 100-599, busy: no free connection in the account's share) and "
            "account.",
            ["kind", "account"],
            registry=registry,
        )
        self.upstream_closed_idle = Counter(
            "kounta_proxy_upstream_closed_idle_connections",
            "Pooled upstream connections the upstream had already closed when one was about to "
            "be reused: dropped before anything was written to them, the request sent on "
            "another. Steady growth: the upstream keeps idle connections less long than "
            "upstream.keepalive_timeout.",
            registry=registry,
        )
        self.budget_limit = Gauge(
            "kounta_proxy_budget_limit_per_minute",
            "The account's configured rate: upstream requests allowed in any 60 s window.",
            ["account"],
            registry=registry,
        )
        self.budget_effective = Gauge(
            "kounta_proxy_budget_effective_per_minute",
            "Upstream requests this process may send for the account in any 60 s window now: "
            "the configured rate, or its share (rate / shared.replicas) while Redis is away.",
            ["account"],
            registry=registry,
        )
        self.budget_tokens = Gauge(
            "kounta_proxy_budget_tokens",
            "Requests an account may send to Kounta right now without waiting.",
            ["account"],
            registry=registry,
        )
        self.budget_queue = Gauge(
            "kounta_proxy_budget_queue_length",
            "Requests waiting for the account's rate budget.",
            ["account"],
            registry=registry,
        )
        self.budget_paused = Gauge(
            "kounta_proxy_budget_paused_seconds",
            "Seconds left of the pause after Kounta answered 429 (0: not paused).",
            ["account"],
            registry=registry,
        )
        self.budget_wait = LoopHistogram(
            "kounta_proxy_budget_wait_seconds",
            "Time a request waited for the rate budget before being sent, by account and "
            "budget class (interactive, standard, batch).",
            ["account", "class"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.budget_rejections = Counter(
            "kounta_proxy_budget_rejections",
            "Requests answered 429 (or stale) because the budget had no room in time, "
            "by account and reason (deadline, queue_full).",
            ["account", "reason"],
            registry=registry,
        )
        self.budget_served = LoopCounter(
            "kounta_proxy_budget_served",
            "Requests that got a token from the account's rate budget, by budget class.",
            ["account", "class"],
            registry=registry,
        )
        self.budget_refused = Counter(
            "kounta_proxy_budget_refused",
            "Requests the rate budget refused (no room in time, or the queue full), by budget "
            "class.",
            ["account", "class"],
            registry=registry,
        )
        self.budget_upstream_429 = Counter(
            "kounta_proxy_budget_upstream_429",
            "429 answers from Kounta itself (each pauses the account's budget).",
            ["account"],
            registry=registry,
        )
        self.retries = Counter(
            "kounta_proxy_retries",
            "Idempotent requests sent again, by method and reason (connect, timeout, 502, ...).",
            ["method", "reason"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "kounta_proxy_breaker_state",
            "1 for the account's current circuit breaker state (closed, half_open: probing, "
            "open: failing fast), 0 for the others.",
            ["account", "state"],
            registry=registry,
        )
        self.breaker_opened = Counter(
            "kounta_proxy_breaker_opened",
            "Times a breaker of the account (its own or one of a route's) opened from closed "
            "after consecutive failed requests (a failed probe is the same opening; one "
            "request opening both is one).",
            ["account"],
            registry=registry,
        )
        self.breaker_routes_open = Gauge(
            "kounta_proxy_breaker_routes_open",
            "Routes of the account whose own breaker is open or probing (5xx from Kounta "
            "on that route), while the account's breaker may be closed.",
            ["account"],
            registry=registry,
        )

    def account(self, account: str, per_window: int) -> None:
        """State an account's configured rate and create its error series at 0 (so that
        rate() and alerts see a zero, not nothing)."""
        self.budget_limit.labels(account).set(per_window)
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(kind, account)
