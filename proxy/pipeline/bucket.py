"""An account's send slots in one process, pure: the :class:`Bucket` (token bucket plus the
window's log, the clock passed in) at the account's :class:`Rate`.

The bucket holds ``burst`` tokens and refills at the account's rate. It also keeps the send
times of the last window, so that no 60-second window (plus a margin for network delays) ever
sees more than the rate: a plain token bucket would allow ``burst + rate`` in the first
minute. Where slots come from, this bucket or the fleet's in Redis, is
:mod:`proxy.pipeline.gates`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.settings import RATES, AccountSettings, BudgetSettings, LiveAccount, applied

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
        """Kounta said 429: stop for ``seconds`` (already capped, see
        :func:`~proxy.pipeline.pauses.capped`) or a growing backoff up to ``longest``; returns
        the pause."""
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
