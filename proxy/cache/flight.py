"""Single-flight fetches: one upstream fetch per cache key, shared by every waiter.

A :class:`Flight` is a task of its own, so it outlives the caller that started it. It
resolves two futures: ``head`` (the starter's answer, possibly a stream) and ``done``
(the whole result, for waiters). The body itself (and its spill to a file) is the cache layer's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from proxy.cache.policy import Entry
from proxy.cache.store import Stored
from proxy.messages import ProxyRequest, ProxyResponse


@dataclass(slots=True)
class Outcome:
    """What a flight produced: an answer in memory or on disk, or a stream for its starter."""

    status: int
    headers: tuple[tuple[str, str], ...]
    cache_status: Literal["MISS", "REVALIDATED", "BYPASS"]  # BYPASS: an answer not storable
    upstream_status: int | None
    stored: Stored | None = None  # body (bytes or on disk) to answer from
    stream: ProxyResponse | None = None  # only the starter may use it
    entry: Entry | None = None  # the entry answered from, for Age
    reason: str = "cold"  # for the lookup metric

    @property
    def shareable(self) -> bool:
        return self.stream is None


class GoAlone(Exception):
    """A waiter cannot share this flight's answer (not storable): it fetches on its own."""


@dataclass(eq=False)
class Flight:
    key: str
    request: ProxyRequest
    sequence: int  # the store's invalidation count when it began
    head: asyncio.Future[Outcome] = field(default_factory=asyncio.Future)
    done: asyncio.Future[Outcome] = field(default_factory=asyncio.Future)
    cancelled: bool = False  # invalidated while in flight: store nothing
    starter_gone: bool = False
    spilling: bool = False  # a large body is still being written; its pump settles ``done``
    task: asyncio.Task[None] | None = None
    upstream_seconds: float | None = None  # for the starter's access line
    # Shared cache (backend = "redis"): the fetch lock's owner token when this replica holds
    # it, the account's invalidation count when the flight began (None: Redis away, nothing
    # is stored there), and the entry to store there once the answer is out.
    owner: str | None = None
    gen: str | None = None
    share: Stored | None = None


def settle(future: asyncio.Future[Outcome], value: Outcome | BaseException) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
        # Waiters may all have gone; mark it retrieved so asyncio does not complain.
        future.add_done_callback(lambda f: f.exception())
    else:
        future.set_result(value)
