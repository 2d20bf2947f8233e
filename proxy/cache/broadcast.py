"""Cache invalidations told to every replica (``[shared] backend = "redis"``).

Each replica keeps its own store (disk and memory tier). A change made through one replica
is applied there at once and then published by the
:class:`~proxy.cache.invalidation.Invalidator` through :class:`Broadcast`, before the
writer's answer goes out; every other replica applies it on arrival (milliseconds; the
contract is under a second), so no replica answers the old record as fresh after the
writer's answer.

A replica that loses its subscription hears what it missed again when it subscribes again
(the backend replays it from the invalidation log, :mod:`proxy.shared.log`, through the same
decoder); when that cannot be known (the log does not reach back, a new Redis epoch, a
listener that died) it purges its whole store (the invalidator's ``gap``), trading hit rate
for never serving a missed write.

Messages are untrusted input (anyone who can publish on Redis can send one): at most
:data:`MAX_MESSAGE` bytes, nesting at most :data:`MAX_DEPTH`, exactly the fields of a known
format version, paths that are paths; anything else is dropped and counted
(``kounta_proxy_cache_broadcasts_total{result="rejected"}``), never raised. Format 1 is
format 0 (the previous release: no ``v``) plus ``v`` and an optional ``patterns`` list, so
replicas of both releases read what the other writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.cache.invalidation import Change, Invalidation, Purge
from proxy.cache.metrics import CacheMetrics
from proxy.logs import event
from proxy.shared import SharedUnavailable
from proxy.shared.base import SharedEvents

TOPIC = "cache"
VERSION = 1
# Limits on a message read from the channel: bytes, nesting, paths listed, one path's bytes.
MAX_MESSAGE = 256 * 1024
MAX_DEPTH = 4
MAX_ITEMS = 4096
MAX_PATH = 4096
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_INVALIDATE = frozenset({"v", "account", "paths", "lists_of", "patterns"})
_PURGE = frozenset({"v", "purge", "account"})


class BadMessage(ValueError):
    """A message that is not a change this replica can read."""


def encode(change: Change) -> bytes:
    body: dict[str, Any]
    if isinstance(change, Purge):
        body = {"v": VERSION, "purge": change.prefix, "account": change.account}
    else:
        body = {
            "v": VERSION,
            "account": change.account,
            "paths": sorted(change.paths),
            "lists_of": sorted(change.lists_of),
        }
        if change.patterns:
            body["patterns"] = sorted(change.patterns)
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Change:
    """The change a message carries; raises :class:`BadMessage` for anything else."""
    if len(data) > MAX_MESSAGE:
        raise BadMessage(f"over {MAX_MESSAGE} bytes")
    if _depth(data) > MAX_DEPTH:
        raise BadMessage("nested too deep")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise BadMessage(f"not JSON ({type(e).__name__})") from None
    if not isinstance(body, dict):
        raise BadMessage("not an object")
    version = body.get("v", 0)
    if type(version) is not int or version not in (0, VERSION):
        raise BadMessage("an unknown format version")
    if "purge" in body:
        _fields(body, _PURGE)
        account = body.get("account")
        return Purge(_path(body["purge"], prefix=True), None if account is None else _name(account))
    _fields(body, _INVALIDATE, frozenset({"account", "paths", "lists_of"}))
    return Invalidation(
        _name(body["account"]),
        _strings(body["paths"], _path),
        _strings(body["lists_of"], _name),
        _strings(body.get("patterns", []), _path),
    )


def _depth(data: bytes) -> int:
    """How deep arrays and objects nest (strings skipped), without parsing."""
    depth = deepest = 0
    for byte in _STRINGS.sub(b"", data):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def _fields(
    body: dict[str, Any], allowed: frozenset[str], required: frozenset[str] = frozenset()
) -> None:
    if not set(body) <= allowed or not required <= set(body):
        raise BadMessage("unexpected or missing fields")


def _strings(value: Any, check: Callable[[Any], str]) -> frozenset[str]:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise BadMessage("a list expected")
    return frozenset(check(item) for item in value)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PATH:
        raise BadMessage("a name expected")
    return value


def _path(value: Any, prefix: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_PATH:
        raise BadMessage("a path expected")
    if value.startswith("/") or (prefix and not value):
        return value
    raise BadMessage("a path expected")


class Broadcast:
    """Publishes this replica's changes and hands the others' to ``received``."""

    def __init__(self, events: SharedEvents, metrics: CacheMetrics) -> None:
        self.events = events
        self.metrics = metrics
        self.tasks: set[asyncio.Task[None]] = set()

    def listen(
        self,
        received: Callable[[Change], Awaitable[None]],
        gap: Callable[[str], Awaitable[None]],
    ) -> None:
        """From now on every other replica's change goes to ``received``, and ``gap`` hears
        when changes may have been missed."""
        self.events.listen(
            TOPIC,
            lambda data: self._received(data, received),
            lambda: self._run(gap("resubscribed")),
        )

    async def publish(self, change: Change) -> None:
        try:
            await self.events.publish(TOPIC, encode(change))
        except SharedUnavailable:
            # Redis is away: the others cannot hear it; they purge when they resubscribe.
            self.metrics.cache_broadcasts.labels("failed").inc()
            return
        self.metrics.cache_broadcasts.labels("sent").inc()

    def _received(self, data: bytes, received: Callable[[Change], Awaitable[None]]) -> None:
        try:
            change = decode(data)
        except BadMessage:
            self.metrics.cache_broadcasts.labels("rejected").inc()
            return
        self.metrics.cache_broadcasts.labels("received").inc()
        self._run(received(change))

    def _run(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Applying a change here failed (the disk): said once, never left unretrieved.
            error = task.exception()
            event("cache_broadcast_not_applied", logging.WARNING, error=type(error).__name__)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
