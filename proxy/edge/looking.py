"""A plain GET the memory tier has nothing for, answered from the connection's protocol once
its tier lookup is done (:class:`Looking`): the disk, or Redis then the disk
(:meth:`~proxy.cache.fastlook.FastLook.tier_hit`, in a task of its own), with no aiohttp
request object, handler task or ``StreamResponse``. A fresh entry the long way would answer
as a plain HIT is answered with the bytes a memory hit's answer has (the same head, counts
and access line); anything else is handed to the long way, which goes on from what was
found (:meth:`~proxy.edge.fast.FastPath.__call__`), as the fast path's own lookup in a task
(:meth:`~proxy.edge.fast.FastPath.look`) hands it over."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from proxy.cache.fastlook import FastAnswer, Looked
from proxy.collectors import LoopGauge
from proxy.edge.inbound import Head
from proxy.edge.parked import Asked, joining
from proxy.logs import Trace, log

# What a tier lookup gives: a fresh answer, what the long way goes on from, or None (it
# failed: the long way looks again).
Found = FastAnswer | Looked | None
# The tier's lookup (FastLook.tier_hit), as a task runs it.
Tier = Coroutine[Any, Any, FastAnswer | Looked]


class Host(Protocol):
    """What a looking request asks of the fast path (:class:`~proxy.edge.fast.FastPath`)."""

    in_flight: LoopGauge

    def tier(self, request: Head, asked: Asked, key: str) -> Tier:
        """The tier lookup (:meth:`~proxy.cache.fastlook.FastLook.tier_hit`) for ``request``."""

    def hit(self, head: Head, asked: Asked, found: FastAnswer) -> bytes:
        """A fresh answer's bytes, counted and logged as a memory hit's."""

    def gone(self, head: Head, asked: Asked, noted: Trace) -> None:
        """The caller left first: logged as the long way logs it."""


class Looking:
    """A request waiting in its connection's protocol (:class:`proxy.answering.Later`) for
    its tier lookup, counted in flight meanwhile (as :meth:`FastPath.look` counts it). The
    lookup runs in a task, answered within that task's last step (no callback of its own on
    the loop), in a context of the request's own with its trace begun only while debug lines
    are written (:func:`~proxy.edge.parked.joining`; else the trace is made when read); a
    caller that leaves cancels it, as it cancels a handler."""

    __slots__ = ("_noted", "asked", "done", "found", "head", "host", "over", "task")

    def __init__(self, host: Host, head: Head, asked: Asked, key: str) -> None:
        self.host, self.head, self.asked = host, head, asked
        context, self._noted = joining(asked.request_id)
        lookup = self._look(host.tier(head, asked, key))
        self.task = asyncio.get_running_loop().create_task(lookup, context=context)
        # What the long way goes on from once handed over (None: it looks again).
        self.found: Looked | None = None
        self.done: Callable[[bytes | None], None] | None = None
        self.over = False

    @property
    def noted(self) -> Trace:
        """The request's trace (made on its first read where no debug lines are written)."""
        noted = self._noted
        if noted is None:
            noted = self._noted = Trace(self.asked.request_id)
        return noted

    def then(self, done: Callable[[bytes | None], None]) -> None:
        self.done = done
        self.host.in_flight.inc()  # an await: a scrape may come meanwhile

    def cancel(self) -> None:
        if self.over:
            return
        self.over = True
        self.task.cancel()
        self.host.in_flight.dec()
        self.host.gone(self.head, self.asked, self.noted)

    def dropped(self) -> None:
        """Handed to the long way, but the connection closed before it began."""
        self.host.gone(self.head, self.asked, self.noted)

    async def _look(self, lookup: Tier) -> None:
        found: Found = None
        try:
            found = await lookup
        except asyncio.CancelledError:  # the caller left (over), or a shutdown: the long way
            self._settle(None)
            raise
        except Exception:  # a bug there must not cost the caller its answer
            log.exception("fast_path_failed")
        self._settle(found)

    def _settle(self, found: Found) -> None:
        if self.over or self.done is None:
            return
        self.over = True
        self.host.in_flight.dec()
        try:
            self.done(self._answer(found))
        except Exception:  # (written by the protocol: nothing of the lookup's)
            log.exception("fast_path_failed")

    def _answer(self, found: Found) -> bytes | None:
        """The fresh answer's bytes; None: the long way answers (from :attr:`found`)."""
        if found is None or isinstance(found, Looked):
            self.found = found
            return None
        try:
            return self.host.hit(self.head, self.asked, found)
        except Exception:
            log.exception("fast_path_failed")
            return None
