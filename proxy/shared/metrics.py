"""The shared package's metrics, declared against the injected registry (prometheus client's
``registry=`` idiom): whether the shared backend answers, Redis round trips and their
latency, records that failed their checks, pub/sub listeners and epochs, and how a gap in
the invalidations heard was recovered. One :class:`SharedMetrics` is made with every other
package's group (:class:`proxy.edge.metrics.PackageMetrics`) and handed to
:func:`proxy.shared.open_backend`; the conventions are :mod:`proxy.metrics`'s.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.collectors import LoopCounter, LoopHistogram

# Redis round trips: sub-millisecond on a host, a few ms across a zone, 0.5 s is the timeout.
SHARED_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class SharedMetrics:
    """Recorded by the shared backends (:mod:`proxy.shared.local`,
    :mod:`proxy.shared.redis_backend`, :mod:`proxy.shared.epochs`, :mod:`proxy.shared.log`);
    the local backend is always up."""

    def __init__(self, registry: CollectorRegistry) -> None:
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
        self.shared_call_duration = LoopHistogram(
            "kounta_proxy_shared_call_duration_seconds",
            "Time a round trip to the shared backend (Redis) took, by operation (as "
            "kounta_proxy_shared_calls_total), errors and timeouts included.",
            ["op"],
            SHARED_BUCKETS,
            registry=registry,
        )
