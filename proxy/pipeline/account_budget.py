"""One account's share of the budget: its gate (bucket) and its queue of waiting requests.

:class:`AccountBudget` makes requests wait for a token in a bounded queue, handing tokens out
by class (interactive, standard, batch: weighted fair queuing, see :mod:`proxy.pipeline.queue`)
and round robin over callers within a class, so one busy caller cannot starve the others and a
batch walk cannot hold up a till. Batch never takes the last ``budget.reserve`` of the burst and
window's cap, nor ``budget.headroom`` tokens. A request whose wait would pass its limit gets
:class:`~proxy.errors.RateLimited` at once. :meth:`AccountBudget.expected_wait` estimates a
wait without taking anything (:meth:`AccountBudget.estimate`: the fleet's state read first;
the estimates are :class:`proxy.pipeline.estimates.Estimates`).
The layer that drives it per request is :class:`proxy.pipeline.budget.Budget`."""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any

from proxy.clock import Clock
from proxy.collectors import Count, Observations
from proxy.dates import whole_seconds
from proxy.errors import RateLimited
from proxy.logs import debug, event
from proxy.pipeline.bucket import Bucket, Rate
from proxy.pipeline.classstats import ClassStats
from proxy.pipeline.estimates import OTHERS, Estimates, Waiter, Wanted
from proxy.pipeline.gates import Gate, LocalGate, SharedGate, Waiting, effective_rate
from proxy.pipeline.metrics import PipelineMetrics
from proxy.pipeline.pauses import capped, pause_asked, said
from proxy.pipeline.queue import (
    CLASSES,
    DEFAULT_CLASS,
    Grant,
    QueueState,
    decide,
    order,
    owed,
    served,
    weights_of,
)
from proxy.settings import BudgetSettings
from proxy.shared.base import SlotAsk, Taken

# At admission, a turn this close to a request's limit is as good as too late (the dispatcher
# wakes a few ms late on a busy loop: it would wait its whole limit for a 429). A request
# already waiting keeps its place while its turn stays before its limit (a late wake-up moves
# the later turns a little; one that waited most of its limit is better served than refused).
TURN_MARGIN = 0.05
# While Redis is away, the dispatcher asks again at least this often (the probe interval):
# the shared bucket serves a request once Redis is back, not when the fallback's window frees.
DEGRADED_ASK = 1.0


def _no_cap(caller: str) -> float:
    return 1.0


