"""The cache package's metrics, declared against the injected registry (prometheus client's
``registry=`` idiom): lookups, coalescing, stores, evictions, invalidations, the disk
store's errors, the Redis tier's operations and the invalidations between replicas.
One :class:`CacheMetrics` is made with every other package's group
(:class:`proxy.edge.metrics.PackageMetrics`) and handed to the cache's rooms; the
conventions are :mod:`proxy.metrics`'s. The webhooks' own group is
:class:`proxy.cache.webhooks.metrics.WebhookMetrics`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.collectors import LoopCounter, StoreGauges

# The label values the counters below are created with at 0 (``increase()`` counts the
# first event only from a series that exists already).
CACHE_STORE_OPS = ("read", "write", "delete", "full")


class CacheMetrics:
    """Recorded by :mod:`proxy.cache` (answers, exchange, layer, tiers, store, shared,
    broadcast)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.cache_broadcasts = Counter(
            "kounta_proxy_cache_broadcasts",
            "Cache invalidations between replicas, by result (sent, failed, received, "
            "rejected: a message that is not a change this replica can read).",
            ["result"],
            registry=registry,
        )
        self.cache_shared = LoopCounter(  # on the event loop only (a Redis hit counts one)
            "kounta_proxy_cache_shared",
            "Shared cache (Redis) operations by op and result: get (hit, miss, bad_record, "
            "error, joined: answered by a read of the same key already in flight), put (ok, "
            "invalidated, error), lock (taken, waited, alone, error, peeked: only a large "
            "entry's head read), unlock (error), delete (ok, error), note (adopted, ignored, "
            "bad_record).",
            ["op", "result"],
            registry=registry,
        )
        self.cache_lookups = LoopCounter(
            "kounta_proxy_cache_lookups",
            "Cache outcomes, one per answer, by result (the answer's X-Cache: hit, miss, "
            "revalidated, stale, bypass) and reason (e.g. fresh, not_modified, changed, cold, "
            "error, while_revalidate, no_store; for bypass, why the request or the answer is "
            "not cacheable).",
            ["result", "reason"],
            registry=registry,
        )
        self.cache_coalesced = LoopCounter(  # once per joiner: no lock
            "kounta_proxy_cache_coalesced",
            "Requests that waited for another request's fetch of the same key, by outcome "
            "(shared, gave_up).",
            ["outcome"],
            registry=registry,
        )
        self.cache_stores = LoopCounter(  # once per flight (a 304 stored): no lock
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

    def watch_store(self, read: Callable[[], tuple[int, int]]) -> None:
        """Expose the cache store's (entries, bytes), read at every scrape."""
        StoreGauges(read, self.registry)
