"""The fast path's one answer from a flight that freshened the stored 200: a wake-up's
joiners together, a single joiner or the flight's starter as a wake-up of one.

A flight's wake-up hands every joiner it woke in the connections' protocols to
:meth:`~proxy.edge.parked.Joiners.woken` in one call. Each joiner's answer from an outcome
that freshened the stored 200 is the same but for the caller's own parts: its request id,
its If-None-Match (a 304 or the body), whether it takes gzip, who it is, where it reached
the proxy. What is the same for all of them is worked out here once per wake-up
(:class:`Together`): the flight's sharing (:meth:`~proxy.cache.fastlook.FastLook.sharing`),
the clock read and the Age, the ``Date``, the Cache-Status member, the plain (inflated) body
for callers that do not take gzip, the upstream time and the fetching request's id, and a
rendered head per shape (status, scheme and host, coding, caller) as the joiners ask for
them; each joiner's answer is the shape's head with its request id filled in
(:func:`~proxy.edge.rendered.fill`), counted and logged as the long way counts and logs a
joiner of its flight, byte for byte the same.

Every other answer from a flight's outcome is the same steps for one request
(:meth:`~proxy.edge.fast.FastPath._joined`): a joiner that found its flight over, a
joiner answered in a request's task (a ``web.Response``: ``make``), the flight's starter (not
coalesced, no ``fetched_by``), a joiner at debug level (its ``cache_lookup`` line written in
its own context).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from multidict import CIMultiDict

from proxy.cache.fastlook import BodyFor, FastAnswer, FastLook, Pending, Sharing
from proxy.cache.flight import Outcome
from proxy.compat.aiohttp import http_date, render_response
from proxy.edge.answer import cache_status_value, caller_value
from proxy.edge.callers import Caller
from proxy.edge.inbound import Exchange, Incoming
from proxy.edge.parked import Asked, waited
from proxy.edge.rendered import Place, fill, template
from proxy.logs import Trace, log
from proxy.messages import CacheStatus

T = TypeVar("T")
# What an answer is made into: a web.Response, or its bytes (written by the protocol:
# render_response, the head of each shape rendered once, edge.rendered).
Make = Callable[[int, CIMultiDict[str], bytes], T]
# FastPath._done and FastPath._respond as the answers use them.
Done = Callable[[Incoming, Asked, int, CacheStatus, "Exchange | None", int], None]
Respond = Callable[[Incoming, Asked, FastAnswer, CacheStatus, str, "Exchange | None", Make[T]], T]


@functools.lru_cache(maxsize=64)
def revalidated(upstream_status: int | None) -> str:
    """The Cache-Status member of an answer a flight refreshed (the same for all its
    joiners)."""
    return cache_status_value("REVALIDATED", "fwd=stale", upstream_status)


def refreshed(
    asked: Asked, noted: Trace, upstream_seconds: float | None, upstream_status: int | None
) -> Exchange:
    """What the access line of a request answered from its flight's refreshed entry says
    (the fast path's joiners and starters)."""
    info = waited(asked, noted)
    info.upstream_seconds = upstream_seconds
    info.cache_status, info.upstream_status = "REVALIDATED", upstream_status
    return info


# What the answers take of the fast path: its place and public URL, its callers' note,
# and its _done and _respond.
Path = tuple[Place, str, Callable[[Caller], None], Done, Respond[T]]


def together(
    fast: FastLook, pending: Pending, outcome: Outcome, info: bool, path: Path[T], make: Make[T]
) -> Together[T] | None:
    """What the answers from ``pending``'s flight woken with ``outcome`` share (its joiners
    woken together, or one request); None: it did not freshen the stored 200 in memory (the
    long way goes on from it). ``info``: access lines are written."""
    sharing = fast.sharing(pending, outcome)
    if sharing.body is None or sharing.entry is None or sharing.counted is None:
        return None
    return Together(fast, pending, outcome, sharing, info, path, make)


class Together(Generic[T]):
    """What the answers of one wake-up share (the flight's outcome freshened the stored
    200: :func:`together`), and each answer from it (:meth:`answer`) as the long way gives
    it: its joiners', or the flight's starter's (``pending.starter``: not coalesced)."""

    __slots__ = (
        "age", "body", "caller_304", "coalesced", "count", "counted", "date", "done",
        "fetched_by", "fill", "headers", "info", "joiner", "make", "member", "not_modified",
        "note", "place", "plain", "plain_made", "public", "reason", "rendered", "respond",
        "shapes", "upstream_seconds", "upstream_status",
    )  # fmt: skip

    def __init__(
        self,
        fast: FastLook,
        pending: Pending,
        outcome: Outcome,
        sharing: Sharing,
        info: bool,
        path: Path[T],
        make: Make[T],
    ) -> None:
        body, entry, counted = sharing.body, sharing.entry, sharing.counted
        assert body is not None  # together() checked these
        assert entry is not None
        assert counted is not None
        flight = pending.flight
        self.body, self.not_modified, self.counted = body, sharing.not_modified, counted
        self.age = int(entry.age(fast.clock()))  # the clock read once for all of them
        self.headers, self.upstream_status = outcome.headers, outcome.upstream_status
        self.reason = outcome.reason
        self.caller_304 = fast.answers.caller_304
        # debug lines: Answers.count writes each answer's cache_lookup line (in the
        # request's own context: its trace names the request)
        self.count = fast.answers.count if log.isEnabledFor(logging.DEBUG) else None
        self.joiner = not pending.starter  # the starter is not coalesced
        self.coalesced = fast.coalesced
        self.fetched_by, self.upstream_seconds = flight.request.request_id, flight.upstream_seconds
        self.member, self.info, self.date = revalidated(outcome.upstream_status), info, http_date()
        self.place, self.public, self.note, self.done, self.respond = path
        self.make, self.rendered = make, make is render_response
        # its bytes, as a shape's head filled in (rendered: the answer is bytes)
        self.fill = cast(Callable[[tuple[bytes, bool], str, int, bytes, bytes], T], fill)
        self.plain: bytes | None = None
        self.plain_made = False
        self.shapes: dict[tuple[int, str, str, bool, str], tuple[bytes, bool] | None] = {}

    def answer(self, head: Incoming, asked: Asked, noted: Trace | None) -> T | None:
        """A request's answer, counted and logged as the long way's joiner (or starter) of
        its flight; None, counting nothing: the long way goes on from the outcome (the plain
        body too large to inflate). ``noted``: the request's trace (None: no access line
        reads it)."""
        if self.caller_304(200, self.headers, head.headers):
            status, items, body = 304, self.not_modified(), b""
        else:
            status, items = 200, self.headers
            sent = self.body if asked.body_for is None else self._plain(asked.body_for)
            if sent is None:
                return None
            body = sent
        if self.joiner:  # counted and logged as the long way's _wait does
            self.coalesced.inc()
            if noted is not None:
                noted.fetched_by = self.fetched_by
        if self.count is None:
            self.counted.inc()  # what Answers.count counts
        else:
            self.count("revalidated", self.reason)
        info = None
        if self.info and noted is not None:  # the access line's values
            info = refreshed(asked, noted, self.upstream_seconds, self.upstream_status)
        if self.rendered:
            caller = asked.caller
            named = caller_value(caller.name, caller.account)
            scheme, host = ("", "") if self.public else (head.scheme, head.host)
            accepts = asked.accepts
            of = (status, scheme, host, accepts, named)
            shapes = self.shapes
            if of in shapes:
                shape = shapes[of]
            else:
                shape = shapes[of] = template(
                    status, items, self.place, scheme, host, accepts, "REVALIDATED",
                    self.member, named, len(body),
                )  # fmt: skip
            if shape is not None:
                self.note(caller)
                out = self.fill(shape, asked.request_id, self.age, self.date, body)
                self.done(head, asked, status, "REVALIDATED", info, len(body))
                return out
        # rendered the long way (edge.answer; a shape without a template, edge.rendered, or
        # a web.Response), counted and logged there
        answer = status, items, body, self.age, None
        return self.respond(head, asked, answer, "REVALIDATED", self.member, info, self.make)

    def _plain(self, body_for: BodyFor) -> bytes | None:
        """The stored body for a caller that does not take gzip, made once a wake-up."""
        if not self.plain_made:
            self.plain, self.plain_made = body_for(self.headers, self.body), True
        return self.plain
