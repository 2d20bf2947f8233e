"""Kounta's request budget: one token bucket and one fair queue per account.

Kounta allows a client about 180 requests a minute (60 with Basic auth) and answers
the excess with a plain-text 429. The :class:`Budget` layer sits just above the
upstream, so every request that reaches Kounta (revalidations and resends after a
token refresh included) takes a token first, while fresh cache hits never get here.

- :class:`~proxy.pipeline.gates.Bucket` (pure, the clock passed in) holds ``burst``
  tokens and refills at the account's rate. It also keeps the send times of the last
  window, so that no 60-second window (plus a margin for network delays) ever sees more
  than the rate: a plain token bucket would allow ``burst + rate`` in the first minute.
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
(:class:`~proxy.pipeline.gates.SharedGate`; GCRA for pace and burst plus a sliding log for
the window cap, one Lua script per request), so all replicas together stay under the rate,
and a 429 seen by one pauses all. The fair round robin over callers stays per replica. While
Redis is away each replica falls back to a local bucket at ``rate / shared.replicas``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.clock import Clock, MonotonicClock
from proxy.dates import retry_after, whole_seconds
from proxy.errors import RateLimited
from proxy.logs import debug, event, trace
from proxy.messages import Layer, ProxyRequest, ProxyResponse
from proxy.metrics import Metrics
from proxy.pipeline.gates import Bucket, Gate, LocalGate, Rate, SharedGate, capped
from proxy.settings import (
    RATES,
    AccountSettings,
    BudgetSettings,
    LiveAccount,
    Settings,
    applied,
    live_of,
)
from proxy.shared import Backend

__all__ = [
    "AccountBudget",
    "Bucket",
    "Budget",
    "Gate",
    "LocalGate",
    "Rate",
    "SharedGate",
    "capped",
    "pause_asked",
    "rate_for",
]

# Requests a minute when an account sets none (Kounta: ~180 with OAuth, ~60 with Basic).
DEFAULT_RATES: Mapping[str, int] = {"oauth": 180, "static": 180, "basic": 60}
RESENT_AFTER_429 = frozenset({"GET", "HEAD"})


def rate_for(account: AccountSettings | None, budget: BudgetSettings) -> Rate:
    """The account's own rate and burst, or its mode's defaults (burst: rate / 20)."""
    mode = account.mode if account is not None else "static"
    per_minute = (account.rate_per_minute if account else 0) or DEFAULT_RATES.get(mode, 180)
    burst = (account.burst if account else 0) or max(1, per_minute // 20)
    return Rate(per_minute, min(burst, per_minute), budget.window, budget.window_margin)


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
        await self.gate.close()


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
