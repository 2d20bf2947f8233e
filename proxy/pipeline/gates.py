"""Where an account's send slots come from: the pure :class:`Bucket` (token bucket plus the
window's log), this process's :class:`LocalGate`, and the fleet's :class:`SharedGate` (Redis).
What a 429's headers ask for is :mod:`proxy.pipeline.pauses`.

The bucket (pure, the clock passed in) holds ``burst`` tokens and refills at the account's
rate. It also keeps the send times of the last window, so that no 60-second window (plus a
margin for network delays) ever sees more than the rate: a plain token bucket would allow
``burst + rate`` in the first minute. The shared gate keeps the bucket in Redis (GCRA for
pace and burst plus a sliding log for the window cap, one Lua script per request), so all
replicas together stay under the rate, and a 429 seen by one pauses all; while Redis is away
each replica falls back to a local bucket at ``rate / shared.replicas``.

The queue that decides who gets the next slot is :mod:`proxy.pipeline.queue` (pure) driven by
:mod:`proxy.pipeline.budget`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from proxy.logs import event
from proxy.pipeline.pauses import capped
from proxy.settings import RATES, AccountSettings, BudgetSettings, LiveAccount, applied
from proxy.shared import Backend, SharedUnavailable
from proxy.shared.base import ClassedAsk, SharedBudget, SlotAsk, Taken

# The classes in the order the shared script counts them (proxy.pipeline.queue.CLASSES).
CLASS_ORDER = ("interactive", "standard", "batch")
# A replica's waiting requests by class, and how long the oldest of each has waited.
Waiting = tuple[tuple[int, int, int], tuple[float, float, float]]
# Seconds a replica's registered demand stands without being refreshed (at least).
DEMAND_TTL = 2.0

# Requests a minute when an account sets none (Kounta: ~180 with OAuth, ~60 with Basic).
DEFAULT_RATES: Mapping[str, int] = {"oauth": 180, "static": 180, "basic": 60}


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


def headroom_for(rate: Rate, headroom: int) -> int:
    """The tokens of the burst a batch request leaves (``budget.headroom``), at most all but
    one: it waits for one more token at hand, and its window's spread and cap are that many
    sends lower, so a request of another class arriving while batch keeps the bucket spent
    finds them at hand."""
    return max(0, min(headroom, rate.burst - 1))


def live_rate(
    account: AccountSettings | None, rates: LiveAccount | None, budget: BudgetSettings
) -> Rate:
    """:func:`rate_for` the account as started with its live rates (a reload may change them)."""
    if account is not None and rates is not None:
        account = applied(account, rates, RATES)
    return rate_for(account, budget)


# Why the effective rate is the configured one, by the gate's mode.
EFFECTIVE_REASONS = {
    "local": "the configured rate (this process alone)",
    "shared": "the configured rate, shared by every replica through Redis",
}


def effective_rate(gate: Gate, rate: Rate) -> tuple[int, str]:
    """What this process may send per window through ``gate`` now, and why."""
    mode = gate.mode()
    if mode != "degraded":
        return rate.per_window, EFFECTIVE_REASONS.get(mode, mode)
    share = gate.bucket.rate.per_window  # the fallback bucket runs at the share
    return share, f"Redis is away: this replica's share, rate {rate.per_window} / shared.replicas"


class Bucket:
    """Tokens for one account. Pure: every method takes the current (monotonic) time."""

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate.burst)
        self.updated = now
        self.sent: deque[float] = deque()
        # _spread's last answer and what it was for (the rate, cap, and the log's length, first
        # and last send): the queue asks for every waiter's turn while the log stays the same.
        self._spread_memo: tuple[tuple[Rate, int, int, int, float, float], float] | None = None
        self.paused_until = -math.inf
        self.backoff = 0.0

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(self.rate.burst), self.tokens + elapsed * self.rate.per_second)
        self.updated = max(self.updated, now)
        horizon = now - (self.rate.window + self.rate.margin)
        while self.sent and self.sent[0] <= horizon:
            self.sent.popleft()

    def ready_at(self, now: float, reserve: float = 0.0, headroom: int = 0) -> float:
        """The earliest time a token can be taken (``now`` if one is there), leaving the
        ``reserve`` (a fraction) of the burst's tokens and of the window's cap untouched, and
        ``headroom`` tokens of the burst (:func:`headroom_for`: the burst's and the spread's)."""
        self._refill(now)
        at = now
        burst, keep = self.rate.burst, headroom_for(self.rate, headroom)
        need = min(float(burst), 1 + reserve * burst + keep)
        if self.tokens < need:
            at = now + (need - self.tokens) / self.rate.per_second
        cap = max(1, math.floor(self.rate.per_window * (1 - reserve) + 1e-9))
        return max(at, self._spread(max(1, cap - keep), burst - keep), self.paused_until)

    def _spread(self, cap: int, burst: int) -> float:
        """When the window's log lets the next send go: the k-th latest send at least
        ``(k - burst) / (cap - burst)`` of the window ago, for each k past the burst up to
        ``cap`` (at ``cap`` the whole window: the hard cap). So under constant demand a burst
        is paid back by a slightly slower pace while it leaves the window, not by a stall of
        ``burst`` pace intervals a window later that every waiting request sits through."""
        sent, span = self.sent, self.rate.window + self.rate.margin
        n = len(sent)
        if n == 0:
            return -math.inf
        key = (self.rate, cap, burst, n, sent[0], sent[-1])
        if self._spread_memo is not None and self._spread_memo[0] == key:
            return self._spread_memo[1]
        at = sent[-cap] + span if n >= cap else -math.inf
        for k in range(burst + 1, min(n, cap - 1) + 1):  # none when the burst is the cap
            at = max(at, sent[n - k] + (k - burst) * span / (cap - burst))
        self._spread_memo = (key, at)
        return at

    def ready_after(self, now: float, ahead: int) -> float:
        """When a token can be taken once ``ahead`` requests queued first have had theirs:
        the pace (tokens now, then the refill rate) and the window cap, whichever is later.
        An estimate that errs late only when some of those ahead give up first."""
        at = soonest = self.ready_at(now)
        if ahead <= 0:
            return at
        start = max(now, self.paused_until)
        tokens = 1.0 if now < self.paused_until else self.tokens
        at = max(at, start + max(0.0, ahead + 1 - tokens) / self.rate.per_second)
        # The send that must have left the window first: already sent, or one of those ahead.
        first = len(self.sent) + ahead + 1 - self.rate.per_window
        span = self.rate.window + self.rate.margin
        if first > 0:
            if first <= len(self.sent):
                at = max(at, self.sent[first - 1] + span)
            else:
                at = max(at, self.ready_after(now, first - len(self.sent) - 1) + span)
        return max(at, self._spread_ahead(soonest, ahead, span))

    def _spread_ahead(self, first: float, ahead: int, span: float) -> float:
        """The burst's payback (:meth:`_spread`) for the send behind ``ahead`` others: its
        k-th latest send, whether one already sent or one of those ahead (the first of them
        at ``first`` at the earliest), at least ``(k - burst) / (cap - burst)`` of the window
        before it."""
        cap, burst = self.rate.per_window, self.rate.burst
        if cap <= burst:
            return -math.inf
        step, m = span / (cap - burst), ahead + 1
        at = first
        if ahead < cap:  # the first of those ahead is the ahead-th latest (at cap: the cap's)
            at += max(0, ahead - burst) * step
        sent, n = self.sent, len(self.sent)
        for i in range(max(1, burst - ahead + 1), min(n, cap - m) + 1):
            at = max(at, sent[n - i] + (ahead + i - burst) * step)  # the (ahead + i)-th latest
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


# How often a replica shares its pause again while it lasts (a restored Redis forgot it).
KEEP_SECONDS = 1.0
# How long the fleet's state read for an estimate (shared) stands before it is read again.
LOOK_SECONDS = 0.1


class Gate(Protocol):
    """Where an account's send slots come from: this process's bucket or the shared one."""

    bucket: Bucket

    async def try_take(
        self, now: float, klass: str = "standard", reserve: float = 0.0, headroom: int = 0
    ) -> float:
        """Take a slot for a request of ``klass``, leaving ``reserve`` (a fraction of the burst
        and of the window's cap) and ``headroom`` (tokens of the burst) untouched: 0.0, else
        the seconds until one may be there (nothing taken)."""
        ...

    def ready_at(self, now: float) -> float:
        """The best known time a slot can be taken (no round trip)."""
        ...

    def ready_after(self, now: float, ahead: int) -> float:
        """The best known time a slot can be taken once ``ahead`` queued requests have had
        theirs (no round trip)."""
        ...

    async def look(self, now: float) -> None:
        """Bring what :meth:`ready_after` and the fleet's waiting requests say up to date
        before an estimate: shared, one read-only round trip at most every
        :data:`LOOK_SECONDS` (callers at once share it); local, nothing to do."""
        ...

    async def pause(self, now: float, seconds: float) -> float:
        """Share a pause the local bucket has just taken (already capped); returns the pause
        in effect, which another replica's 429 may have made longer."""
        ...

    def retune(self, rate: Rate) -> None:
        """A reload changed the account's rate."""
        ...

    async def spare(self, now: float, tokens: float) -> bool:
        """Room for work nobody waits for: at least ``tokens`` at hand and, shared, no
        request waiting anywhere in the fleet (nothing taken)."""
        ...

    def mode(self) -> str: ...

    async def close(self) -> None: ...


class LocalGate:
    """Today's single process: the account's :class:`Bucket`, nothing shared."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    async def try_take(
        self, now: float, klass: str = "standard", reserve: float = 0.0, headroom: int = 0
    ) -> float:
        at = self.bucket.ready_at(now, reserve, headroom)
        if at > now:
            return at - now
        self.bucket.take(now)
        return 0.0

    def ready_at(self, now: float) -> float:
        return self.bucket.ready_at(now)

    def ready_after(self, now: float, ahead: int) -> float:
        return self.bucket.ready_after(now, ahead)

    async def look(self, now: float) -> None:
        return None

    async def pause(self, now: float, seconds: float) -> float:
        return seconds

    def retune(self, rate: Rate) -> None:
        self.bucket.rate = rate
        self.bucket.tokens = min(self.bucket.tokens, float(rate.burst))

    def mode(self) -> str:
        return "local"

    async def spare(self, now: float, tokens: float) -> bool:
        return self.bucket.available(now) >= tokens

    async def close(self) -> None:
        return None


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
        # The end of the last pause this replica shared: a Redis restored from an older
        # snapshot (or emptied) forgets it, and it is shared again (never backwards), by
        # the next take or by the keeper, once a second while the pause lasts.
        self._paused_until = now
        self._keeper: asyncio.Task[None] | None = None
        # Set by the account's queue: its waiting requests by class, and the classes' weights.
        # Without them the fleet has no classes (one shared bucket, first come first served).
        self.waiting: Callable[[], Waiting] | None = None
        self.weights: tuple[float, float, float] = (6.0, 3.0, 1.0)
        # Batch's reserve and headroom, told whatever the class asking: the script gives a slot
        # batch's hold keeps from batch to another class at once.
        self.hold: tuple[float, int] = (0.0, 0)
        # The whole fleet's waiting requests by class, as Redis last said.
        self.fleet: tuple[int, int, int] = (0, 0, 0)
        # This replica's part of it, as told in the same call (a request not queued yet
        # included): the fleet less this is the other replicas' waiting requests.
        self.mine: tuple[int, int, int] = (0, 0, 0)
        # The last read of the fleet's state for an estimate (look): when, and the read
        # under way that callers at once share.
        self._looked = -math.inf
        self._looking: asyncio.Task[None] | None = None
        # The sends Redis logged for the slots this replica took last (give_back).
        self.granted: deque[str] = deque(maxlen=16)

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

    async def try_take(
        self, now: float, klass: str = "standard", reserve: float = 0.0, headroom: int = 0
    ) -> float:
        if self.backend.up:
            try:
                wait = await self._take(klass, reserve, headroom)
                wait = await self._forgotten(now, wait)
            except SharedUnavailable:
                pass  # degraded: the backend logged it; this request uses the fallback
            else:
                if wait <= 0:
                    self.bucket.record(now)
                self._next_at = now + wait
                return wait
        return await self.local.try_take(now, klass, reserve, headroom)

    async def _forgotten(self, now: float, wait: float) -> float:
        """The wait, or the pause this replica shared if Redis no longer has it (shared
        again, so every replica honours it)."""
        left = self._paused_until - now
        if left <= wait + 0.5:
            return wait
        event("shared_pause_restored", logging.WARNING, account=self.account, pause=round(left, 3))
        if wait <= 0:  # the slot Redis just granted is not used: the pause comes first
            self.bucket.record(now)
        return max(
            wait,
            await self.shared.pause(
                self.account, left, self.rate.per_window, self.rate.burst, self.period
            ),
        )

    async def _take(self, klass: str, reserve: float, headroom: int) -> float:
        rate = self.rate
        if self.waiting is None:
            return await self.shared.take(
                self.account, rate.per_window, rate.burst, self.period, self.longest
            )
        ask = self._slot(klass).ask
        taken = await self.shared.take_classed(
            self.account, rate.per_window, rate.burst, self.period, ask
        )
        return self._told(ask, taken)

    def _slot(self, klass: str) -> SlotAsk:
        assert self.waiting is not None
        rate, (waiting, ages) = self.rate, self.waiting()
        counts, index = list(waiting), CLASS_ORDER.index(klass)
        counts[index] = max(counts[index], 1)  # this request, queued or not
        reserve, headroom = self.hold  # batch's, whatever the class: the script applies them
        demand_ttl = max(DEMAND_TTL, 4 * self.period / rate.per_window)
        waits, weights = (counts[0], counts[1], counts[2]), self.weights
        ask = ClassedAsk(klass, waits, reserve, weights, demand_ttl, ages, self.longest, headroom)
        return SlotAsk(self.account, rate.per_window, rate.burst, self.period, ask)

    def _told(self, ask: ClassedAsk, taken: Taken) -> float:
        self.fleet = taken.fleet
        counts = list(ask.waiting)
        if taken.wait <= 0:  # as the script counts: the request served is no longer waiting
            counts[CLASS_ORDER.index(ask.klass)] -= 1
            if taken.member:
                self.granted.append(taken.member)
        self.mine = (counts[0], counts[1], counts[2])
        return taken.wait

    def ahead(self, klass: str, now: float) -> SlotAsk | None:
        """:meth:`try_take`'s ask, to send with a fetch lock's claim (one round trip); None
        when this replica asks by itself (Redis away, no classes, a pause of its own)."""
        if self.waiting is None or not self.backend.up or self._paused_until > now:
            return None
        return self._slot(klass)

    def took_ahead(self, slot: SlotAsk, taken: Taken, now: float) -> bool:
        """Redis's answer to :meth:`ahead`'s ask, told as :meth:`try_take`'s: whether taken."""
        wait = self._told(slot.ask, taken)
        if wait <= 0:
            self.bucket.record(now)
        self._next_at = now + wait
        return wait <= 0

    async def forget(self) -> bool:
        """Nothing waits here, but Redis still counts requests that left without a slot
        (refused, dropped, their caller gone): drop this replica's demand entry, or the fleet
        keeps their class's slots for them until it expires (seconds of idle slots)."""
        if any(self.mine) and self.backend.up:
            with contextlib.suppress(SharedUnavailable):
                await self.shared.drop_demand(self.account)
                fleet = [max(0, f - m) for f, m in zip(self.fleet, self.mine, strict=True)]
                self.fleet, self.mine = (fleet[0], fleet[1], fleet[2]), (0, 0, 0)
        return True

    async def give_back(self) -> bool:
        """The slot this replica took last is not used: back to the fleet (its send leaves the
        shared window, the pace moves back one interval). False when there is none to give."""
        if not self.granted or not self.backend.up:
            return False
        member = self.granted.pop()
        with contextlib.suppress(SharedUnavailable):
            rate = self.rate
            return await self.shared.give_back(self.account, member, rate.per_window, self.period)
        return False

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

    async def look(self, now: float) -> None:
        # Without a read, a replica whose own queue is empty would know the fleet only as its
        # last take said (maybe long ago): "not busy" while other replicas drain the bucket.
        if not self.backend.up or now - self._looked < LOOK_SECONDS:
            return
        if self._looking is None or self._looking.done():
            self._looked = now
            self._looking = asyncio.get_running_loop().create_task(self._look(now))
        await asyncio.shield(self._looking)

    async def _look(self, now: float) -> None:
        rate = self.rate
        try:
            room = await self.shared.room(
                self.account, rate.per_window, rate.burst, self.period, self.longest
            )
        except SharedUnavailable:
            return  # degraded: the fallback bucket's estimate
        self.fleet = room.fleet
        self._next_at = now + room.ready_in

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
        self._paused_until = max(self._paused_until, now + seconds)
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep(now))
        return max(seconds, left)

    async def _keep(self, now: float) -> None:
        """Share the pause again once a second while it lasts (PAUSE keeps the later end, so
        this changes nothing unless Redis lost it: a restore, a flush, a failover)."""
        started = time.monotonic()
        while (left := self._paused_until - now - (time.monotonic() - started)) > KEEP_SECONDS:
            await asyncio.sleep(KEEP_SECONDS)
            if self.backend.up:
                with contextlib.suppress(SharedUnavailable):
                    await self.shared.pause(
                        self.account, left - KEEP_SECONDS, self.rate.per_window,
                        self.rate.burst, self.period,
                    )  # fmt: skip

    async def close(self) -> None:
        for task in (self._keeper, self._looking):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def retune(self, rate: Rate) -> None:
        # The shared script takes the rate with each call, so only the fallback share moves.
        self.rate = rate
        share = self._share(rate)
        self.bucket.rate = share
        self.bucket.tokens = min(self.bucket.tokens, float(share.burst))

    def mode(self) -> str:
        return "shared" if self.backend.up else "degraded"

    async def spare(self, now: float, tokens: float) -> bool:
        """The fleet's view (one read-only round trip): the shared bucket's tokens and every
        replica's waiting requests; the fallback bucket's while Redis is away."""
        if self.backend.up:
            rate = self.rate
            try:
                room = await self.shared.room(
                    self.account, rate.per_window, rate.burst, self.period, self.longest
                )
            except SharedUnavailable:
                pass  # degraded: this replica's fallback share decides
            else:
                return room.tokens >= tokens and not any(room.fleet)
        return await self.local.spare(now, tokens)
