"""Per-client sliding-window rate limiter."""

from __future__ import annotations

from collections import Counter, deque

WINDOW_SECONDS = 60.0


class SlidingWindowLimiter:
    """Allows at most `limit` accepted requests per client in any 60 s window.

    Rejected requests are not recorded, so a client that keeps hammering is let
    back in as soon as its oldest accepted request leaves the window.
    """

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self._hits: dict[str, deque[float]] = {}
        # Requests refused with 429, per client (what tests of the shared budget count).
        self.refused: Counter[str] = Counter()

    def allow(self, client: str, limit: int, now: float) -> bool:
        hits = self._hits.setdefault(client, deque())
        horizon = now - self.window
        while hits and hits[0] <= horizon:
            hits.popleft()
        if len(hits) >= limit:
            self.refused[client] += 1
            return False
        hits.append(now)
        return True

    def reset(self) -> None:
        self._hits.clear()
        self.refused.clear()
