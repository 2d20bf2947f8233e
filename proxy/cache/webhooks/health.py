"""Whether an account's webhook feed is trusted, and what deliveries said lately.

:func:`decide` is the pure decision (table-tested): a feed is healthy while webhooks are
enabled and no missed change was seen within ``webhooks.distrust_for``. :class:`Feeds`
holds each account's state in this process: when it is distrusted until (set here by the
verifier, or read from Redis where another replica set it), and the changes deliveries
announced lately (the verifier asks whether a change Kounta reports was announced).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from proxy.cache.invalidation import Change
from proxy.messages import ProxyRequest

Reason = Literal["ok", "disabled", "missed", "unregistered"]
# Changes remembered per account for the verifier's question (newest last).
RECENT_CHANGES = 1024
# Webhook-fresh reads remembered per account for the verifier to pick from.
RECENT_READS = 64


@dataclass(frozen=True, slots=True)
class FeedState:
    enabled: bool = True
    distrusted_until: float = 0.0  # wall clock; 0: never distrusted
    # What the last registration check found: None not checked (yet, or no address).
    registered: bool | None = None


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    reason: Reason


def decide(state: FeedState, now: float) -> Health:
    if not state.enabled:
        return Health(False, "disabled")
    if state.registered is False:
        return Health(False, "unregistered")
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
    # cache key -> the request of a recent webhook-fresh hit, oldest first.
    reads: OrderedDict[str, ProxyRequest] = field(default_factory=OrderedDict)


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

    def health_value(self, account: str) -> float:
        """1.0 while healthy, else 0.0 (the gauge's value)."""
        return 1.0 if self.healthy(account) else 0.0

    def trusted_since(self, account: str) -> float:
        """When the account's feed was last trusted again (wall time; 0: never distrusted):
        an entry stored before then may hold a change a lost delivery never announced."""
        feed = self.feeds.get(account)
        return 0.0 if feed is None else feed.state.distrusted_until

    def read(self, account: str, key: str, request: ProxyRequest) -> None:
        """A webhook-fresh entry answered ``request``: the verifier may pick it."""
        feed = self.feeds.get(account)
        if feed is None:
            return
        feed.reads[key] = request
        feed.reads.move_to_end(key)
        while len(feed.reads) > RECENT_READS:
            feed.reads.popitem(last=False)

    def recent(self, account: str) -> list[ProxyRequest]:
        """The recent webhook-fresh reads, newest first (left on the list)."""
        feed = self.feeds.get(account)
        return [] if feed is None else list(reversed(feed.reads.values()))

    def pick(self, account: str) -> tuple[str, ProxyRequest] | None:
        """The most recent webhook-fresh read not yet verified (taken off the list)."""
        feed = self.feeds.get(account)
        if feed is None or not feed.reads:
            return None
        return feed.reads.popitem(last=True)

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

    def distrusted_for(self, account: str, seconds: float) -> None:
        """Another replica distrusts the feed for ``seconds`` more (read from Redis)."""
        feed = self.feeds.get(account)
        if feed is not None and seconds > 0:
            until = max(feed.state.distrusted_until, self.now() + seconds)
            feed.state = replace(feed.state, distrusted_until=until)

    def registered(self, account: str, found: bool) -> bool:
        """The registration check's finding; True if it changes the state."""
        feed = self.feeds.get(account)
        if feed is None or feed.state.registered is found:
            return False
        feed.state = replace(feed.state, registered=found)
        return True

    def distrust(self, account: str, seconds: float) -> bool:
        """Distrust the feed for ``seconds`` from now; True if it was healthy before."""
        feed = self.feeds.get(account)
        if feed is None:
            return False
        was = decide(feed.state, self.now()).healthy
        until = max(feed.state.distrusted_until, self.now() + seconds)
        feed.state = replace(feed.state, distrusted_until=until)
        return was
