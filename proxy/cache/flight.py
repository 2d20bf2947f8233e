"""Single-flight fetches: one upstream fetch per cache key, shared by every waiter.

:class:`Flights` owns them: it *starts* a flight (a task of its own, so it outlives the
caller that started it), lets a later request *join* it, lets a waiter that cannot share its
answer *go alone*, *cancels* the flights a change covers, and *settles* each one exactly once.
A :class:`Flight` resolves two futures: ``head`` (the starter's answer, possibly a stream)
and ``done`` (the whole result, for waiters). A large body is written to a file by a
:class:`Tee` while it streams to the starter; the tee then settles the flight.

Nothing outside this module sets a flight's fields: the tier records its fetch lock with
:meth:`Flight.claimed` and the entry it will share with :meth:`Flight.to_share`; the fast
path keeps its joiners' common start in ``Flight.joining`` and their answers' common part
in ``Flight.answering`` (each made once per flight).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from multidict import CIMultiDict

from proxy import errors
from proxy.cache.disk import BodySink
from proxy.cache.entry import Entry
from proxy.cache.invalidation import Change
from proxy.cache.keys import parse_key
from proxy.cache.memory import Stored
from proxy.compat.tasks import eager_task
from proxy.logs import log
from proxy.messages import ProxyRequest, ProxyResponse

# Chunks a streaming starter may fall behind the upstream before the flight stops feeding it.
TEE_DEPTH = 8


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


class GoAlone(Exception):
    """A waiter cannot share this flight's answer (not storable): it fetches on its own."""


class Dropped(Exception):
    """A background refresh that is not needed: another replica's fetch of the key is out."""


def settle(future: asyncio.Future[Outcome], value: Outcome | BaseException) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
        # Waiters may all have gone; mark it retrieved so asyncio does not complain.
        future.add_done_callback(lambda f: f.exception())
    else:
        future.set_result(value)


