"""Kounta's request budget: one token bucket and one fair queue per account.

Kounta allows a client about 180 requests a minute (60 with Basic auth) and answers
the excess with a plain-text 429. The :class:`Budget` layer sits just above the
upstream, so every request that reaches Kounta (revalidations and resends after a
token refresh included) takes a token first, while fresh cache hits never get here.

- :class:`Bucket` (pure, the clock passed in) holds ``burst`` tokens and refills at
  the account's rate. It also keeps the send times of the last window, so that no
  60-second window (plus a margin for network delays) ever sees more than the rate:
  a plain token bucket would allow ``burst + rate`` in the first minute.
- :class:`AccountBudget` makes requests wait for a token in a bounded queue, handing
  tokens out round robin over callers so one busy caller cannot starve the others.
  A request whose wait would pass its limit (``budget.max_wait``, never past the
  request's deadline) gets :class:`~proxy.errors.RateLimited`, which the cache may
  answer with a stale copy.
- A 429 from Kounta pauses the account's bucket until ``Retry-After`` or
  ``X-Ratelimit-Reset`` when given, else for a backoff that doubles with each 429. An
  asked pause is cut to ``budget.retry_after_max`` (default ``budget.backoff_max``): one
  answer saying ``Retry-After: 999999999`` must not stop an account for days.
  GET and HEAD are sent again when the pause ends within their limit; anything else
  is answered 429 (a request Kounta refused is never resent on a caller's behalf
  unless it is safe to).

Shared (``[shared] backend = "redis"``): the account's bucket lives in Redis instead
(:class:`SharedGate`; GCRA for pace and burst plus a sliding log for the window cap, one Lua
script per request), so all replicas together stay under the rate, and a 429 seen by one
pauses all. The fair round robin over callers stays per replica. While Redis is away each
replica falls back to a local bucket at ``rate / shared.replicas``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.clock import Clock, MonotonicClock
from proxy.dates import retry_after, whole_seconds
from proxy.errors import RateLimited
from proxy.logs import debug, event, trace
from proxy.messages import Layer, ProxyRequest, ProxyResponse
from proxy.metrics import Metrics
from proxy.settings import (
    RATES,
    AccountSettings,
    BudgetSettings,
    LiveAccount,
    Settings,
    applied,
    live_of,
)
from proxy.shared import Backend, SharedUnavailable
from proxy.shared.base import SharedBudget

# Requests a minute when an account sets none (Kounta: ~180 with OAuth, ~60 with Basic).
DEFAULT_RATES: Mapping[str, int] = {"oauth": 180, "static": 180, "basic": 60}
RESENT_AFTER_429 = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Rate:
    per_window: int
    burst: int
    window: float  # seconds (a minute, except in tests)
    margin: float  # seconds added to the window on our side

    @property
    def per_second(self) -> float:
        # Paced over the window plus its margin, so the pace alone never fills a window.
        return self.per_window / (self.window + self.margin)


def rate_for(account: AccountSettings | None, budget: BudgetSettings) -> Rate:
    """The account's own rate and burst, or its mode's defaults (burst: rate / 20)."""
    mode = account.mode if account is not None else "static"
    per_minute = (account.rate_per_minute if account else 0) or DEFAULT_RATES.get(mode, 180)
    burst = (account.burst if account else 0) or max(1, per_minute // 20)
    return Rate(per_minute, min(burst, per_minute), budget.window, budget.window_margin)


class Bucket:
    """Tokens for one account. Pure: every method takes the current (monotonic) time."""

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate.burst)
        self.updated = now
        self.sent: deque[float] = deque()
        self.paused_until = -math.inf
        self.backoff = 0.0

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(self.rate.burst), self.tokens + elapsed * self.rate.per_second)
        self.updated = max(self.updated, now)
        horizon = now - (self.rate.window + self.rate.margin)
        while self.sent and self.sent[0] <= horizon:
            self.sent.popleft()

    def ready_at(self, now: float) -> float:
        """The earliest time a token can be taken (``now`` if one is there)."""
        self._refill(now)
        at = now
        if self.tokens < 1:
            at = now + (1 - self.tokens) / self.rate.per_second
        if len(self.sent) >= self.rate.per_window:
            at = max(at, self.sent[-self.rate.per_window] + self.rate.window + self.rate.margin)
        return max(at, self.paused_until)

    def ready_after(self, now: float, ahead: int) -> float:
        """When a token can be taken once ``ahead`` requests queued first have had theirs:
        the pace (tokens now, then the refill rate) and the window cap, whichever is later.
        An estimate that errs late only when some of those ahead give up first."""
        at = self.ready_at(now)
        if ahead <= 0:
            return at
        start = max(now, self.paused_until)
        tokens = 1.0 if now < self.paused_until else self.tokens
        at = max(at, start + max(0.0, ahead + 1 - tokens) / self.rate.per_second)
        # The send that must have left the window first: already sent, or one of those ahead.
        first = len(self.sent) + ahead + 1 - self.rate.per_window
        if first > 0:
            span = self.rate.window + self.rate.margin
            if first <= len(self.sent):
                at = max(at, self.sent[first - 1] + span)
            else:
                at = max(at, self.ready_after(now, first - len(self.sent) - 1) + span)
        return at

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1
        self.sent.append(now)

    def record(self, now: float) -> None:
        """A send granted elsewhere (the shared budget): counted in this window, so a fallback
        to this bucket never adds its whole share on top of what was just sent."""
        self._refill(now)
        self.sent.append(now)

    def available(self, now: float) -> float:
        """Tokens that could be taken now (0 while paused or when the window is full)."""
        self._refill(now)
        if now < self.paused_until:
            return 0.0
        room = self.rate.per_window - len(self.sent)
        return max(0.0, min(self.tokens, float(room)))

    def pause(self, now: float, seconds: float | None, initial: float, longest: float) -> float:
        """Kounta said 429: stop for ``seconds`` (already capped, see :func:`capped`) or a
        growing backoff up to ``longest``; returns the pause."""
        if seconds is None:
            if now < self.paused_until:
                # Another request of the same wave: the pause already covers it.
                return self.paused_until - now
            self.backoff = initial if self.backoff == 0 else min(self.backoff * 2, longest)
            seconds = self.backoff
        seconds = max(0.0, seconds)
        self.paused_until = max(self.paused_until, now + seconds)
        # Start again with one request, then the steady pace: a burst would hit the wall again.
        self._refill(now)
        self.tokens = 1.0
        self.updated = max(self.updated, self.paused_until)
        return self.paused_until - now

    def recovered(self) -> None:
        self.backoff = 0.0


class Gate(Protocol):
    """Where an account's send slots come from: this process's bucket or the shared one."""

    bucket: Bucket

    async def try_take(self, now: float) -> float:
        """Take a slot: 0.0, else the seconds until one may be there (nothing taken)."""
        ...

    def ready_at(self, now: float) -> float:
        """The best known time a slot can be taken (no round trip)."""
        ...

    def ready_after(self, now: float, ahead: int) -> float:
        """The best known time a slot can be taken once ``ahead`` queued requests have had
        theirs (no round trip)."""
        ...

    async def pause(self, now: float, seconds: float) -> float:
        """Share a pause the local bucket has just taken (already capped); returns the pause
        in effect, which another replica's 429 may have made longer."""
        ...

    def retune(self, rate: Rate) -> None:
        """A reload changed the account's rate."""
        ...

    def mode(self) -> str: ...


