"""A request the fast path answers from the connection's protocol once its flight is
done: a joiner of a revalidation in flight, a plain entry of its flight's wake-up list
answered by the wake-up itself (:class:`Joiners`), or the starter of one (:class:`Parked`)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.answering import AnsweringProtocol
from proxy.cache.fastlook import BodyFor, FastLook, Pending
from proxy.cache.flight import Outcome, Plain
from proxy.collectors import LoopGauge
from proxy.edge.callers import Caller
from proxy.edge.inbound import Exchange, Head
from proxy.logs import Trace, begin_trace, log
from proxy.target import Target


@dataclass(slots=True)
class Asked:
    """A plain GET the fast path may answer, and what checking it learnt."""

    started: float
    request_id: str
    caller: Caller
    target: Target
    route: str
    accepts: bool  # the caller takes gzip
    body_for: BodyFor | None
    # The request's SELECTING values in its order (None: not read; the key reads them).
    selecting: tuple[str | None, ...] | None = None


class Settle(Protocol):
    """What a parked request asks of the fast path (:class:`~proxy.edge.fast.FastPath`)."""

    def begin(self, parked: Parked) -> None: ...
    def settled(self, parked: Parked) -> bytes | None: ...
    def left(self, parked: Parked, waiting: bool = True) -> None: ...
    def gone(self, head: Head, asked: Asked, noted: Trace) -> None: ...
    def together(self, pending: Pending, outcome: Outcome, info: bool) -> Answer | None: ...


# A joiner's answer from what its wake-up's joiners share (proxy.edge.together): its bytes,
# or None (the long way goes on from the outcome).
Answer = Callable[[Head, "Asked", Trace | None], bytes | None]


class Parked:
    """The starter of a revalidation waiting in the connection's protocol
    (:class:`proxy.answering.Later`) for its flight's head, with no task; or a joiner handed
    to the long way (:meth:`Joiners.woken`). Answered as :meth:`FastPath.start` answers, or
    handed to the long way with the same outcome (:meth:`FastPath.__call__`)."""

    __slots__ = (
        "_noted", "asked", "context", "done", "head", "over", "pending", "result", "settle",
        "waiter",
    )  # fmt: skip

    def __init__(
        self,
        settle: Settle,
        head: Head,
        asked: Asked,
        pending: Pending,
        waiter: asyncio.Future[Any] | None,
        traced: tuple[contextvars.Context | None, Trace | None],
    ) -> None:
        self.settle, self.head, self.asked, self.pending, self.waiter = (
            settle, head, asked, pending, waiter,
        )  # fmt: skip
        # The flight notes in the request's own trace, as in a task of its own; a joiner
        # handed over has its trace made only once something reads it (:attr:`noted`).
        self.context, self._noted = traced
        self.result: Outcome | Exception = TimeoutError()
        self.done: Callable[[bytes | None], None] | None = None
        self.over = False

    @property
    def noted(self) -> Trace:
        """The request's trace, made on its first read (a joiner handed to the long way:
        where none was made, :func:`joining`)."""
        noted = self._noted
        if noted is None:
            noted = self._noted = Trace(self.asked.request_id)
        return noted

    @property
    def made(self) -> Trace | None:
        """The request's trace if it was made (:attr:`noted`); None: nothing read it yet."""
        return self._noted

    def then(self, done: Callable[[bytes | None], None]) -> None:
        self.done = done
        self.settle.begin(self)
        if self.waiter is not None:
            self.waiter.add_done_callback(self._woke, context=self.context)

    def cancel(self) -> None:
        if self.over:
            return
        self.over = True
        if self.waiter is not None:
            self.waiter.remove_done_callback(self._woke)
        self.settle.left(self)

    def dropped(self) -> None:
        """Handed to the long way, but the connection closed before it began."""
        self.settle.left(self, waiting=False)

    def _woke(self, _: object) -> None:
        if self.over or self.done is None:
            return
        self.over = True
        self.done(self.settle.settled(self))


# A joiner as it waits: a plain entry of its flight's wake-up list (Flight.park), no object
# of its own: (its Joiners, head, asked, (context, trace) as joining gives them, pending).
Joining = tuple["Joiners", Head, Asked, tuple[contextvars.Context | None, Trace | None], Pending]


