"""Invalidation in one home: what a change makes wrong, and the one path that applies it.

The vocabulary (pure, no I/O):

- :class:`Invalidation`: entries of one account that a change makes wrong: ``paths`` (each
  with every query and variant), the lists of the ``lists_of`` collections, and ``patterns``
  naming lists anywhere in a path (``/v1/companies/5/sites/*/products*``: a ``*`` inside the
  pattern is one segment's characters, a trailing ``*`` anything that follows). A write
  through the proxy makes one (:func:`invalidation`); a webhook names an
  object and every list that may hold it.
- :class:`Purge`: an operator's purge: every path under ``prefix`` (``""``: all) of one
  account, or of every account (``account=None``). ``Purge(account="x")`` is "everything of
  an account"; ``Purge()`` is everything.

:class:`Invalidator` applies a :data:`Change`: this process's flights and store first, then
the shared tier in Redis, then the other replicas by broadcast, in that order and before the
caller's answer goes out, so no replica reads the old entry back. Every source of
invalidations (writes, admin purges, the CLI, broadcasts from other replicas, a Redis that
lost its data) goes through it; each gets it by constructor.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from proxy.cache.fields import values_of
from proxy.logs import event
from proxy.target import normal_escapes

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def normalise_path(path: str) -> str:
    """``/v1/x/5.json`` and ``/v1/x/5`` name one resource (Kounta's format suffix), and so do
    ``/v1/x/5`` and ``/v1/x/%35`` (RFC 3986 6.2.2: :func:`~proxy.target.normal_escapes`)."""
    return normal_escapes(path).removesuffix(".json")


def is_id(segment: str) -> bool:
    return any(ch.isdigit() for ch in segment)


@dataclass(frozen=True, slots=True)
class Invalidation:
    """Stored entries a change makes wrong (RFC 9111 4.4), for one account.

    ``paths`` are normalised paths removed with every query and variant; ``lists_of``
    names collections whose lists (any path where the name is followed only by filter
    segments such as ``orders/complete``, or by nothing) are removed as well; ``patterns``
    are path patterns (see the module) whose matches are removed.
    """

    account: str
    paths: frozenset[str]
    lists_of: frozenset[str] = frozenset()
    patterns: frozenset[str] = frozenset()

    def covers(self, account: str, path: str) -> bool:
        if account != self.account:
            return False
        bare = normalise_path(path)
        if bare in self.paths:
            return True
        if any(_pattern(p).fullmatch(path) for p in self.patterns):
            return True
        segments = bare.strip("/").split("/")
        for i, segment in enumerate(segments):
            if segment in self.lists_of and not any(is_id(s) for s in segments[i + 1 :]):
                return True
        return False


@dataclass(frozen=True, slots=True)
class Purge:
    """Every entry under ``prefix`` of ``account`` (None: of every account)."""

    prefix: str = ""
    account: str | None = None

    def covers(self, account: str, path: str) -> bool:
        return (self.account is None or account == self.account) and path.startswith(self.prefix)

    @property
    def everything(self) -> bool:
        return not self.prefix and self.account is None


Change = Invalidation | Purge


@functools.lru_cache(maxsize=1024)
def _pattern(pattern: str) -> re.Pattern[str]:
    """``*`` inside: one segment's characters; a trailing ``*``: anything that follows."""
    body, tail = (pattern[:-1], ".*") if pattern.endswith("*") else (pattern, "")
    return re.compile("[^/]*".join(map(re.escape, body.split("*"))) + tail)


def invalidation(
    account: str,
    method: str,
    path: str,
    status: int | None,
    headers: Sequence[tuple[str, str]],
    upstream_origin: str,
) -> Invalidation | None:
    """What a request through the proxy invalidates (RFC 9111 4.4).

    After an unsafe method: the target (with and without ``.json``), the same-origin
    Location and Content-Location, and the lists of the target's collection. ``status``
    None means the outcome is unknown (timeout, broken connection): the upstream may have
    processed it, so the entries go too. Answers 400-499 changed nothing and keep them.
    """
    if method not in UNSAFE_METHODS:
        return None
    if status is not None and 400 <= status < 500:
        return None
    paths = {normalise_path(path)}
    for name in ("Location", "Content-Location"):
        for value in values_of(headers, name):
            same = _same_origin_path(value, upstream_origin, path)
            if same is not None:
                paths.add(normalise_path(same))
    kinds = {_collection(p) for p in paths} - {None}
    return Invalidation(account, frozenset(paths), frozenset(k for k in kinds if k))


def _collection(path: str) -> str | None:
    """The collection a path is in: its last segment that is not an id."""
    for segment in reversed(path.strip("/").split("/")):
        if not is_id(segment) and segment != "v1":
            return segment
    return None


def _same_origin_path(value: str, origin: str, target: str) -> str | None:
    """The path of a Location / Content-Location on the upstream's origin (relative
    references resolved against the request's target, RFC 9110 10.2.2), else None."""
    try:
        url = urlsplit(urljoin(origin + target, value.strip()))
        base = urlsplit(origin)
    except ValueError:
        return None
    if (url.scheme, url.netloc) == (base.scheme, base.netloc):
        return url.path or None
    return None


class LocalTier(Protocol):
    """This process's part: in-flight fetches cancelled, memory tier and disk emptied."""

    async def apply(self, change: Change) -> int:
        """Remove what ``change`` covers here; returns how many entries went."""
        ...


class RedisTier(Protocol):
    """The entries shared in Redis (``proxy.cache.redis_records.RedisRecords``)."""

    async def drop(
        self,
        account: str | None,
        covers: Callable[[str, str], bool],
        resend: Callable[[], Awaitable[None]] | None = None,
    ) -> None: ...

    async def catch_up(self) -> None: ...


class Announcer(Protocol):
    """Tells the other replicas (``proxy.cache.broadcast.Broadcast``)."""

    async def publish(self, change: Change) -> None: ...


class Invalidator:
    """Applies every change in one order: local, shared tier, broadcast."""

    def __init__(
        self,
        local: LocalTier,
        records: RedisTier | None = None,
        announcer: Announcer | None = None,
    ) -> None:
        self.local = local
        self.records = records
        self.announcer = announcer
        # Told of every change applied here, once applied (set while services are built).
        self.watchers: list[Callable[[Change], None]] = []

    async def apply(self, change: Change) -> int:
        """A change made here: applied locally, in Redis, then told to the other replicas
        (all before the caller's answer goes out); returns the entries removed here."""
        removed = await self.local.apply(change)
        if self.records is not None:
            # Account None: every account. When Redis is away it is kept and replayed, and
            # then told to the other replicas again (their copies of Redis' may be old).
            await self.records.drop(_account(change), change.covers, self._resend(change))
            # A lookup here between the two may have read Redis' old copy back into this
            # process (the store's sequence had moved already): drop it again, now that
            # Redis holds none.
            removed += await self.local.apply(change)
        if self.announcer is not None:
            await self.announcer.publish(change)
        self._tell(change)
        return removed

    async def received(self, change: Change) -> None:
        """A change another replica made (it did Redis and the broadcast): local only."""
        await self.local.apply(change)
        self._tell(change)

    def _tell(self, change: Change) -> None:
        for watcher in self.watchers:
            watcher(change)

    async def gap(self, why: str) -> None:
        """Changes may have been missed and cannot be replayed from the invalidation log (it
        does not reach back, a listener that died, a Redis that lost or rewound its data):
        purge everything here, then replay what Redis missed of this replica's own changes."""
        event("cache_purged_after_gap", logging.WARNING, reason=why)
        await self.local.apply(Purge())
        if self.records is not None:
            await self.records.catch_up()

    def _resend(self, change: Change) -> Callable[[], Awaitable[None]] | None:
        announcer = self.announcer
        return None if announcer is None else functools.partial(announcer.publish, change)


def _account(change: Change) -> str | None:
    return change.account
