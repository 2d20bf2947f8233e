"""Prometheus metrics on an injected registry (never the global one).

:class:`Metrics` holds the registry's shared metrics as attributes, in blocks by feature;
a package may declare its own group against the same registry instead (the auth package:
:class:`proxy.auth.metrics.AuthMetrics`), handed to its constructors by
:func:`proxy.edge.services.build`. Conventions: the ``kounta_proxy_`` prefix, base units
(seconds, bytes), counters declared without ``_total`` (prometheus-client adds it),
histograms on :data:`BUCKETS`. Labels hold only bounded, non-secret values: route templates
(:func:`proxy.routes.template`), account names from the configuration, status
codes, fixed enumerations. Never ids, raw paths, caller keys or tokens.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import (
    Metric,
)

from proxy import __version__, eventloop
from proxy.collectors import LoopCounter, LoopHistogram, StoreGauges
from proxy.metrics_webhooks import WebhookMetrics

# The states of an account's circuit breaker, one-hot like the token's (``state`` label).
BREAKER_STATES = ("closed", "half_open", "open")
# Memoised request label children at most (label sets are bounded; this bounds the memo).
REQUEST_CHILDREN_MAX = 10_000
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The kinds of upstream failure counted by ``upstream_errors``.
# Redis round trips: sub-millisecond on a host, a few ms across a zone, 0.5 s is the timeout.
SHARED_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
UPSTREAM_ERROR_KINDS = (
    *("timeout", "connect", "tls", "reset", "truncated", "too_large"),
    *("invalid", "busy"),
)
# Why the listener closed a connection itself (proxy.listener.Limits).
CONNECTION_DROP_REASONS = (
    *("header_timeout", "max_connections", "keepalive_evicted", "body_timeout"),
    "send_timeout",
)
# The label values the counters below are created with at 0 (``increase()`` counts the
# first event only from a series that exists already).
CACHE_STORE_OPS = ("read", "write", "delete", "full")


class Registry(CollectorRegistry):
    """A registry that exposes no ``_created`` series.

    prometheus-client adds ``<name>_created`` to every counter and histogram child: one
    extra series each that no alert or dashboard reads. Its switch
    (``disable_created_metrics()``) is process-wide; this drops them for this registry only.
    """

    def collect(self) -> Iterable[Metric]:
        for metric in super().collect():
            if metric.type in ("counter", "histogram", "summary"):
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    def request_done(
        self,
        method: str,
        route: str,
        status: int,
        cache: str,
        seconds: float,
        caller: str = "-",
        account: str = "-",
    ) -> None:
        """Count one answered request; label children are looked up once per label set.

        ``caller`` and ``account`` are "-" for requests refused before the caller was known
        (they count in ``requests`` only).
        """
        key = (method, route, status // 100, cache, caller, account)
        children = self._request_children.get(key)
        if children is None:
            status_class = f"{status // 100}xx"
            children = (
                self.requests.labels(method, route, status_class, cache, account),
                self.request_duration.labels(method, route, status_class, cache),
                None
                if caller == "-"
                else self.caller_requests.labels(caller, account, status_class),
            )
            if len(self._request_children) >= REQUEST_CHILDREN_MAX:
                self._request_children.clear()
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if children[2] is not None:
            children[2].inc()

    def watch_store(self, read: Callable[[], tuple[int, int]]) -> None:
        """Expose the cache store's (entries, bytes), read at every scrape."""
        StoreGauges(read, self.registry)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Bounded like the series themselves: label values are templates and enums.
        self._request_children: dict[tuple[str, str, int, str, str, str], tuple[Any, Any, Any]] = {}
        # The process's own RSS, open file descriptors, CPU time (process_*), Linux only.
        ProcessCollector(registry=registry)
        # --- build
        self.build_info = Info(
            "kounta_proxy_build",
            "The running build: proxy version, Python and aiohttp versions, and the event loop "
            "(asyncio or uvloop).",
            registry=registry,
        )
        self.build_info.info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "aiohttp": aiohttp.__version__,
                "event_loop": eventloop.running(),
            }
        )
        # --- requests (inbound, recorded by edge.middlewares.access_middleware)
        self.requests = LoopCounter(
            "kounta_proxy_requests",
            "Requests answered, by method, route template, status class, cache status and "
            "account ('-' when refused before the caller was known).",
            ["method", "route", "status_class", "cache", "account"],
            registry=registry,
        )
        self.request_duration = LoopHistogram(
            "kounta_proxy_request_duration_seconds",
            "Time to answer a request (to the end of the body), by method, route template, "
            "status class and cache status.",
            ["method", "route", "status_class", "cache"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "kounta_proxy_requests_in_flight",
            "Requests being answered now.",
            registry=registry,
        )
        # --- connections (recorded by proxy.listener through the app's Limits)
        self.connections_open = Gauge(
            "kounta_proxy_connections_open",
            "Connections open on the proxy port (server.max_connections caps them).",
            registry=registry,
        )
        self.connections_dropped = Counter(
            "kounta_proxy_connections_dropped",
            "Connections the proxy closed to protect itself, by reason: header_timeout (no "
            "complete request head within server.header_timeout), max_connections, "
            "keepalive_evicted (an idle keep-alive connection closed to admit a new one at "
            "the cap), body_timeout (a request body slower than server.body_min_rate or "
            "later than server.body_timeout: 408), send_timeout (a caller that stopped reading "
            "a streamed answer past server.send_timeout).",
            ["reason"],
            registry=registry,
        )
        for reason in CONNECTION_DROP_REASONS:
            self.connections_dropped.labels(reason)
        # --- upstream (recorded by proxy.pipeline.upstream.Upstream)
        self.upstream_requests = Counter(
            "kounta_proxy_upstream_requests",
            "Requests sent to the upstream, by method, route template, status and account.",
            ["method", "route", "status", "account"],
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
            "Upstream exchanges that failed, by kind (timeout, connect, tls, reset, truncated: a "
            "gzip body incomplete or corrupt, too_large: a gzip body past the caps, invalid: a "
            "status outside 100-599, busy: no free connection in the account's share) and "
            "account.",
            ["kind", "account"],
            registry=registry,
        )
        # --- budget, retries and breaker (recorded by the pipeline's budget and retry layers)
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
        self.budget_wait = Histogram(
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
        self.budget_served = Counter(
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
        self.paging_pages = Counter(
            "kounta_proxy_paging_pages",
            "Pages gathered for X-Proxy-All-Pages requests.",
            registry=registry,
        )
        # --- shared state (recorded by the shared backend; the local one is always up)
        self.shared_backend_up = Gauge(
            "kounta_proxy_shared_backend_up",
            "1 while the shared-state backend answers (always 1 for backend = local).",
            registry=registry,
        )
        self.shared_degraded = Gauge(
            "kounta_proxy_shared_degraded",
            "1 while budget, tokens and cache run on this process's fallback (Redis away).",
            registry=registry,
        )
        self.cache_broadcasts = Counter(
            "kounta_proxy_cache_broadcasts",
            "Cache invalidations between replicas, by result (sent, failed, received, "
            "rejected: a message that is not a change this replica can read).",
            ["result"],
            registry=registry,
        )
        self.shared_listener_restarts = Counter(
            "kounta_proxy_shared_listener_restarts",
            "Times a pub/sub listener died (any error but a lost connection) and was started "
            "again, by topic; the replica then purges as after a lost subscription.",
            ["topic"],
            registry=registry,
        )
        self.shared_epoch_changes = Counter(
            "kounta_proxy_shared_epoch_changes",
            "Times this replica found Redis restarted or its data lost or rewound (a new "
            "epoch): the shared cache entries and this replica's own were purged.",
            registry=registry,
        )
        self.cache_gap_recoveries = Counter(
            "kounta_proxy_cache_gap_recoveries",
            "Gaps in the invalidations heard from other replicas (a lost subscription, a "
            "listener restarted, a new Redis epoch), by how this replica recovered: replayed "
            "(what it missed, read from the invalidation log) or purged (its whole store).",
            ["how"],
            registry=registry,
        )
        self.cache_shared = Counter(
            "kounta_proxy_cache_shared",
            "Shared cache (Redis) operations by op and result: get (hit, miss, bad_record, "
            "error), put (ok, invalidated, error), lock (taken, waited, alone, error), unlock "
            "(error), delete (ok, error).",
            ["op", "result"],
            registry=registry,
        )
        self.shared_calls = LoopCounter(
            "kounta_proxy_shared_calls",
            "Round trips to the shared backend (Redis), by operation (budget, pause, token_read, "
            "token_write, token_lock, token_unlock, publish, cache_get, cache_put, cache_lock, "
            "cache_poll, cache_unlock, cache_invalidate, cache_delete) and result (ok, error).",
            ["op", "result"],
            registry=registry,
        )
        self.shared_bad_records = Counter(
            "kounta_proxy_shared_bad_records",
            "Records and messages read from Redis that failed their checks (malformed, too "
            "large, MAC not verified), by kind (token, cache, message): never used.",
            ["kind"],
            registry=registry,
        )
        # --- callers (recorded by proxy.edge.callers)
        self.caller_requests = LoopCounter(
            "kounta_proxy_caller_requests",
            "Answered requests by caller name (from [callers.NAME], or anonymous), account and "
            "status class.",
            ["caller", "account", "status_class"],
            registry=registry,
        )
        self.caller_rejections = Counter(
            "kounta_proxy_caller_rejections",
            "Inbound requests refused for a missing or unknown caller key.",
            ["reason"],
            registry=registry,
        )
        # --- cache (recorded by proxy.cache: answers, exchange, tiers, store, shared, broadcast)
        self.cache_lookups = LoopCounter(
            "kounta_proxy_cache_lookups",
            "Cache outcomes, one per answer, by result (the answer's X-Cache: hit, miss, "
            "revalidated, stale, bypass) and reason (e.g. fresh, not_modified, changed, cold, "
            "error, while_revalidate, no_store; for bypass, why the request or the answer is "
            "not cacheable).",
            ["result", "reason"],
            registry=registry,
        )
        self.cache_coalesced = Counter(
            "kounta_proxy_cache_coalesced",
            "Requests that waited for another request's fetch of the same key, by outcome "
            "(shared, gave_up).",
            ["outcome"],
            registry=registry,
        )
        self.cache_stores = Counter(
            "kounta_proxy_cache_stores",
            "Responses stored, or not stored and why (stored, not_storable, too_large, "
            "truncated, disabled, invalidated).",
            ["result"],
            registry=registry,
        )
        self.cache_evictions = Counter(
            "kounta_proxy_cache_evictions",
            "Disk cache values evicted to stay under cache.max_size or an account's share of it.",
            registry=registry,
        )
        self.cache_invalidations = Counter(
            "kounta_proxy_cache_invalidations",
            "Stored entries removed after writes through the proxy.",
            registry=registry,
        )
        self.cache_store_errors = Counter(
            "kounta_proxy_cache_store_errors",
            "Disk cache operations that failed, by operation (read, write, delete, full).",
            ["op"],
            registry=registry,
        )
        for op in CACHE_STORE_OPS:
            self.cache_store_errors.labels(op)
        self.cache_storing_disabled = Gauge(
            "kounta_proxy_cache_storing_disabled",
            "1 while storing is off because the disk is full or writes keep failing, else 0.",
            registry=registry,
        )
        self.cache_body_mismatches = Counter(
            "kounta_proxy_cache_body_mismatches",
            "Stored bodies that did not match their record when read (size or CRC32): "
            "dropped and fetched again.",
            registry=registry,
        )
        # --- causes, latencies and the running configuration (operations)
        self.shared_call_duration = LoopHistogram(
            "kounta_proxy_shared_call_duration_seconds",
            "Time a round trip to the shared backend (Redis) took, by operation (as "
            "kounta_proxy_shared_calls_total), errors and timeouts included.",
            ["op"],
            SHARED_BUCKETS,
            registry=registry,
        )
        self.config_reloads = Counter(
            "kounta_proxy_config_reloads",
            "Configuration reloads (SIGHUP) by result: applied, unchanged, rejected (the file "
            "was not valid; the running configuration stays), restart_needed (applied, but "
            "some changes wait for a restart).",
            ["result"],
            registry=registry,
        )
        for result in ("applied", "unchanged", "rejected", "restart_needed"):
            self.config_reloads.labels(result)
        self.config_loaded = Gauge(
            "kounta_proxy_config_loaded_timestamp_seconds",
            "When the running configuration was loaded (Unix time): at start, then at each "
            "reload that applied.",
            registry=registry,
        )
        self.config_info = Info(
            "kounta_proxy_config",
            "The running configuration's hash (the first 16 hex digits of a sha256 over the "
            "effective settings, secrets masked): compare replicas.",
            registry=registry,
        )
        self.config_info.info({"hash": ""})  # set at start (proxy.edge.services.describe)
        self.caller_retired_keys = Counter(
            "kounta_proxy_caller_retired_key_requests",
            "Requests identified by a caller's previous key, still accepted for "
            "inbound.key_overlap seconds after a reload changed it (0 again: all switched).",
            ["caller"],
            registry=registry,
        )
        self.webhooks = WebhookMetrics(registry)


def config_hash(data: object) -> str:
    """The first 16 hex digits of a sha256 over ``data`` (the masked effective settings) as
    canonical JSON. Secrets are masked, never hashed: a hash in a metric must not let anyone
    test a guessed key (their ``*_file`` source still counts)."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_applied(metrics: Metrics, data: object, now: float | None = None) -> None:
    """The running configuration changed (start, or a reload that applied): its hash, when."""
    metrics.config_info.info({"hash": config_hash(data)})
    metrics.config_loaded.set(time.time() if now is None else now)


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
