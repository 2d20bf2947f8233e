"""The local backend: nothing shared, today's single process (budget bucket, token file)."""

from __future__ import annotations

from proxy.shared.metrics import SharedMetrics


class LocalBackend:
    kind = "local"
    budget = None
    tokens = None
    events = None
    cache = None

    def __init__(self, metrics: SharedMetrics) -> None:
        self.metrics = metrics

    @property
    def up(self) -> bool:
        return True

    def detail(self) -> str | None:
        return None

    @property
    def back_since(self) -> float:
        return 0.0

    async def start(self) -> None:
        self.metrics.shared_backend_up.set(1)
        self.metrics.shared_degraded.set(0)

    async def close(self) -> None:
        return None
