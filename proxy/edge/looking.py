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
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from proxy.cache.fastlook import FastAnswer, Looked
from proxy.collectors import LoopGauge
from proxy.edge.inbound import Head
from proxy.edge.parked import Asked, traced
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
    lookup runs in a task with the request's own context and trace (its debug lines name the
    request); a caller that leaves cancels it, as it cancels a handler."""

    __slots__ = ("asked", "context", "done", "found", "head", "host", "noted", "over", "task")

    def __init__(self, host: Host, head: Head, asked: Asked, key: str) -> None:
        self.host, self.head, self.asked = host, head, asked
        self.context: contextvars.Context
        self.noted: Trace
        self.context, self.noted = traced(asked.request_id)
        lookup = host.tier(head, asked, key)
        self.task = asyncio.get_running_loop().create_task(lookup, context=self.context)
        # What the long way goes on from once handed over (None: it looks again).
        self.found: Looked | None = None
        self.done: Callable[[bytes | None], None] | None = None
        self.over = False

    def then(self, done: Callable[[bytes | None], None]) -> None:
        self.done = done
        self.host.in_flight.inc()  # an await: a scrape may come meanwhile
        self.task.add_done_callback(self._looked, context=self.context)

    def cancel(self) -> None:
        if self.over:
            return
        self.over = True
        self.task.remove_done_callback(self._looked)
        self.task.cancel()
        self.host.in_flight.dec()
        self.host.gone(self.head, self.asked, self.noted)

    def dropped(self) -> None:
        """Handed to the long way, but the connection closed before it began."""
        self.host.gone(self.head, self.asked, self.noted)

    def _looked(self, task: asyncio.Task[FastAnswer | Looked]) -> None:
        if self.over or self.done is None:
            return
        self.over = True
        self.host.in_flight.dec()
        self.done(self._answer(task))

    def _answer(self, task: asyncio.Task[FastAnswer | Looked]) -> bytes | None:
        """The fresh answer's bytes; None: the long way answers (from :attr:`found`)."""
        found: Found = None
        if not task.cancelled():  # (a shutdown may cancel it: the long way looks again)
            error = task.exception()
            if error is None:
                found = task.result()
            else:  # a bug there must not cost the caller its answer
                log.error("fast_path_failed", exc_info=error)
        if found is None or isinstance(found, Looked):
            self.found = found
            return None
        try:
            return self.host.hit(self.head, self.asked, found)
        except Exception:
            log.exception("fast_path_failed")
            return None
