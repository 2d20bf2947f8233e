"""Time, injectable so tests need no real waiting: the monotonic :class:`Clock` of the
budget and retries, the :data:`WallClock` of the cache and tokens, and jittered backoff."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Protocol

# Epoch seconds now (``time.time``): HTTP dates, token expiry, cache ages.
WallClock = Callable[[], float]


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds, on the same scale as ``ProxyRequest.deadline``."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock. ``time.monotonic`` is what asyncio's default loop uses for ``time()``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


def backoff(
    attempt: int, initial: float, cap: float, rng: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with jitter: a random pause in [half, all] of
    ``initial * 2 ** (attempt - 1)``, capped at ``cap``."""
    ceiling = min(cap, initial * 2.0 ** max(0, attempt - 1))
    return float(ceiling * (0.5 + rng() / 2))
