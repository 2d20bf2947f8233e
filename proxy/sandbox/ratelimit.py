"""Per-client sliding-window rate limiter."""

from __future__ import annotations

from collections import deque

WINDOW_SECONDS = 60.0


class SlidingWindowLimiter:
    """Allows at most `limit` accepted requests per client in any 60 s window.

    Rejected requests are not recorded, so a client that keeps hammering is let
    back in as soon as its oldest accepted request leaves the window.
    """

    def __init__(self) -> None:
        self._hits: dict[str, deque[float]] = {}

    def allow(self, client: str, limit: int, now: float) -> bool:
        hits = self._hits.setdefault(client, deque())
        horizon = now - WINDOW_SECONDS
        while hits and hits[0] <= horizon:
            hits.popleft()
        if len(hits) >= limit:
            return False
        hits.append(now)
        return True

    def reset(self) -> None:
        self._hits.clear()
