"""Kounta's request budget: one token bucket and one fair queue per account.

Kounta allows a client about 180 requests a minute (60 with Basic auth) and answers
the excess with a plain-text 429. The :class:`Budget` layer sits just above the
upstream, so every request that reaches Kounta (revalidations and resends after a
token refresh included) takes a token first, while fresh cache hits never get here.

- :class:`~proxy.pipeline.bucket.Bucket` holds the account's tokens and its window's log.
- :class:`~proxy.pipeline.account_budget.AccountBudget` makes requests wait for a token
  in a bounded queue, handing tokens out by class (interactive, standard, batch: weighted fair
  queuing, see :mod:`proxy.pipeline.queue`) and round robin over callers within a class, so one busy
  caller cannot starve the others and a batch walk cannot hold up a till. Batch requests
  never take the last ``budget.reserve`` of the burst and of the window's cap.
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
(:class:`~proxy.pipeline.gates.SharedGate`); the round robin over callers stays per replica.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from proxy.clock import Clock, MonotonicClock
from proxy.dates import whole_seconds
from proxy.errors import RateLimited
from proxy.logs import debug, log, trace
from proxy.messages import Layer, ProxyRequest, ProxyResponse
from proxy.pipeline.account_budget import AccountBudget
from proxy.pipeline.bucket import Rate, live_rate, rate_for
from proxy.pipeline.gates import Gate, SharedGate
from proxy.pipeline.metrics import PipelineMetrics
from proxy.settings import (
    CLASS_SHARES,
    CallerSettings,
    LiveAccount,
    LiveBudget,
    Settings,
    applied,
    live_of,
)
from proxy.shared import Backend
from proxy.shared.base import SlotAsk, Taken

__all__ = ["AccountBudget", "Budget"]

RESENT_AFTER_429 = frozenset({"GET", "HEAD"})


class Budget:
    """The layer: a token per upstream request, and what to do when Kounta says 429."""

    def __init__(
        self,
        inner: Layer,
        settings: Settings,
        metrics: PipelineMetrics,
        clock: Clock | None = None,
        wall: Callable[[], float] = time.time,
        shared: Backend | None = None,
        current: Callable[[], Mapping[str, LiveAccount]] | None = None,
        classes: Callable[[], LiveBudget] | None = None,
        callers: Callable[[], Mapping[str, CallerSettings]] | None = None,
    ) -> None:
        self.inner = inner
        self.settings = settings.budget
        # The budget's live slices, a SIGHUP reload may change them: the accounts' rates,
        # the classes' weights and reserve, the callers' max_share.
        live = live_of(settings)
        self.current = current or (lambda: live.accounts)
        self.classes = classes or (lambda: live.budget)
        self.callers = callers or (lambda: live.callers)
        self._tuned_to: tuple[Mapping[str, LiveAccount], LiveBudget] = (live.accounts, live.budget)
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
        # Requests whose slot their flight's claim took (ask, took), by _ahead_key.
        self._ahead: set[tuple[str, str, str, str]] = set()

    def _budget_for(self, name: str, rate: Rate) -> AccountBudget:
        gate: Gate | None = None
        backend = self.shared
        if backend is not None and backend.budget is not None:
            now = self.clock.now()
            gate = SharedGate(
                name, rate, backend.budget, backend, self.replicas, now, self.settings.longest_pause
            )
        return AccountBudget(
            name, rate, self.settings, self.clock, self.metrics, gate, self.max_share
        )

    async def expected_wait(self, account: str, caller: str, klass: str) -> float:
        """Seconds a request of ``caller`` in ``klass`` would now wait for a token of
        ``account`` (:meth:`AccountBudget.estimate`: no token taken; shared, at most one
        read-only round trip every ``LOOK_SECONDS``)."""
        return await self.account(account).estimate(caller, klass)

    def max_share(self, caller: str) -> float:
        found = self.callers().get(caller)
        return found.max_share if found is not None else 1.0

    def account(self, name: str) -> AccountBudget:
        live, classes = self.current(), self.classes()
        tuned_to = self._tuned_to
        if live is not tuned_to[0] or classes is not tuned_to[1]:  # retuned once per reload
            self._tuned_to = (live, classes)
            self.settings = applied(self.settings, classes, CLASS_SHARES)
            for known, budget in self.accounts.items():
                budget.retune(live_rate(self.started.get(known), live.get(known), self.settings))
                budget.reclass(self.settings)
        found = self.accounts.get(name)
        if found is None:  # not configured (auth refuses it first); budget it all the same
            rate = rate_for(None, self.settings)
            found = self.accounts[name] = self._budget_for(name, rate)
        return found

    async def prepay(self, request: ProxyRequest) -> None:
        """Take ``request``'s token now, as its send would (same class, limit and
        ``wanted``; :class:`~proxy.errors.RateLimited` when dropped or too late); its first
        send then takes none. Nothing to do for a request without ``prepaid``."""
        if request.prepaid is None or request.prepaid.paid:
            return
        budget = self.account(request.account)
        limit = budget.limit_for(request.deadline)
        waited = await budget.acquire(request.caller, limit, request.priority, request.wanted)
        request.prepaid.paid = True
        debug(
            "budget_prepaid",
            account=request.account,
            caller=request.caller,
            priority=request.priority,
            waited_ms=round(waited * 1000, 2),
        )

    def refund(self, request: ProxyRequest) -> None:
        """``request``'s token taken ahead was not spent (it was not sent): the account's
        next request gets it (:meth:`AccountBudget.refund`). Nothing when none is left."""
        if request.prepaid is not None and request.prepaid.spend():
            self.account(request.account).refund()

    def ask(self, request: ProxyRequest) -> SlotAsk | None:
        """The slot ``request``'s send would take at once, to ask with its flight's fetch
        lock (one round trip; Redis takes it only for the lock's owner); None: asked when
        sent (local, Redis away, requests queued here, or no request id to know it by)."""
        if not request.request_id:
            return None
        return self.account(request.account).ahead(request.priority)

    def took(self, request: ProxyRequest, slot: SlotAsk, taken: Taken) -> None:
        """Redis's answer to :meth:`ask`: a slot taken is ``request``'s first send's."""
        if self.account(request.account).took_ahead(slot, taken):
            self._ahead.add(_ahead_key(request))

    def unspent(self, request: ProxyRequest) -> None:
        """``request``'s flight is over: a slot :meth:`took` kept for it and not sent goes
        back (:meth:`AccountBudget.refund`)."""
        if self._ahead and self._spent(request):
            self.account(request.account).refund()

    def _spent(self, request: ProxyRequest) -> bool:
        """Whether ``request`` (the flight's, as the layers above made it: the same id,
        account and target) had a slot kept for it (:meth:`took`); it is not kept any longer."""
        key = _ahead_key(request)
        if key not in self._ahead:
            return False
        self._ahead.discard(key)
        return True

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        budget = self.account(request.account)
        limit = budget.limit_for(request.deadline)
        now = trace()
        prepaid = request.prepaid
        while True:
            if prepaid is not None and prepaid.spend():
                waited = 0.0  # taken ahead (a background refresh, before its fetch lock)
            elif self._ahead and self._spent(request):
                waited = 0.0  # taken with its flight's fetch lock (ask)
            elif budget.taken_at_once(request.priority, request.wanted):
                waited = 0.0  # free, local: taken without a coroutine
            else:
                waited = await budget.acquire(
                    request.caller, limit, request.priority, request.wanted
                )
            now.budget_wait += waited
            if log.isEnabledFor(logging.DEBUG):  # its fields built only when someone reads it
                debug(
                    "budget_taken",
                    request_id=request.request_id,
                    account=request.account,
                    caller=request.caller,
                    priority=request.priority,
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


def _ahead_key(request: ProxyRequest) -> tuple[str, str, str, str]:
    """A flight's request as every layer's copy of it names it (a caller's X-Request-ID may
    repeat: with the account and target, two flights never share one)."""
    return request.request_id, request.account, request.path, request.query