class Flight:
    """One fetch of one key. Read by anyone; changed only here, by :class:`Flights` and by
    :class:`Tee`."""

    def __init__(self, key: str, request: ProxyRequest, sequence: int) -> None:
        self.key = key
        self.request = request
        self.sequence = sequence  # the store's invalidation count when it began
        self._loop = loop = asyncio.get_running_loop()  # once: every waiter needs it
        self.head: asyncio.Future[Outcome] = loop.create_future()
        self.done: asyncio.Future[Outcome] = loop.create_future()
        self.cancelled = False  # invalidated while in flight: store nothing
        self.starter_gone = False
        self.spilling = False  # a large body is still being written; its tee settles ``done``
        self.upstream_seconds: float | None = None  # for the starter's access line
        # Shared entries (backend = "redis"): the fetch lock's owner token when this replica
        # holds it, the account's invalidation count when the flight began (None: Redis
        # away, nothing is stored there), and the entry to store there once the answer is out.
        self.owner: str | None = None
        self.gen: str | None = None
        self.share: Stored | None = None
        # The fast path's joiners' common start (a proxy.cache.fastlook.Pending) and their
        # answers' common part (a proxy.cache.fastlook.Sharing), each made once.
        self.joining: object = None
        self.answering: object = None
        # Waiters by deadline (ties: first come, first woken), one timer for the earliest,
        # all woken when ``done`` is.
        self._waiting: list[tuple[float, Wake]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._watching = False  # _wake_all is among done's callbacks
        self._answer: Answer | None = None  # what answers the plain entries (park)

    def waiter(self, patience: float) -> asyncio.Future[None]:
        """A future resolved when ``done`` is, or ``patience`` seconds from now, whichever
        comes first (cancelling it changes nothing else). One timer per flight, not one per
        waiter: on asyncio's loop a cancelled timer stays in the heap until it is due."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._wait(patience, waiter)
        return waiter

    def park(self, patience: float, entry: Plain, answer: Answer) -> None:
        """``entry`` (a plain tuple: a request waiting in its connection's protocol,
        :meth:`~proxy.edge.parked.Joiners.park`) waits in the wake-up list itself until
        ``done`` is, or ``patience`` seconds from now, whichever comes first, as
        :meth:`waiter`'s future would: no future, no call or object of its own. The entries
        woken together are handed to ``answer`` (the same for every entry of a flight) in one
        call, in order, within the wake-up (no loop turn of their own). Once ``done`` is,
        ``answer([entry])`` is called at the loop's next turn."""
        self._answer = answer
        if self.done.done():
            self._loop.call_soon(_answer, answer, [entry])
            return
        self._wait(patience, entry)

    def _wait(self, patience: float, wake: Wake) -> None:
        loop = self._loop
        deadline = loop.time() + patience
        if not self._watching:
            self._watching = True
            self.done.add_done_callback(self._wake_all)
        waiting = self._waiting
        if not waiting or deadline >= waiting[-1][0]:
            # In order (every joiner of a flight waits as long): the timer, when armed, is
            # for the first of them already.
            waiting.append((deadline, wake))
            if self._timer is None:
                self._timer = loop.call_at(deadline, self._expire, deadline)
            return
        waiting.insert(bisect.bisect_right(waiting, deadline, key=_due), (deadline, wake))
        if self._timer is None or deadline < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._expire, deadline)

    def _expire(self, until: float) -> None:
        """The timer for ``until`` fired: waiters due by then are woken (done or not)."""
        self._timer = None
        waiting = self._waiting
        due = bisect.bisect_right(waiting, until, key=_due)
        woken = waiting[:due]
        del waiting[:due]
        self._wake_each(woken)
        if waiting and not self.done.done():
            when = waiting[0][0]
            self._timer = self._loop.call_at(when, self._expire, when)

    def answered(self, outcome: Outcome) -> None:
        """``done`` settled with ``outcome`` by the flight's own task, and its waiters woken
        within that step, as ``done``'s callback would wake them at the loop's next turn (a
        turn sooner for every flight), in a context of their own as a callback's."""
        watching, self._watching = self._watching, False
        if watching:  # the callback goes first: settling would schedule it
            self.done.remove_done_callback(self._wake_all)
        settle(self.done, outcome)
        if watching:
            contextvars.copy_context().run(self._wake_all, None)

    def _wake_all(self, _: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        self._wake_each(waiting)

    def _wake_each(self, woken: list[tuple[float, Wake]]) -> None:
        """Futures resolved, then the plain entries answered together (:meth:`park`)."""
        parked: list[Plain] = []
        for _deadline, waiter in woken:
            if isinstance(waiter, tuple):
                parked.append(waiter)
            else:
                _wake(waiter)
        answer = self._answer
        if parked and answer is not None:  # set by every park
            _answer(answer, parked)

    def claimed(self, gen: str, owner: str | None) -> None:
        self.gen, self.owner = gen, owner

    def to_share(self, stored: Stored) -> None:
        self.share = stored

    def take_share(self) -> Stored | None:
        stored, self.share = self.share, None
        return stored

    def let_go(self) -> str | None:
        """The fetch lock's owner token, once (None: not held)."""
        owner, self.owner = self.owner, None
        return owner

    def took(self, upstream_seconds: float | None) -> None:
        self.upstream_seconds = upstream_seconds


# A plain entry of a flight's wake-up list (:meth:`Flight.park`), and what answers those
# woken together.
Plain = tuple[Any, ...]
Answer = Callable[[list[Plain]], None]
# A waiter of a flight: a future to resolve (:meth:`Flight.waiter`) or a plain entry
# (:meth:`Flight.park`).
Wake = asyncio.Future[None] | Plain


def _due(waiting: tuple[float, Wake]) -> float:
    return waiting[0]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # a waiter whose caller left is cancelled already
        waiter.set_result(None)


def _answer(answer: Answer, entries: list[Plain]) -> None:
    try:
        answer(entries)
    except Exception:  # a failure answering them must not cost the others their wake-up
        log.exception("flight_wake_failed")


# What a flight does (fetch and produce an outcome), and what follows once it is over
# (the tier stores in Redis, then lets go of the fetch lock; None: nothing follows, and no
# task is spawned for it).
Fly = Callable[[Flight], Awaitable[Outcome]]
Finish = Callable[[Flight], Awaitable[None] | None]


class Flights:
    """The flights in progress, one per key, and every task they spawn."""

    def __init__(self) -> None:
        self._by_key: dict[str, Flight] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[Flight]:
        return iter(list(self._by_key.values()))

    def get(self, key: str) -> Flight | None:
        return self._by_key.get(key)

    def start(
        self,
        key: str,
        request: ProxyRequest,
        sequence: int,
        fly: Fly,
        finish: Finish,
        *,
        alone: bool = False,
        unwanted: bool = False,
        eager: bool = False,
    ) -> Flight:
        """A new flight for ``key``; ``alone``: not joinable (a waiter that could not share);
        ``unwanted``: nobody waits for its head (a background revalidation); ``eager``: its
        task's first step runs now, within this call
        (:func:`~proxy.compat.tasks.eager_task`: its request is out before the loop reads on)."""
        flight = Flight(key, request, sequence)
        if not alone:
            self._by_key[key] = flight
        if unwanted:
            flight.starter_gone = True
            flight.head.add_done_callback(self._drop_unwanted)
        run = self._run(flight, fly, finish)
        self.spawn(eager_task(run) if eager else run)
        return flight

    async def join(self, flight: Flight, patience: float) -> Outcome:
        """The flight's whole result; raises GoAlone (not shareable) or TimeoutError.

        ``asyncio.wait_for(asyncio.shield(flight.done), patience)`` without the two futures,
        the task and the timer those add per waiter (most requests of a revalidated key are
        waiters): one future each (:meth:`Flight.waiter`); a waiter's timeout or
        cancellation leaves ``flight.done`` alone all the same."""
        done = flight.done
        if not done.done():
            await flight.waiter(patience)
            if not done.done():
                raise TimeoutError
        return done.result()

    def cancel(self, change: Change) -> None:
        """Flights whose key ``change`` covers store nothing, and later requests start anew."""
        for key, flight in list(self._by_key.items()):
            parts = parse_key(key)
            if parts is not None and change.covers(parts.account, parts.path):
                flight.cancelled = True
                del self._by_key[key]

    def spill(self, flight: Flight) -> None:
        """The flight's body goes on in a :class:`Tee`, which settles it."""
        flight.spilling = True

    def settle(self, flight: Flight, finish: Finish) -> None:
        """The flight is over: waiters that got nothing go alone, later requests start
        anew, and ``finish`` runs (after the answer went out: to Redis, then the lock goes)."""
        settle(flight.done, GoAlone())
        if self._by_key.get(flight.key) is flight:
            del self._by_key[flight.key]
        work = finish(flight)
        if work is not None:
            self.spawn(work)

    async def _run(self, flight: Flight, fly: Fly, finish: Finish) -> None:
        try:
            outcome = await fly(flight)
            settle(flight.head, outcome)
            if outcome.stream is None:
                flight.answered(outcome)  # its waiters woken in this step
        except BaseException as e:
            failure = e if isinstance(e, Exception) else errors.UpstreamUnreachable("cancelled")
            settle(flight.head, failure)
            settle(flight.done, failure)
            if not isinstance(e, Exception):
                raise
        finally:
            if not flight.spilling:
                self.settle(flight, finish)

    def abandon(self, flight: Flight) -> None:
        """The starter of ``flight`` left before reading its head: a stream the head brings is
        let go (a large body goes on to the store without it; an answer not storable gives
        its upstream connection back), as for a flight nobody waited for."""
        flight.starter_gone = True
        flight.head.add_done_callback(self._drop_unwanted)

    def _drop_unwanted(self, head: asyncio.Future[Outcome]) -> None:
        if not head.cancelled() and head.exception() is None:
            stream = head.result().stream
            if stream is not None:
                self.spawn(stream.release())

    def spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel every task, and those a cancelled flight spawns as it settles (its finish)."""
        for _ in range(3):  # a flight spawns one finish; a finish spawns nothing
            if not self.tasks:
                return
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*list(self.tasks), return_exceptions=True)


# Stores a spilled body once it is whole (size: its length): the waiters' outcome, or None
# (discarded; the waiters go alone).
Commit = Callable[[int], Awaitable[Outcome | None]]


class Tee:
    """A large body: the starter streams it while the flight writes it to a file.

    Chunks go to the file (up to ``max_size`` bytes) and to a bounded queue the starter
    reads; a starter that falls ``read_timeout`` behind is dropped and the file goes on.
    When the body is complete ``commit`` stores it; then the flight is settled.
    """

    def __init__(
        self,
        flights: Flights,
        flight: Flight,
        response: ProxyResponse,
        sink: BodySink,
        *,
        read_timeout: float,
        max_size: int,
    ) -> None:
        self.flights, self.flight, self.response, self.sink = flights, flight, response, sink
        self.read_timeout, self.max_size = read_timeout, max_size
        self.queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(TEE_DEPTH)
        flights.spill(flight)

    def start(
        self, prefix: list[bytes], chunks: AsyncIterator[bytes], commit: Commit, finish: Finish
    ) -> ProxyResponse:
        """Pump the body in a task of its own; the starter's answer streams it."""
        self.flights.spawn(self._pump(prefix, chunks, commit, finish))
        response = self.response
        return ProxyResponse(
            status=response.status,
            headers=CIMultiDict(response.headers),
            body=self._stream(),
            release=self._release,
            cache_status="MISS",
            upstream_status=response.status,
        )

    async def _feed(self, item: bytes | BaseException | None) -> None:
        if self.flight.starter_gone:
            return
        try:
            await asyncio.wait_for(self.queue.put(item), self.read_timeout)
        except TimeoutError:
            self.flight.starter_gone = True

    async def _pump(
        self, prefix: list[bytes], chunks: AsyncIterator[bytes], commit: Commit, finish: Finish
    ) -> None:
        sink, size = self.sink, self.sink.size
        try:
            for chunk in prefix:
                await self._feed(chunk)
            prefix.clear()
            async for chunk in chunks:
                size += len(chunk)
                if size <= self.max_size:
                    await sink.write(chunk)
                await self._feed(chunk)
            await self.response.release()
            await self._feed(None)
            outcome = await commit(size)
            if outcome is not None:
                settle(self.flight.done, outcome)
        except Exception as e:
            await sink.discard()
            await self._feed(e)
            settle(self.flight.done, e)
        finally:
            sink.abandon()  # cancelled mid-body: the open spill file goes too
            await self.response.release()
            self.flights.settle(self.flight, finish)

    async def _stream(self) -> AsyncIterator[bytes]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _release(self) -> None:
        self.flight.starter_gone = True
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                self.queue.get_nowait()
