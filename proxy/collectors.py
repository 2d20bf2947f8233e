"""Collectors of our own on the injected registry: :class:`LoopCounter`,
:class:`LoopHistogram` and :class:`LoopGauge` (the request path's counters, histograms and
in-flight gauge without prometheus-client's per-child locks: every update is on the event
loop) and :class:`StoreGauges` (the disk cache's entries and bytes, read at every scrape).
"""

from __future__ import annotations

import bisect
import itertools
from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Observations:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # a bucket's le is inclusive
        self.sum += value


Child = TypeVar("Child", _Count, _Observations)


class _LoopFamily(Collector, Generic[Child]):
    """A labelled metric for the hottest path: updated on the event loop only, so plain
    floats and no lock (prometheus-client locks on every update, for threads we do not
    have), and exposed exactly like prometheus-client's own. ``labels(...)`` returns a
    child, as there."""

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._children: dict[tuple[str, ...], Child] = {}
        registry.register(self)

    def labels(self, *values: object) -> Child:
        child = self._children.get(values)  # type: ignore[arg-type]  # str labels: hit at once
        if child is None:
            key = tuple(str(v) for v in values)
            if key in self._children:
                return self._children[key]
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels {self.labelnames}, got {key}")
            child = self._children[key] = self._child()
        return child

    @abstractmethod
    def _child(self) -> Child: ...

    @abstractmethod
    def _family(self) -> Metric: ...

    def describe(self) -> list[Metric]:
        return [self._family()]


# A child of each family, for annotations (``labels(...)`` returns one).
Count = _Count
Observations = _Observations


class LoopCounter(_LoopFamily[_Count]):
    """A counter (``_total``); children have ``inc``."""

    def _child(self) -> _Count:
        return _Count()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> list[Metric]:
        family = self._family()
        for key, child in list(self._children.items()):
            family.add_metric(key, child.value)
        return [family]


class LoopHistogram(_LoopFamily[_Observations]):
    """A histogram (``_bucket``, ``_count``, ``_sum``); children have ``observe``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self._les = [repr(b) for b in self.bounds] + ["+Inf"]  # as prometheus-client writes them
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _Observations:
        return _Observations(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> list[Metric]:
        family = self._family()
        for key, child in list(self._children.items()):
            cumulative = map(float, itertools.accumulate(child.counts))
            buckets = list(zip(self._les, cumulative, strict=True))
            family.add_metric(key, buckets, sum_value=child.sum)
        return [family]


class LoopGauge(Collector):
    """An unlabelled gauge updated on the event loop only (``inc``, ``dec``): a plain
    number, read at scrape time, exposed as prometheus-client's ``Gauge``."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.value = 0.0
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation, value=self.value)]


class StoreGauges(Collector):
    """The cache's entry and byte gauges, read from the store at scrape time."""

    def __init__(self, read: Callable[[], tuple[int, int]], registry: CollectorRegistry) -> None:
        self.read = read
        registry.register(self)

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        try:
            entries, size = self.read()
        except Exception:  # a broken store must not break the scrape; its errors count elsewhere
            return []
        return list(self._families(entries, size))

    def _families(self, entries: int | None = None, size: int | None = None) -> Iterable[Metric]:
        found = GaugeMetricFamily(
            "kounta_proxy_cache_entries", "Responses stored in the disk cache (at scrape time)."
        )
        occupied = GaugeMetricFamily(
            "kounta_proxy_cache_bytes", "Bytes the disk cache occupies (at scrape time)."
        )
        if entries is not None and size is not None:
            found.add_metric([], entries)
            occupied.add_metric([], size)
        return (found, occupied)
