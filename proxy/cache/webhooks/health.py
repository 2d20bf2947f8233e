"""Whether an account's webhook feed is trusted, and what deliveries said lately.

:func:`decide` is the pure decision (table-tested): a feed is healthy while webhooks are
enabled and no missed change was seen within ``webhooks.distrust_for``. :class:`Feeds`
holds each account's state in this process: when it is distrusted until (set here by the
verifier, or read from Redis where another replica set it), and the changes deliveries
announced lately (the verifier asks whether a change Kounta reports was announced).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from proxy.cache.invalidation import Change

Reason = Literal["ok", "disabled", "missed"]
# Changes remembered per account for the verifier's question (newest last).
RECENT_CHANGES = 1024


@dataclass(frozen=True, slots=True)
class FeedState:
    enabled: bool = True
    distrusted_until: float = 0.0  # wall clock; 0: never distrusted


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    reason: Reason


def decide(state: FeedState, now: float) -> Health:
    if not state.enabled:
        return Health(False, "disabled")
    if now < state.distrusted_until:
        return Health(False, "missed")
    return Health(True, "ok")


@dataclass(slots=True)
class Feed:
    state: FeedState = field(default_factory=FeedState)
    last_delivery: float = 0.0
    # (wall time, change) announced by deliveries, newest last.
    recent: deque[tuple[float, Change]] = field(
        default_factory=lambda: deque(maxlen=RECENT_CHANGES)
    )


class Feeds:
    """Each account's feed in this process (on the event loop only)."""

    def __init__(
        self, accounts: tuple[str, ...], enabled: bool, now: Callable[[], float] = time.time
    ) -> None:
        self.now = now
        self.feeds = {name: Feed(FeedState(enabled=enabled)) for name in accounts}

    def healthy(self, account: str) -> bool:
        feed = self.feeds.get(account)
        return feed is not None and decide(feed.state, self.now()).healthy

    def delivered(self, account: str, change: Change) -> None:
        feed = self.feeds.get(account)
        if feed is not None:
            feed.last_delivery = self.now()
            feed.recent.append((feed.last_delivery, change))

    def announced_since(self, account: str, since: float, path: str) -> bool:
        """Whether a delivery since ``since`` (wall time) covered ``path``."""
        feed = self.feeds.get(account)
        if feed is None:
            return False
        return any(at >= since and change.covers(account, path) for at, change in feed.recent)

    def distrust(self, account: str, seconds: float) -> bool:
        """Distrust the feed for ``seconds`` from now; True if it was healthy before."""
        feed = self.feeds.get(account)
        if feed is None:
            return False
        was = decide(feed.state, self.now()).healthy
        until = max(feed.state.distrusted_until, self.now() + seconds)
        feed.state = FeedState(feed.state.enabled, until)
        return was
