"""Prometheus metrics on an injected registry (never the global one).

This module holds what every package shares: the :class:`Registry`, the conventions, and
:class:`Metrics` with the build info, the process collector and the fast path's request
counters (:meth:`Metrics.request_done`, on the loop collectors of :mod:`proxy.collectors`).
Every package declares its own group against the same registry in its ``metrics`` module
(:class:`proxy.auth.metrics.AuthMetrics`, :class:`proxy.cache.metrics.CacheMetrics`,
:class:`proxy.pipeline.metrics.PipelineMetrics`, :class:`proxy.shared.metrics.SharedMetrics`,
:class:`proxy.edge.metrics.EdgeMetrics`, ...): :class:`proxy.edge.metrics.PackageMetrics`
makes them all once and each constructor is handed its own. Conventions: the
``kounta_proxy_`` prefix, base units (seconds, bytes), counters declared without ``_total``
(prometheus-client adds it), histograms on :data:`BUCKETS`. Labels hold only bounded,
non-secret values: route templates (:func:`proxy.routes.template`), account names from the
configuration, status codes, fixed enumerations. Never ids, raw paths, caller keys or tokens.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Info, ProcessCollector
from prometheus_client.core import (
    Metric,
)

from proxy import __version__, eventloop
from proxy.collectors import LoopCounter, LoopHistogram

# Memoised request label children at most (label sets are bounded; this bounds the memo).
REQUEST_CHILDREN_MAX = 10_000
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


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
    """The registry, the build info and the request counters that the fast path
    (:mod:`proxy.edge.fast`) and the access middleware
    (:func:`proxy.edge.middlewares.access_middleware`) record through :meth:`request_done`."""

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

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Bounded like the series themselves: label values are templates and enums.
        self._request_children: dict[tuple[str, str, int, str, str, str], tuple[Any, Any, Any]] = {}
        # The process's own RSS, open file descriptors, CPU time (process_*), Linux only.
        ProcessCollector(registry=registry)
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
        self.caller_requests = LoopCounter(
            "kounta_proxy_caller_requests",
            "Answered requests by caller name (from [callers.NAME], or anonymous), account and "
            "status class.",
            ["caller", "account", "status_class"],
            registry=registry,
        )