class Joiners:
    """Where the fast path's joiners of a revalidation in flight wait in their connections'
    protocols (:class:`proxy.answering.Host`): each a plain entry (:data:`Joining`) of its
    flight's wake-up list (:meth:`~proxy.cache.flight.Flight.park`), with no object, future
    or call chain of its own; the flight's wake-up hands the entries it woke to
    :meth:`woken`, which answers them together (what they share looked at once), as
    :meth:`FastPath.join` answers, or hands each to the long way with the same outcome."""

    __slots__ = ("answer", "fast", "in_flight", "settle")

    def __init__(self, settle: Settle, fast: FastLook, in_flight: LoopGauge) -> None:
        self.settle, self.fast, self.in_flight = settle, fast, in_flight
        self.answer = self.woken  # bound once: every flight's entries answered by it

    def entry(self, head: Head, asked: Asked, pending: Pending) -> Joining:
        """A joiner of ``pending``'s flight (still out, :meth:`FastLook.waits`) to park."""
        return self, head, asked, joining(asked.request_id), pending

    def park(self, protocol: AnsweringProtocol, entry: Plain) -> None:
        """The protocol holds ``entry``: it waits in its flight's wake-up list."""
        self.in_flight.inc()  # a scrape may come meanwhile
        pending: Pending = entry[4]
        pending.flight.park(self.fast.coalesce_wait, (protocol, entry), self.answer)

    def unpark(self, protocol: AnsweringProtocol, entry: Plain) -> None:
        """``entry``'s caller left first: logged as the long way logs it. The entry stays in
        its flight's list until woken, then passed over (its protocol no longer holds it)."""
        self.in_flight.dec()
        _, head, asked, (_, noted), _ = entry
        self.settle.gone(head, asked, noted or Trace(asked.request_id))

    def woken(self, entries: list[Plain]) -> None:
        """The entries a flight's wake-up woke (all of one flight, in order): each answered
        from the flight's outcome, or handed to the long way with it (a TimeoutError: their
        ``coalesce_wait`` ran out first)."""
        first: Pending = entries[0][1][4]
        result = self.fast.result(first)  # the same for every joiner of the flight
        # A joiner's trace is read only by an access line (below info, none is made).
        info = log.isEnabledFor(logging.INFO)
        shared = None  # what their answers share, worked out once (proxy.edge.together)
        if isinstance(result, Outcome):
            try:
                shared = self.settle.together(first, result, info)
            except Exception:
                log.exception("fast_path_failed")
        for protocol, entry in entries:
            if protocol.parked_on(entry):  # else its caller left (unpark)
                try:
                    self._answer(protocol, entry, result, info, shared)
                except Exception:  # one joiner's failure must not cost the others theirs
                    log.exception("flight_wake_failed")

    def _answer(
        self,
        protocol: AnsweringProtocol,
        entry: Joining,
        result: Outcome | Exception,
        info: bool,
        shared: Answer | None,
    ) -> None:
        self.in_flight.dec()
        _, head, asked, (context, noted), pending = entry
        if noted is None and info:
            noted = Trace(asked.request_id)
        out = None
        if shared is not None:
            try:
                if context is None:
                    out = shared(head, asked, noted)
                else:  # debug lines: in the request's own context (joining)
                    out = context.run(shared, head, asked, noted)
            except Exception:
                log.exception("fast_path_failed")
        if out is not None:
            protocol.woken(out)
            return
        handed = Parked(self.settle, head, asked, pending, None, (context, noted))
        handed.result, handed.over = result, True
        protocol.woken(None, handed)


def traced(request_id: str) -> tuple[contextvars.Context, Trace]:
    """A context of the request's own with its trace begun, as a task of its own has."""
    context = contextvars.copy_context()
    return context, context.run(begin_trace, request_id)


def joining(request_id: str) -> tuple[contextvars.Context | None, Trace | None]:
    """A parked joiner's trace, and a context of its own for its answer only when debug lines
    are written (``cache_lookup`` reads the current trace): otherwise nothing in a joiner's
    answer reads the context, and its trace is made only when read (:meth:`Joiners.woken`
    at info level: ``Together.answer`` notes ``fetched_by`` in it for the access line; or
    :attr:`Parked.noted` once handed to the long way, which goes on with it), so neither is
    made per joiner where no access line is written."""
    if log.isEnabledFor(logging.DEBUG):
        return traced(request_id)
    return None, None


def waited(asked: Asked, noted: Trace) -> Exchange:
    """What the access line of a request that waited for a flight starts from."""
    info = Exchange(asked.request_id, asked.caller.name, asked.caller.account)
    info.trace = noted
    return info
