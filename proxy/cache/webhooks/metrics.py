"""The webhooks package's metrics (:mod:`proxy.cache.webhooks`), declared against the
injected registry: one :class:`WebhookMetrics` is made with every other package's group
(:class:`proxy.edge.metrics.PackageMetrics`) and handed to the receiver and the verifier."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Applying a delivery: a local purge and one Redis round trip, milliseconds.
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


# Why a webhook delivery was answered as it was (``outcome`` label).
WEBHOOK_OUTCOMES = (
    *("applied", "duplicate", "unauthorized", "bad_signature", "malformed", "too_large"),
    *("unsupported", "unknown_account", "failed"),
)


class WebhookMetrics:
    """Deliveries from Kounta's webhooks and the feed health they give (docs/webhooks.md).
    Labels: configured account names ("" for a delivery to an unknown one), the known
    resource families plus ``other`` (and ``none`` before the body was read)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "kounta_proxy_webhook_deliveries",
            "Webhook deliveries received, by account, resource family and outcome.",
            ["account", "family", "outcome"],
            registry=registry,
        )
        self.apply_seconds = Histogram(
            "kounta_proxy_webhook_apply_seconds",
            "Time from a delivery's arrival to its invalidation applied here and handed to "
            "the shared backend (the answer to Kounta follows).",
            buckets=APPLY_BUCKETS,
            registry=registry,
        )
        self.last_delivery = Gauge(
            "kounta_proxy_webhook_last_delivery_timestamp_seconds",
            "When the account's last delivery was applied (Unix time); quiet nights are "
            "normal, so alert on missed changes, not on this.",
            ["account"],
            registry=registry,
        )
        self.feed_healthy = Gauge(
            "kounta_proxy_webhook_feed_healthy",
            "1 while the account's webhook feed is trusted (webhook rules serve fresh_for), "
            "0 while it is distrusted after a missed change (fallback_fresh_for).",
            ["account"],
            registry=registry,
        )
        self.missed = Counter(
            "kounta_proxy_webhook_missed",
            "Changes Kounta reported to the verifier that no delivery announced.",
            ["account"],
            registry=registry,
        )
        self.verifications = Counter(
            "kounta_proxy_webhook_verifications",
            "Verifier checks, by result (unchanged, changed, missed: a revalidated entry; "
            "listed, suspect: a list page fetched, a cached member disagreeing or not; "
            "skipped: no spare budget or nothing to verify).",
            ["account", "result"],
            registry=registry,
        )
        self.refetches = Counter(
            "kounta_proxy_webhook_refetches",
            "Background refetches of recently read entries a change dropped "
            "(webhooks.refetch), by outcome: fetched (Kounta asked), hit (stored again "
            "already), failed, dropped (the queue was full).",
            ["account", "outcome"],
            registry=registry,
        )
        self.registered = Gauge(
            "kounta_proxy_webhook_registered",
            "Webhooks registered at this proxy's address (webhooks.address) for the account, "
            "as the last registration check found (webhooks.check_every); 0: none, the feed "
            "is distrusted.",
            ["account"],
            registry=registry,
        )

    def start(self, account: str) -> None:
        """Series at 0 for a configured account (so increase() sees the first event)."""
        self.missed.labels(account)
        self.feed_healthy.labels(account).set(1)
        for outcome in ("applied", "unauthorized", "failed"):
            self.deliveries.labels(account, "other", outcome)
        for outcome in ("fetched", "hit", "failed", "dropped"):
            self.refetches.labels(account, outcome)
