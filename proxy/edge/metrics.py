"""The edge package's metrics, declared against the injected registry (prometheus client's
``registry=`` idiom): requests in flight, the listener's connections, callers refused or on a
retired key, pages gathered, and the running configuration (reloads, when loaded, its hash).

:class:`PackageMetrics` is every package's group on the one registry, made once by
:func:`proxy.edge.app.create_app` (or :func:`proxy.edge.services.build`) beside the central
:class:`~proxy.metrics.Metrics`; each part's constructor is handed its own group only.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from proxy.auth.metrics import AuthMetrics
from proxy.cache.metrics import CacheMetrics
from proxy.cache.webhooks.metrics import WebhookMetrics
from proxy.collectors import LoopGauge
from proxy.pipeline.metrics import PipelineMetrics
from proxy.shared.metrics import SharedMetrics

# Why the listener closed a connection itself (proxy.listener.Limits).
CONNECTION_DROP_REASONS = (
    *("header_timeout", "max_connections", "keepalive_evicted", "body_timeout"),
    "send_timeout",
)


class EdgeMetrics:
    """Recorded by :mod:`proxy.edge` (middlewares, app's listener limits, callers, paging,
    answer) and by :mod:`proxy.ops.reload`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Changed twice per request that waits (the fast path's joiners too): no lock.
        self.in_flight = LoopGauge(
            "kounta_proxy_requests_in_flight",
            "Requests being answered now.",
            registry=registry,
        )
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
        self.paging_pages = Counter(
            "kounta_proxy_paging_pages",
            "Pages gathered for X-Proxy-All-Pages requests.",
            registry=registry,
        )
        self.caller_rejections = Counter(
            "kounta_proxy_caller_rejections",
            "Inbound requests refused for a missing or unknown caller key.",
            ["reason"],
            registry=registry,
        )
        self.caller_retired_keys = Counter(
            "kounta_proxy_caller_retired_key_requests",
            "Requests identified by a caller's previous key, still accepted for "
            "inbound.key_overlap seconds after a reload changed it (0 again: all switched).",
            ["caller"],
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

    def config_applied(self, data: object, now: float | None = None) -> None:
        """The running configuration changed (start, or a reload that applied): its hash,
        when."""
        self.config_info.info({"hash": config_hash(data)})
        self.config_loaded.set(time.time() if now is None else now)


def config_hash(data: object) -> str:
    """The first 16 hex digits of a sha256 over ``data`` (the masked effective settings) as
    canonical JSON. Secrets are masked, never hashed: a hash in a metric must not let anyone
    test a guessed key (their ``*_file`` source still counts)."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PackageMetrics:
    """Every package's metrics group, all on one registry."""

    edge: EdgeMetrics
    pipeline: PipelineMetrics
    shared: SharedMetrics
    cache: CacheMetrics
    webhooks: WebhookMetrics
    auth: AuthMetrics

    @classmethod
    def on(cls, registry: CollectorRegistry) -> PackageMetrics:
        return cls(
            edge=EdgeMetrics(registry),
            pipeline=PipelineMetrics(registry),
            shared=SharedMetrics(registry),
            cache=CacheMetrics(registry),
            webhooks=WebhookMetrics(registry),
            auth=AuthMetrics(registry),
        )

    def groups(self) -> Iterator[object]:
        yield from (self.edge, self.pipeline, self.shared, self.cache, self.webhooks, self.auth)
