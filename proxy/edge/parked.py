"""A request the fast path answers from the connection's protocol once its flight is
done (:class:`Parked`): a joiner of a revalidation in flight, or the starter of one."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.cache.fastlook import BodyFor, Pending
from proxy.cache.flight import Outcome
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
    def listen(self, parked: Parked) -> None: ...
    def settled(self, parked: Parked) -> bytes | None: ...
    def left(self, parked: Parked, waiting: bool = True) -> None: ...


class Parked:
    """A joiner of a revalidation, or its starter, waiting in the connection's protocol
    (:class:`proxy.answering.Later`): no task, the flight's wake-up itself (a joiner's,
    :meth:`~proxy.cache.flight.Flight.call`: no future of its own) or its head (the starter's)
    calls back; answered as :meth:`FastPath.join` answers, or handed to the long
    way with the same outcome (:meth:`FastPath.__call__`)."""

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
        # The flight notes in the request's own trace (fetched_by), as in a task of its own;
        # a joiner's call is made in its own context only where one was made (:func:`joining`),
        # and its trace made only once something reads it (:attr:`noted`).
        self.context, self._noted = traced
        self.result: Outcome | Exception = TimeoutError()
        self.done: Callable[[bytes | None], None] | None = None
        self.over = False

    @property
    def noted(self) -> Trace:
        """The request's trace, made on its first read: a parked joiner's, below debug level,
        is read only for its access line (when one is written) or by the long way."""
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
        if self.waiter is None:  # a joiner: its flight calls woken
            self.settle.listen(self)
        else:
            self.waiter.add_done_callback(self._woke, context=self.context)

    def cancel(self) -> None:
        if self.over:
            return
        self.over = True
        if self.waiter is not None:  # a joiner's call is left to find it over
            self.waiter.remove_done_callback(self._woke)
        self.settle.left(self)

    def dropped(self) -> None:
        """Handed to the long way, but the connection closed before it began."""
        self.settle.left(self, waiting=False)

    def woken(self) -> None:
        """The flight is done, or the joiner's wait ran out: in the request's own context
        when it has one (:func:`joining`)."""
        context = self.context
        if context is None:
            self._woke(None)
        else:
            context.run(self._woke, None)

    def _woke(self, _: object) -> None:
        if self.over or self.done is None:
            return
        self.over = True
        self.done(self.settle.settled(self))


def traced(request_id: str) -> tuple[contextvars.Context, Trace]:
    """A context of the request's own with its trace begun, as a task of its own has."""
    context = contextvars.copy_context()
    return context, context.run(begin_trace, request_id)


def joining(request_id: str) -> tuple[contextvars.Context | None, Trace | None]:
    """A parked joiner's trace, and a context of its own for its answer only when debug lines
    are written (``cache_lookup`` reads the current trace): otherwise nothing in a joiner's
    answer reads the context, and its trace is made when first read (:attr:`Parked.noted`:
    ``FastLook.joined`` notes ``fetched_by`` in it for the access line, the long way goes
    on with it), so neither is made per joiner where no access line is written."""
    if log.isEnabledFor(logging.DEBUG):
        return traced(request_id)
    return None, None


def waited(asked: Asked, noted: Trace) -> Exchange:
    """What the access line of a request that waited for a flight starts from."""
    info = Exchange(asked.request_id, asked.caller.name, asked.caller.account)
    info.trace = noted
    return info