class LocalGate:
    """Today's single process: the account's :class:`Bucket`, nothing shared."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    async def try_take(self, now: float) -> float:
        at = self.bucket.ready_at(now)
        if at > now:
            return at - now
        self.bucket.take(now)
        return 0.0

    def ready_at(self, now: float) -> float:
        return self.bucket.ready_at(now)

    def ready_after(self, now: float, ahead: int) -> float:
        return self.bucket.ready_after(now, ahead)

    async def pause(self, now: float, seconds: float) -> float:
        return seconds

    def retune(self, rate: Rate) -> None:
        self.bucket.rate = rate
        self.bucket.tokens = min(self.bucket.tokens, float(rate.burst))

    def mode(self) -> str:
        return "local"


class SharedGate:
    """The account's rate shared by every replica (Redis), with a local fallback bucket at
    this replica's share (``rate / replicas``) for while Redis is away. Sends granted by Redis
    are recorded in the fallback's window too, so a failover never adds a fresh share on top."""

    def __init__(
        self,
        account: str,
        rate: Rate,
        shared: SharedBudget,
        backend: Backend,
        replicas: int,
        now: float,
        longest: float = math.inf,
    ) -> None:
        self.account = account
        self.shared = shared
        self.backend = backend
        self.replicas = replicas
        # The cap on a pause (``budget.retry_after_max``), applied to the shared pause too:
        # another replica's 429 must not stop this one for longer than this one would.
        self.longest = longest
        self.rate = rate
        self.bucket = Bucket(self._share(rate), now)
        self.local = LocalGate(self.bucket)
        self._next_at = now

    def _share(self, rate: Rate) -> Rate:
        """This replica's part of the rate: what the fallback bucket allows while degraded."""
        return Rate(
            max(1, rate.per_window // self.replicas),
            max(1, rate.burst // self.replicas),
            rate.window,
            rate.margin,
        )

    @property
    def period(self) -> float:
        return self.rate.window + self.rate.margin

    async def try_take(self, now: float) -> float:
        if self.backend.up:
            try:
                wait = await self.shared.take(
                    self.account, self.rate.per_window, self.rate.burst, self.period
                )
            except SharedUnavailable:
                pass  # degraded: the backend logged it; this request uses the fallback
            else:
                if wait <= 0:
                    self.bucket.record(now)
                self._next_at = now + wait
                return wait
        return await self.local.try_take(now)

    def ready_at(self, now: float) -> float:
        if self.backend.up:
            return max(now, self._next_at)
        return self.bucket.ready_at(now)

    def ready_after(self, now: float, ahead: int) -> float:
        if not self.backend.up:
            return self.bucket.ready_after(now, ahead)
        # Redis holds the shared bucket and asking it costs a round trip per request, so
        # this falls back to a local estimate: the next slot Redis last named, then the
        # account's whole pace for the requests ahead. Other replicas' sends can only make
        # the real turn later, so this errs early: a request is never refused up front
        # that could have had its turn; one that cannot is refused at its limit instead.
        start = self.ready_at(now)
        if ahead <= 0:
            return start
        return start + ahead / self.rate.per_second

    async def pause(self, now: float, seconds: float) -> float:
        if not self.backend.up:
            return seconds
        try:
            left = await self.shared.pause(
                self.account, seconds, self.rate.per_window, self.rate.burst, self.period
            )
        except SharedUnavailable:
            return seconds
        # The shared pause may be another replica's (a longer Retry-After, or another cap):
        # cut like a local one, so no replica stops past its own budget.retry_after_max.
        honoured, cut = capped(left, self.longest)
        if cut:
            event(
                "shared_pause_capped",
                logging.WARNING,
                account=self.account,
                asked=round(left, 3),
                capped_at=self.longest,
            )
        left = honoured or 0.0
        self._next_at = max(self._next_at, now + left)
        return max(seconds, left)

    def retune(self, rate: Rate) -> None:
        # The shared script takes the rate with each call, so only the fallback share moves.
        self.rate = rate
        share = self._share(rate)
        self.bucket.rate = share
        self.bucket.tokens = min(self.bucket.tokens, float(share.burst))

    def mode(self) -> str:
        return "shared" if self.backend.up else "degraded"


def pause_asked(headers: Mapping[str, str], wall_now: float) -> float | None:
    """Seconds Kounta asked us to wait: ``Retry-After`` (seconds or HTTP date), else
    ``X-Ratelimit-Reset`` (epoch seconds, or seconds when small); None when neither says."""
    asked = retry_after(headers.get("Retry-After"), wall_now)
    if asked is not None:
        return asked
    reset = headers.get("X-Ratelimit-Reset", "").strip()
    try:
        value = float(reset)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    # Epoch timestamps are large; a small number is a delay in seconds.
    return value - wall_now if value > 1e9 else value


def capped(asked: float | None, longest: float) -> tuple[float | None, bool]:
    """The pause to honour for what Kounta asked, at most ``longest``; True when cut.

    ``Retry-After`` is the upstream's word, not a command: an account paused for an hour
    (or, as seen, 999999999 s) by one answer is an outage of our own making. Past
    ``longest`` the proxy asks again, and the backoff grows if Kounta still says 429.
    """
    if asked is None or asked <= longest:
        return asked, False
    return longest, True


# A turn this close to a request's limit is as good as too late: the dispatcher wakes a few
# milliseconds after a token is due on a busy loop, and such a request would wait its whole
# limit for a 429 instead of hearing it at once.
TURN_MARGIN = 0.05
# Why the effective rate is the configured one, by the gate's mode.
EFFECTIVE_REASONS = {
    "local": "the configured rate (this process alone)",
    "shared": "the configured rate, shared by every replica through Redis",
}


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]
    limit: float


class AccountBudget:
    """One account's bucket and its fair queue of waiting requests."""

    def __init__(
        self,
        name: str,
        rate: Rate,
        settings: BudgetSettings,
        clock: Clock,
        metrics: Metrics,
        gate: Gate | None = None,
    ) -> None:
        self.name = name
        self.rate = rate
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.gate: Gate = gate or LocalGate(Bucket(rate, clock.now()))
        # The local bucket: the whole budget (local), or the fallback share (shared).
        self.bucket = self.gate.bucket
        # caller -> its waiting requests; the order of keys is the round-robin order.
        self.queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self.waiting = 0
        self._dispatcher: asyncio.Task[None] | None = None
        self.upstream_429s = 0
        self.rejected = 0
        metrics.budget_tokens.labels(name).set_function(self.available)
        metrics.budget_queue.labels(name).set_function(lambda: self.waiting)
        metrics.budget_paused.labels(name).set_function(self.paused_for)
        metrics.budget_effective.labels(name).set_function(lambda: self.effective()[0])
        # Pre-create the counters' series so that rate() and alerts see a zero, not nothing.
        metrics.budget_upstream_429.labels(name)
        for reason in ("deadline", "queue_full"):
            metrics.budget_rejections.labels(name, reason)

    def retune(self, rate: Rate) -> None:
        """A reload changed the account's rate: keep what was sent, cap the tokens."""
        if rate == self.rate:
            return
        self.rate = rate
        self.gate.retune(rate)
        self.metrics.budget_limit.labels(self.name).set(rate.per_window)
        event("budget_rate_changed", account=self.name, rate=rate.per_window, burst=rate.burst)

    def available(self) -> float:
        return self.bucket.available(self.clock.now())

    def paused_for(self) -> float:
        return max(0.0, self.bucket.paused_until - self.clock.now())

    def limit_for(self, deadline: float) -> float:
        return min(deadline, self.clock.now() + self.settings.max_wait)

    async def acquire(self, caller: str, limit: float) -> float:
        """Wait for a token until ``limit`` (clock time); returns the seconds waited."""
        started = self.clock.now()
        if self.waiting == 0:
            wait = await self.gate.try_take(started)
            if wait <= 0:
                self.metrics.budget_wait.labels(self.name).observe(0.0)
                return 0.0
            at = turn = started + wait
        else:
            at = self.gate.ready_at(started)
            # The queue ahead counts: a request whose turn comes after its limit hears so
            # now, with the time its turn would have come, instead of waiting for nothing.
            turn = self.gate.ready_after(started, self.ahead_of(caller))
        if turn > limit - TURN_MARGIN:
            raise self._reject("deadline", turn - started)
        if self.waiting >= self.settings.queue_size:
            raise self._reject("queue_full", at - started)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), limit)
        self.queues.setdefault(caller, deque()).append(waiter)
        self.waiting += 1
        # The newcomer may be served before some who queued earlier (round robin): whoever
        # it pushes past their limit hears so now, not when the limit comes.
        self._recheck(started)
        self._expire(started)
        self._start_dispatcher()
        await waiter.future
        waited = self.clock.now() - started
        self.metrics.budget_wait.labels(self.name).observe(waited)
        return waited

    def ahead_of(self, caller: str) -> int:
        """Waiters served before a new request of ``caller``: round robin serves one per
        caller a round, so every other caller's first ``own + 1`` waiters at most."""
        own = len(self.queues.get(caller, ()))
        others = sum(min(len(q), own + 1) for c, q in self.queues.items() if c != caller)
        return own + others

    def _reject(self, reason: str, wait: float) -> RateLimited:
        self.rejected += 1
        self.metrics.budget_rejections.labels(self.name, reason).inc()
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
        """Hand out tokens to the waiters, one caller after another, until none wait."""
        try:
            while self.waiting:
                now = self.clock.now()
                self._recheck(now)
                self._expire(now)
                if not self.waiting:
                    break
                wait = await self.gate.try_take(now)
                if wait <= 0:
                    self._grant(now)
                    continue
                at = now + wait
                # A waiter that joins while we sleep has a limit after `at` (else it was
                # refused at once), so sleeping until the next token or the earliest
                # limit never lets a limit pass unnoticed.
                await self.clock.sleep(min(at, self._earliest_limit()) - now)
        finally:
            self._dispatcher = None

    def _grant(self, now: float) -> None:
        while self.queues:
            caller, queue = self.queues.popitem(last=False)
            waiter = queue.popleft()
            self.waiting -= 1
            if queue:
                self.queues[caller] = queue  # to the back of the round
            if not waiter.future.done():  # skip callers that went away
                waiter.future.set_result(None)
                return

    def _recheck(self, now: float) -> None:
        """Refuse at once each waiter whose turn, in round-robin order behind those now ahead
        of it, would come after its limit: later callers can be served before it, so the
        estimate it was admitted on may no longer hold."""
        rotation = list(self.queues.values())
        position = 0
        for depth in range(max((len(q) for q in rotation), default=0)):
            for queue in rotation:
                if depth >= len(queue) or queue[depth].future.done():
                    continue
                waiter = queue[depth]
                turn = self.gate.ready_after(now, position)
                if turn > waiter.limit - TURN_MARGIN:
                    waiter.future.set_exception(self._reject("deadline", turn - now))
                else:
                    position += 1

    def _expire(self, now: float) -> None:
        for caller in list(self.queues):
            queue = self.queues[caller]
            kept = deque(w for w in queue if not w.future.done() and w.limit > now)
            for waiter in queue:
                if not waiter.future.done() and waiter.limit <= now:
                    at = self.gate.ready_after(now, self.waiting - 1)
                    waiter.future.set_exception(self._reject("deadline", at - now))
            self.waiting -= len(queue) - len(kept)
            if kept:
                self.queues[caller] = kept
            else:
                del self.queues[caller]

    def _earliest_limit(self) -> float:
        return min((w.limit for q in self.queues.values() for w in q), default=math.inf)

    def upstream_limited(self, headers: Mapping[str, str], wall_now: float) -> float:
        """Kounta answered 429: pause the bucket; returns the seconds of the pause."""
        self.upstream_429s += 1
        self.metrics.budget_upstream_429.labels(self.name).inc()
        asked = pause_asked(headers, wall_now)
        honoured, cut = capped(asked, self.settings.longest_pause)
        seconds = self.bucket.pause(
            self.clock.now(), honoured, self.settings.backoff_initial, self.settings.backoff_max
        )
        fields: dict[str, Any] = {"account": self.name, "pause": round(seconds, 3)}
        if asked is not None:
            fields["asked"] = round(asked, 3)
        if cut:
            # Said at warning level: the operator learns Kounta asked for more than we gave.
            fields["capped_at"] = self.settings.longest_pause
            event("upstream_rate_limited", logging.WARNING, **fields, capped=True)
        else:
            event("upstream_rate_limited", **fields)
        return seconds

    def effective(self) -> tuple[int, str]:
        """What this process may send per window now, and why (``/budget``, the gauge)."""
        mode = self.gate.mode()
        if mode != "degraded":
            return self.rate.per_window, EFFECTIVE_REASONS.get(mode, mode)
        share = self.bucket.rate.per_window  # the fallback bucket runs at the share
        return share, (
            f"Redis is away: this replica's share, rate {self.rate.per_window} / shared.replicas"
        )

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
            "tokens": round(self.bucket.available(now), 3),
            "sent_in_window": len(self.bucket.sent),
            "waiting": self.waiting,
            "waiting_callers": len(self.queues),
            "paused_for": round(self.paused_for(), 3),
            "backoff": self.bucket.backoff,
            "upstream_429s": self.upstream_429s,
            "rejected": self.rejected,
        }

    async def close(self) -> None:
        task, self._dispatcher = self._dispatcher, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class Budget:
    """The layer: a token per upstream request, and what to do when Kounta says 429."""

    def __init__(
        self,
        inner: Layer,
        settings: Settings,
        metrics: Metrics,
        clock: Clock | None = None,
        wall: Callable[[], float] = time.time,
        shared: Backend | None = None,
        current: Callable[[], Mapping[str, LiveAccount]] | None = None,
    ) -> None:
        self.inner = inner
        self.settings = settings.budget
        # The budget's live slice, the accounts' live settings: a SIGHUP reload may change
        # their rates.
        started: Mapping[str, LiveAccount] = live_of(settings).accounts
        self.current = current or (lambda: started)
        self._tuned_to = started
        self.started = settings.accounts
        self.metrics = metrics
        self.clock = clock or MonotonicClock()
        self.wall = wall
        self.shared = shared
        self.replicas = settings.shared.replicas
        self.accounts = {
            name: self._budget_for(name, rate_for(a, settings.budget))
            for name, a in settings.accounts.items()
        }

    def _budget_for(self, name: str, rate: Rate) -> AccountBudget:
        gate: Gate | None = None
        backend = self.shared
        if backend is not None and backend.budget is not None:
            now = self.clock.now()
            gate = SharedGate(
                name, rate, backend.budget, backend, self.replicas, now, self.settings.longest_pause
            )
        return AccountBudget(name, rate, self.settings, self.clock, self.metrics, gate)

    def account(self, name: str) -> AccountBudget:
        live = self.current()
        if live is not self._tuned_to:  # one identity check per request; retuned once per reload
            self._tuned_to = live
            for known, budget in self.accounts.items():
                budget.retune(rate_for(self._live_account(known, live), self.settings))
        found = self.accounts.get(name)
        if found is None:  # not configured (auth refuses it first); budget it all the same
            rate = rate_for(None, self.settings)
            found = self.accounts[name] = self._budget_for(name, rate)
        return found

    def _live_account(self, name: str, live: Mapping[str, LiveAccount]) -> AccountSettings | None:
        """The account as started, with its live rates."""
        started, rates = self.started.get(name), live.get(name)
        return started if started is None or rates is None else applied(started, rates, RATES)

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        budget = self.account(request.account)
        limit = budget.limit_for(request.deadline)
        now = trace()
        while True:
            waited = await budget.acquire(request.caller, limit)
            now.budget_wait += waited
            debug(
                "budget_taken",
                request_id=request.request_id,
                account=request.account,
                caller=request.caller,
                waited_ms=round(waited * 1000, 2),
                mode=budget.gate.mode(),
            )
            response = await self.inner.send(request)
            if response.status != 429:
                budget.bucket.recovered()
                return response
            pause = budget.upstream_limited(response.headers, self.wall())
            await response.release()
            pause = await budget.gate.pause(self.clock.now(), pause)
            resend = request.method in RESENT_AFTER_429 and request.replayable
            if resend and self.clock.now() + pause <= limit:
                now.retries += 1
            else:
                raise RateLimited(
                    f"Kounta's rate limit was reached for account {request.account!r}; "
                    f"retry after {whole_seconds(pause)}s",
                    retry_after=whole_seconds(pause),
                )

    async def close(self) -> None:
        for account in self.accounts.values():
            await account.close()
