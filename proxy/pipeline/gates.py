"""Where an account's send slots come from: this process's :class:`LocalGate` over the pure
:class:`~proxy.pipeline.bucket.Bucket`, or the fleet's :class:`SharedGate` (Redis). What a
429's headers ask for is :mod:`proxy.pipeline.pauses`.

The shared gate keeps the bucket in Redis (GCRA for pace and burst plus a sliding log for the
window cap, one Lua script per request), so all replicas together stay under the rate, and a
429 seen by one pauses all; while Redis is away each replica falls back to a local bucket at
``rate / shared.replicas``.

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
from collections.abc import Callable
from typing import Protocol

from proxy.logs import event
from proxy.pipeline.bucket import Bucket, Rate
from proxy.pipeline.pauses import capped
from proxy.shared import Backend, SharedUnavailable
from proxy.shared.base import ClassedAsk, SharedBudget, SlotAsk, Taken

# The classes in the order the shared script counts them (proxy.pipeline.queue.CLASSES).
CLASS_ORDER = ("interactive", "standard", "batch")
# A replica's waiting requests by class, and how long the oldest of each has waited.
Waiting = tuple[tuple[int, int, int], tuple[float, float, float]]
# Seconds a replica's registered demand stands without being refreshed (at least).
DEMAND_TTL = 2.0

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
        return self.took(now, reserve, headroom)

    def took(self, now: float, reserve: float = 0.0, headroom: int = 0) -> float:
        """:meth:`try_take` without a coroutine: 0 when a token was taken now, else the
        seconds until one is free."""
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
