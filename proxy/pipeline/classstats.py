"""What ``GET /budget`` says per budget class: requests waiting, served and refused, wait
percentiles over the last requests served, and each class's share of the sends in the last
window (this process's sends; with Redis, each replica shows its own)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from proxy.pipeline.queue import CLASSES

# Waits kept per class for the percentiles.
WAITS_KEPT = 1000


class ClassStats:
    def __init__(self, span: Callable[[], float]) -> None:
        self.span = span  # the window (plus margin) the shares count over
        self.count = dict.fromkeys(CLASSES, 0)
        self.refused = dict.fromkeys(CLASSES, 0)
        self.waits: dict[str, deque[float]] = {k: deque(maxlen=WAITS_KEPT) for k in CLASSES}
        self.sends: dict[str, deque[float]] = {k: deque() for k in CLASSES}

    def served(self, klass: str, waited: float, now: float) -> None:
        self.count[klass] += 1
        self.waits[klass].append(waited)
        self.sends[klass].append(now)
        self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self.span()
        for sends in self.sends.values():
            while sends and sends[0] <= horizon:
                sends.popleft()

    def status(
        self, now: float, waiting: tuple[int, int, int], weights: Mapping[str, float]
    ) -> dict[str, dict[str, Any]]:
        self._prune(now)
        sent = sum(len(s) for s in self.sends.values())
        status = {}
        for i, klass in enumerate(CLASSES):
            waits = sorted(self.waits[klass])
            status[klass] = {
                "weight": weights[klass],
                "waiting": waiting[i],
                "served": self.count[klass],
                "refused": self.refused[klass],
                "wait_p50": round(quantile(waits, 0.5), 3),
                "wait_p99": round(quantile(waits, 0.99), 3),
                "share": round(len(self.sends[klass]) / sent, 3) if sent else 0.0,
            }
        return status


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``values`` (nearest rank), 0 when there are none."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]
