"""Cache invalidations told to every replica (``[shared] backend = "redis"``).

Each replica keeps its own store (disk and memory tier). A write through one replica
invalidates its own entries at once (:mod:`proxy.cache.layer`); :class:`Broadcast` then
publishes the same :class:`~proxy.cache.policy.Invalidation` before the writer's answer goes
out, and every other replica applies it on arrival (milliseconds; the contract is under a
second), so no replica answers the old record as fresh after the writer's answer.

A replica that loses its subscription cannot know what it missed: when it subscribes again it
purges its whole store (``on_gap``), trading hit rate for never serving a missed write.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from proxy.cache.layer import Cache
from proxy.cache.policy import Invalidation
from proxy.logs import event
from proxy.metrics import Metrics
from proxy.shared import SharedUnavailable
from proxy.shared.base import SharedEvents

TOPIC = "cache"


@dataclass(frozen=True, slots=True)
class Purge:
    prefix: str
    account: str | None


def encode(change: Invalidation | Purge) -> bytes:
    if isinstance(change, Purge):
        body: dict[str, Any] = {"purge": change.prefix, "account": change.account}
    else:
        body = {
            "account": change.account,
            "paths": sorted(change.paths),
            "lists_of": sorted(change.lists_of),
        }
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Invalidation | Purge | None:
    """The change, or None for anything else (a foreign or damaged message)."""
    try:
        body = json.loads(data)
        if isinstance(body.get("purge"), str):
            account = body.get("account")
            return Purge(body["purge"], account if isinstance(account, str) else None)
        account, paths, lists_of = body["account"], body["paths"], body["lists_of"]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not isinstance(account, str) or not all(isinstance(p, str) for p in [*paths, *lists_of]):
        return None
    return Invalidation(account, frozenset(paths), frozenset(lists_of))


class Broadcast:
    def __init__(self, cache: Cache, events: SharedEvents, metrics: Metrics) -> None:
        self.cache = cache
        self.events = events
        self.metrics = metrics

    def start(self) -> None:
        self.cache.announce = self.announce
        self.events.listen(TOPIC, self.received, self.gap)

    async def announce_purge(self, prefix: str, account: str | None) -> None:
        await self.announce(Purge(prefix, account))

    async def announce(self, change: Invalidation | Purge) -> None:
        try:
            await self.events.publish(TOPIC, encode(change))
        except SharedUnavailable:
            # Redis is away: the others cannot hear it; they purge when they resubscribe.
            self.metrics.cache_broadcasts.labels("failed").inc()
            return
        self.metrics.cache_broadcasts.labels("sent").inc()

    def received(self, data: bytes) -> None:
        change = decode(data)
        if change is None:
            self.metrics.cache_broadcasts.labels("ignored").inc()
            return
        if isinstance(change, Purge):
            self._purge(change.prefix, change.account)
        else:
            self.cache.invalidate(change)
        self.metrics.cache_broadcasts.labels("received").inc()

    def gap(self) -> None:
        event("cache_purged_after_gap", logging.WARNING)
        self._purge("", None)
        if self.cache.shared is not None:
            # Redis is back: the writes this replica made meanwhile reach it at once.
            task = asyncio.get_running_loop().create_task(self.cache.shared.catch_up())
            self.cache.tasks.add(task)
            task.add_done_callback(self.cache.tasks.discard)

    def _purge(self, prefix: str, account: str | None) -> None:
        task = asyncio.get_running_loop().create_task(self.cache.store.purge(prefix, account))
        self.cache.tasks.add(task)
        task.add_done_callback(self.cache.tasks.discard)