class AccountBudget(Estimates):
    """One account's bucket and its queue of waiting requests: classes by weight, callers
    round robin within a class (the discipline is :mod:`proxy.pipeline.queue`)."""

    def __init__(
        self,
        name: str,
        rate: Rate,
        settings: BudgetSettings,
        clock: Clock,
        metrics: PipelineMetrics,
        gate: Gate | None = None,
        shares: Callable[[str], float] = _no_cap,
    ) -> None:
        self.name = name
        self.rate = rate
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.gate: Gate = gate or LocalGate(Bucket(rate, clock.now()))
        self.bucket = self.gate.bucket  # the whole budget (local), or the fallback share (shared)
        self.shares = shares  # a caller's max_share (live settings: a reload may change it)
        self.queues = {k: OrderedDict() for k in CLASSES}  # class -> caller -> its waiters
        self.reclass(settings)  # the weights, told to the fleet's queue when shared
        self.starts, self.vtime = dict.fromkeys(CLASSES, 0.0), 0.0  # start tags, virtual time
        self.recent = deque()  # grants, for max_share
        self.waiting = 0
        if isinstance(self.gate, SharedGate):  # the fleet's queue has classes too
            self.gate.waiting = self.demand
        self._dispatcher: asyncio.Task[None] | None = None
        # Set when a request the hold does not hold back joins while the dispatcher sleeps for
        # one it holds back, or (shared) a class's first request joins.
        self._wake = asyncio.Event()
        self._held_back = False
        self._sleeping = False  # until its next ask (a refund, or a class new here, wakes it)
        self._credit = -math.inf  # until when a refunded token waits for the next request
        self._giving: set[asyncio.Task[bool]] = set()  # slots given back to the fleet (refund)
        self.upstream_429s = self.rejected = 0
        metrics.budget_tokens.labels(name).set_function(self.available)
        metrics.budget_queue.labels(name).set_function(lambda: self.waiting)
        metrics.budget_paused.labels(name).set_function(self.paused_for)
        metrics.budget_effective.labels(name).set_function(lambda: self.effective()[0])
        # Pre-create the counters' series so that rate() and alerts see a zero, not nothing.
        metrics.budget_upstream_429.labels(name)
        for reason in ("deadline", "queue_full"):
            metrics.budget_rejections.labels(name, reason)
        # Per class: served, refused, recent waits and sends (GET /budget).
        self.stats = ClassStats(self._span)
        # A class's wait and served children, looked up once (each request served counts
        # in both; labels() takes a lock and builds its key every time).
        self._counted: dict[str, tuple[Observations, Count]] = {}
        for klass in CLASSES:
            self._counted[klass] = (
                metrics.budget_wait.labels(name, klass),
                metrics.budget_served.labels(name, klass),
            )
            metrics.budget_refused.labels(name, klass)

    def retune(self, rate: Rate) -> None:
        """A reload changed the account's rate: keep what was sent, cap the tokens."""
        if rate == self.rate:
            return
        self.rate = rate
        self.gate.retune(rate)
        self.metrics.budget_limit.labels(self.name).set(rate.per_window)
        event("budget_rate_changed", account=self.name, rate=rate.per_window, burst=rate.burst)

    def reclass(self, settings: BudgetSettings) -> None:
        """A reload may have changed the weights or the reserve."""
        self.settings = settings
        self.weights = weights_of(settings.weights)
        if isinstance(self.gate, SharedGate):
            self.gate.weights, self.gate.hold = self._weights_tuple(), self.hold_for("batch")

    def _weights_tuple(self) -> tuple[float, float, float]:
        w = self.weights
        return (w["interactive"], w["standard"], w["batch"])

    def by_class(self) -> tuple[int, int, int]:
        """This process's waiting requests by class (interactive, standard, batch)."""
        return self.demand()[0]

    def demand(self) -> Waiting:
        """This process's waiting requests by class, and how long the oldest of each has
        waited (what the fleet's queue is told)."""
        now = self.clock.now()
        counts, ages = [], []
        for klass in CLASSES:
            live = [w for q in self.queues[klass].values() for w in q if not w.future.done()]
            counts.append(len(live))
            ages.append(max(0.0, now - min((w.started for w in live), default=now)))
        return (counts[0], counts[1], counts[2]), (ages[0], ages[1], ages[2])

    def available(self) -> float:
        return self.bucket.available(self.clock.now())

    def paused_for(self) -> float:
        return max(0.0, self.bucket.paused_until - self.clock.now())

    def limit_for(self, deadline: float) -> float:
        return min(deadline, self.clock.now() + self.settings.max_wait)

    def hold_for(self, klass: str, state: QueueState | None = None) -> tuple[float, int]:
        """What ``klass`` leaves in the bucket: batch its reserve and headroom (unless owed)."""
        if klass != "batch":
            return (0.0, 0)
        waived = state is not None and owed(state, klass)
        return (self.settings.reserve, 0 if waived else self.settings.headroom)

    async def estimate(self, caller: str, klass: str = DEFAULT_CLASS) -> float:
        """:meth:`expected_wait` on the fleet's state as it is now: shared, the gate reads it
        first (one read-only round trip, at most every ``LOOK_SECONDS``, shared by callers at
        once), so a replica whose own queue is empty still sees the bucket other replicas
        drain and the requests they hold."""
        await self.gate.look(self.clock.now())
        return self.expected_wait(caller, klass)

    async def acquire(
        self, caller: str, limit: float, klass: str = DEFAULT_CLASS, wanted: Wanted | None = None
    ) -> float:
        """Wait for a token until ``limit`` (clock time); returns the seconds waited.
        ``wanted``: a background request, dropped (:class:`~proxy.errors.RateLimited`, not
        counted as a refusal) once it says it is no longer useful or cannot be served in
        time."""
        started = self.clock.now()
        background = wanted is not None
        if wanted is not None and not wanted():
            raise self._reject("dropped", 0.0, klass, background)
        if self.waiting == 0 and self._credited(started):
            self._served(klass, 0.0, started)
            return 0.0
        if self.waiting == 0:
            wait = await self.gate.try_take(started, klass, *self.hold_for(klass))
            if wait <= 0:
                self._served(klass, 0.0, started)
                return 0.0
            at = started + wait
            # Shared: other replicas' waiting requests may come first (the fleet's queue).
            turn = max(at, self.gate.ready_after(started, self.ahead_of(caller, klass)))
        else:
            at = self.gate.ready_at(started)
            # The queue ahead counts: a request whose turn comes after its limit hears so
            # now, with the time its turn would have come, instead of waiting for nothing.
            turn = self.gate.ready_after(started, self.ahead_of(caller, klass))
        if turn > limit - TURN_MARGIN:
            raise self._reject("deadline", turn - started, klass, background)
        if self.waiting >= self.settings.queue_size:
            raise self._reject("queue_full", at - started, klass, background)
        future = asyncio.get_running_loop().create_future()
        waiter = Waiter(future, limit, started, klass, wanted)
        first = not self.queues[klass]
        self._enqueue(klass, caller, waiter)
        # Shared, the fleet learns of a class waiting here only when the dispatcher next asks
        # Redis: the first of its class wakes it, or another replica's later request (of this
        # class or a lower one) may take the slots until the dispatcher's sleep ends.
        if (self._held_back and klass != "batch") or (
            self._sleeping and first and self._fleet_classed()
        ):
            self._wake.set()
        # The newcomer may be served before some who queued earlier (a higher class, or round
        # robin): whoever it pushes past their limit hears so now, not when the limit comes.
        self._recheck(started)
        self._expire(started)
        self._start_dispatcher()
        await waiter.future
        now = self.clock.now()
        waited = now - started
        self._served(klass, waited, now)
        return waited

    def refund(self) -> asyncio.Task[bool] | None:
        """A token taken but not spent (a background refresh, or a flight's slot taken with
        its fetch lock, that found the key fetched meanwhile): the next waiting request here
        gets it, or with none waiting the next within one pacing interval (then it lapses);
        shared with none waiting here, back to the fleet instead (returns that call's task)."""
        gate = self.gate
        if not self.waiting and isinstance(gate, SharedGate) and gate.mode() == "shared":
            task = asyncio.get_running_loop().create_task(gate.give_back())
            self._giving.add(task)
            task.add_done_callback(self._giving.discard)
            return task
        self._credit_slot(self.clock.now())
        if self.waiting:  # the dispatcher takes it next (woken if it sleeps)
            if self._sleeping:
                self._wake.set()
            self._start_dispatcher()
        return None

    def ahead(self, klass: str) -> SlotAsk | None:
        """A slot to ask with a flight's fetch lock (shared; nothing queued or credited here)."""
        now = self.clock.now()
        if self.waiting or self._credit >= now or not isinstance(self.gate, SharedGate):
            return None
        return self.gate.ahead(klass, now)

    def took_ahead(self, slot: SlotAsk, taken: Taken) -> bool:
        """Redis's answer to :meth:`ahead`'s ask; a slot taken is served as one taken at once."""
        now = self.clock.now()
        if not isinstance(self.gate, SharedGate) or not self.gate.took_ahead(slot, taken, now):
            return False
        self._served(slot.ask.klass, 0.0, now)
        return True

    def _credit_slot(self, now: float) -> None:
        """A slot nobody here took: the next request's within a pacing interval."""
        self._credit = now + self.rate.window / self.rate.per_window

    def _credited(self, now: float) -> bool:
        """Whether a refunded token is at hand (it is then taken)."""
        if self._credit < now:
            return False
        self._credit = -math.inf
        return True

    def taken_at_once(self, klass: str, wanted: Wanted | None) -> bool:
        """Whether a token was taken now without waiting, as :meth:`acquire` takes one when
        nothing waits here: a refunded one, or (local) one from the bucket; served and
        counted as that. False: nothing taken, :meth:`acquire` decides (shared, a request
        waiting, a background request whose ``wanted`` it asks, or no token at hand). No
        coroutine for the common case of a free local budget (a revalidation's flight)."""
        if self.waiting or wanted is not None:
            return False
        now = self.clock.now()
        if not self._credited(now):
            gate = self.gate
            if type(gate) is not LocalGate or gate.took(now, *self.hold_for(klass)) > 0:
                return False
        self._served(klass, 0.0, now)
        return True

    def _served(self, klass: str, waited: float, now: float) -> None:
        counted = self._counted.get(klass)
        if counted is None:
            counted = (
                self.metrics.budget_wait.labels(self.name, klass),
                self.metrics.budget_served.labels(self.name, klass),
            )
        counted[0].observe(waited)
        counted[1].inc()
        self.stats.served(klass, waited, now)

    def _enqueue(self, klass: str, caller: str, waiter: Waiter) -> None:
        queues = self.queues[klass]
        if not queues:  # the class joins at the current virtual time: no credit saved up
            self.starts[klass] = max(self.starts[klass], self.vtime)
        queues.setdefault(caller, deque()).append(waiter)
        self.waiting += 1

    def _reject(
        self, reason: str, wait: float, klass: str, background: bool = False
    ) -> RateLimited:
        if background:  # no caller hears it: neither a refusal nor a rejection counted
            debug("budget_dropped", account=self.name, reason=reason, wait=round(wait, 3))
            return RateLimited(f"A background request was dropped ({reason})", retry_after=1)
        self.rejected += 1
        self.stats.refused[klass] += 1
        self.metrics.budget_rejections.labels(self.name, reason).inc()
        self.metrics.budget_refused.labels(self.name, klass).inc()
        # A deadline's wait already counts the queue ahead; a full queue drains at the pace.
        backlog = self.waiting / self.rate.per_second if reason == "queue_full" else 0.0
        retry_after = whole_seconds(max(wait, backlog))
        if reason == "queue_full":
            text = f"Too many requests are waiting for account {self.name!r}'s rate budget"
        else:
            text = (
                f"Kounta's rate limit for account {self.name!r} leaves no room for this "
                "request before its deadline"
            )
        event("budget_rejected", account=self.name, reason=reason, retry_after=retry_after)
        return RateLimited(f"{text}; retry after {retry_after}s", retry_after=retry_after)

    def _start_dispatcher(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def _dispatch(self) -> None:
        """Hand out tokens to the waiters as the discipline orders them, until none wait."""
        try:  # none left waiting: Redis must not go on counting those that left unserved
            while self.waiting or (await self._forget() and self.waiting):
                now = self.clock.now()
                self._recheck(now)
                self._expire(now)
                state = self.state(now)
                grant = decide(state, now)
                if grant is None:  # none live: the loop's test drops the demand told to Redis
                    if self.waiting:
                        break
                    continue
                hold = self.hold_for(grant.klass, state)
                if self._credited(now):
                    wait = 0.0
                else:
                    wait = await self.gate.try_take(now, grant.klass, *hold)
                held_back = False
                if wait > 0 and (any(hold) or self._fleet_classed()):
                    grant, wait, held_back = await self._other_class(state, now, grant, wait)
                if wait <= 0:
                    self._grant(grant, now)
                    continue
                # A waiter that joins while we sleep has a limit after `at` (else it was
                # refused at once), so sleeping until the next token or the earliest
                # limit never lets a limit pass unnoticed.
                until = min(now + wait, self._earliest_limit())
                if isinstance(self.gate, SharedGate) and not self._fleet_classed():
                    # Degraded: the fallback share's wait may be long (the replica's Redis
                    # sends fill its window); Redis may be back within its next probe.
                    until = min(until, now + DEGRADED_ASK)
                await self._sleep(until - now, held_back)
        finally:
            self._dispatcher = None

    async def _forget(self) -> bool:
        return await self.gate.forget() if isinstance(self.gate, SharedGate) else False

    def _fleet_classed(self) -> bool:
        """Whether slots come from the fleet's discipline (Redis), which may give the next slot
        to another class than the one this replica's own discipline picked."""
        return isinstance(self.gate, SharedGate) and self.gate.mode() == "shared"

    async def _other_class(
        self, state: QueueState, now: float, grant: Grant, wait: float
    ) -> tuple[Grant, float, bool]:
        """The first pick's class gets no slot now: the reserve holds batch back, or (shared)
        the fleet's discipline gives the slot to another class. This replica's other waiting
        classes may still go, in its discipline's order (without this a replica whose own
        order and the fleet's disagree asks for the wrong class until its requests time out,
        and the slot stays unused). Returns the grant, the wait (0: taken) and whether only
        batch waits here, held back by the reserve."""
        tried = {grant.klass}
        first = wait
        while (other := decide(state, now, frozenset(tried))) is not None:
            taken = await self.gate.try_take(now, other.klass, *self.hold_for(other.klass))
            if taken <= 0:
                return other, 0.0, False
            tried.add(other.klass)
            first = min(first, taken)
        return grant, first, len(tried) == 1 and any(self.hold_for(grant.klass, state))

    async def _sleep(self, seconds: float, held_back: bool) -> None:
        self._held_back = held_back
        self._sleeping = True
        self._wake.clear()
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._held_back = self._sleeping = False
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    def _grant(self, grant: Grant, now: float) -> None:
        if grant.caller not in self.queues[grant.klass]:  # left while the slot was asked for:
            self._credit_slot(now)  # the next one has it
            return
        new = served(self.state(now), grant, now)
        self.starts[grant.klass] = new.classes[grant.klass].start
        self.vtime = new.vtime
        self.recent.append((now, grant.klass, grant.caller))
        while self.recent and self.recent[0][0] <= now - self._span():
            self.recent.popleft()
        queues = self.queues[grant.klass]
        queue = queues.pop(grant.caller)
        while queue:
            waiter = queue.popleft()
            self.waiting -= 1
            if waiter.future.done():  # skip requests whose caller went away
                continue
            if waiter.unwanted():  # a background request no longer useful: the next one
                waiter.future.set_exception(self._reject("dropped", 0.0, waiter.klass, True))
                continue
            waiter.future.set_result(None)
            break
        else:  # all of them left meanwhile: the next one has the slot
            self._credit_slot(now)
        if queue:
            queues[grant.caller] = queue  # to the back of the class's round

    def _recheck(self, now: float) -> None:
        """Refuse at once each waiter whose turn, in the discipline's order behind those now
        ahead of it, would come after its limit: requests that joined later can be served
        before it, so the estimate it was admitted on may no longer hold."""
        lines = {
            (klass, caller): [w for w in queue if not w.future.done()]
            for klass, queues in self.queues.items()
            for caller, queue in queues.items()
        }
        taken: dict[tuple[str, str], int] = {}
        position = 0
        for grant in order(self.state(now, fleet=True), now):
            if grant.caller == OTHERS:  # another replica's request: ahead, not ours to refuse
                position += 1
                continue
            key = (grant.klass, grant.caller)
            index = taken.get(key, 0)
            taken[key] = index + 1
            waiter = lines[key][index]
            turn = self.gate.ready_after(now, position)
            if turn > waiter.limit:
                refusal = self._reject("deadline", turn - now, waiter.klass, bool(waiter.wanted))
                waiter.future.set_exception(refusal)
            else:
                position += 1

    def _expire(self, now: float) -> None:
        for queues in self.queues.values():
            for caller in list(queues):
                queue = queues[caller]
                for waiter in queue:
                    if waiter.future.done():
                        continue
                    if waiter.limit <= now:
                        at = self.gate.ready_after(now, self.waiting - 1)
                        background = waiter.wanted is not None
                        refusal = self._reject("deadline", at - now, waiter.klass, background)
                        waiter.future.set_exception(refusal)
                    elif waiter.unwanted():  # a background request no longer useful
                        waiter.future.set_exception(self._reject("dropped", 0, waiter.klass, True))
                kept = deque(w for w in queue if not w.future.done())
                self.waiting -= len(queue) - len(kept)
                if kept:
                    queues[caller] = kept
                else:
                    del queues[caller]

    def _earliest_limit(self) -> float:
        return min(
            (w.limit for qs in self.queues.values() for q in qs.values() for w in q),
            default=math.inf,
        )

    def upstream_limited(self, headers: Mapping[str, str], wall_now: float) -> float:
        """Kounta answered 429: pause the bucket; returns the seconds of the pause."""
        self.upstream_429s += 1
        self.metrics.budget_upstream_429.labels(self.name).inc()
        asked = pause_asked(headers, wall_now)
        honoured, cut = capped(asked, self.settings.longest_pause)
        seconds = self.bucket.pause(
            self.clock.now(), honoured, self.settings.backoff_initial, self.settings.backoff_max
        )
        said(self.name, seconds, asked, self.settings.longest_pause if cut else None)
        return seconds

    def effective(self) -> tuple[int, str]:
        """What this process may send per window now, and why (``/budget``, the gauge)."""
        return effective_rate(self.gate, self.rate)

    def status(self) -> dict[str, Any]:
        now = self.clock.now()
        effective, why = self.effective()
        return {
            "rate": self.rate.per_window,
            "effective_rate": effective,
            "effective_reason": why,
            "mode": self.gate.mode(),
            "window_seconds": self.rate.window,
            "burst": self.rate.burst,
            "reserve": self.settings.reserve,
            "headroom": self.settings.headroom,
            "tokens": round(self.bucket.available(now), 3),
            "sent_in_window": len(self.bucket.sent),
            "waiting": self.waiting,
            "waiting_callers": len({c for qs in self.queues.values() for c in qs}),
            "paused_for": round(self.paused_for(), 3),
            "backoff": self.bucket.backoff,
            "upstream_429s": self.upstream_429s,
            "rejected": self.rejected,
            "classes": self.stats.status(now, self.by_class(), self.weights),
        }

    async def close(self) -> None:
        task, self._dispatcher = self._dispatcher, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*self._giving, return_exceptions=True)
        await self.gate.close()
