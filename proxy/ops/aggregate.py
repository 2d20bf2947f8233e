"""Merge the workers' Prometheus expositions into one (``serve --workers N``).

prometheus-client's multiprocess mode cannot carry the proxy's own collectors (loop-local
counters and histograms, callback gauges, the scrape-time cache gauges), so the parent
scrapes every worker's text exposition and merges it here instead. Samples with the same
name and labels are combined:

- summed by default: counters, histogram buckets, ``_sum`` and ``_count``, and gauges that
  count something per process (requests in flight, open connections, queue lengths,
  ``process_*`` memory, CPU and open fds);
- the maximum for gauges that describe configuration or state every worker sees alike
  (:data:`MAX_PATTERNS`): build and Python info, limits, token expiry and state, one-hot
  state gauges, the shared backend's health, the disk cache that all workers share,
  ``process_max_fds``; summing them would report N builds or N times the limit;
- the minimum for timestamps of a start (:data:`MIN_PATTERNS`: ``process_start_time_seconds``
  and the ``*_created`` series), the earliest worker's.

The output is text exposition 0.0.4 with each family's HELP and TYPE as the workers wrote
them (the first worker's wording when versions differ).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# Sample names (fnmatch patterns) merged by the maximum: the same in every worker.
MAX_PATTERNS = (
    "*_info",
    "*_limit_per_minute",
    "kounta_proxy_token_refresh_leeway_seconds",
    "kounta_proxy_token_expiry_timestamp_seconds",
    "kounta_proxy_token_state",
    "kounta_proxy_breaker_state",
    "kounta_proxy_shared_backend_up",
    "kounta_proxy_shared_degraded",
    "kounta_proxy_budget_tokens",  # the bucket lives in the shared backend: one for all
    "kounta_proxy_budget_paused_seconds",
    "kounta_proxy_budget_effective_per_minute",  # one worker's (each worker is a replica)
    "kounta_proxy_cache_entries",  # the workers share one disk cache directory
    "kounta_proxy_cache_bytes",
    "kounta_proxy_cache_storing_disabled",
    "process_max_fds",
    "kounta_proxy_config_loaded_timestamp_seconds",  # the latest load (a sum would be no time)
)
# Sample names merged by the minimum: when something started.
MIN_PATTERNS = ("process_start_time_seconds", "*_created")

Key = tuple[str, tuple[tuple[str, str], ...]]
Combine = Callable[[float, float], float]


def combiner(sample_name: str) -> Combine:
    """How two workers' values of one sample combine (see the module docstring)."""
    if any(fnmatch.fnmatchcase(sample_name, p) for p in MIN_PATTERNS):
        return min
    if any(fnmatch.fnmatchcase(sample_name, p) for p in MAX_PATTERNS):
        return max
    return _add


def _add(a: float, b: float) -> float:
    return a + b


def parse(text: str) -> list[Metric]:
    """One worker's exposition as metric families; ``ValueError`` when it is malformed."""
    return list(text_string_to_metric_families(text))


def merge(expositions: Iterable[str]) -> bytes:
    """One text exposition (0.0.4) from several; a malformed one raises ``ValueError``."""
    return merge_families([parse(text) for text in expositions])


def merge_families(workers: Iterable[list[Metric]]) -> bytes:
    """One text exposition (0.0.4) from each worker's parsed families."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[Key, float]] = {}
    for parsed in workers:
        for family in parsed:
            known = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            merged = values.setdefault(known.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in merged:
                    merged[key] = combiner(sample.name)(merged[key], sample.value)
                else:
                    merged[key] = sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    """A collector that yields the merged families as they are."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
