"""Sending idempotent requests again, and a circuit breaker per account.

The :class:`Retry` layer sits above auth, so each attempt gets fresh credentials
and its own token from the rate budget.

- Only the configured methods are resent (GET, HEAD, OPTIONS by default; PUT and
  DELETE may be added). POST and PATCH never are: Kounta has no idempotency keys,
  and a resent order can become two orders.
- A resend happens only when Kounta surely did not answer (the connection failed or
  timed out before any response) or answered 502, 503 or 504, with jittered
  exponential backoff, within the attempt cap and the request's deadline.
- The :class:`Breaker` counts consecutive upstream failures per account. After
  ``breaker_failures`` of them it opens: requests fail fast with
  :class:`~proxy.errors.CircuitOpen` (503, or stale from the cache) for
  ``breaker_cooldown`` seconds, then one probe is let through; its success closes
  the breaker, its failure opens it again.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from proxy.clock import Clock, MonotonicClock, backoff
from proxy.dates import retry_after
from proxy.errors import CircuitOpen, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.logs import event
from proxy.messages import Layer, ProxyRequest, ProxyResponse
from proxy.metrics import Metrics
from proxy.settings import RetrySettings

RETRIED_STATUSES = frozenset({502, 503, 504})


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Breaker:
    """Counts consecutive upstream failures of one account and fails fast after too many."""

    def __init__(self, account: str, failures: int, cooldown: float, clock: Clock) -> None:
        self.account = account
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = -math.inf
        self.probing = False

    def admit(self) -> bool:
        """Let a request through, or raise :class:`CircuitOpen`. True when it is the probe."""
        if self.state is BreakerState.CLOSED:
            return False
        now = self.clock.now()
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.cooldown:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN and not self.probing:
            self.probing = True
            event("breaker_probe", account=self.account)
            return True
        left = max(1, math.ceil(self.opened_at + self.cooldown - now))
        raise CircuitOpen(
            f"Kounta failed {self.failures} times in a row for account {self.account!r}; "
            f"requests fail fast for another {left}s",
            retry_after=left,
        )

    def succeeded(self) -> None:
        if self.state is not BreakerState.CLOSED:
            event("breaker_closed", account=self.account)
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.probing = False

    def failed(self) -> bool:
        """Count a failure; True when the breaker opened because of it."""
        self.failures += 1
        self.probing = False
        if self.threshold and (
            self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold
        ):
            self.state = BreakerState.OPEN
            self.opened_at = self.clock.now()
            event("breaker_opened", account=self.account, failures=self.failures)
            return True
        return False

    def abandoned(self) -> None:
        """The probe ended without telling whether Kounta is back: let the next one try."""
        self.probing = False

    def status(self) -> dict[str, Any]:
        left = self.opened_at + self.cooldown - self.clock.now()
        return {
            "state": self.state.name.lower(),
            "consecutive_failures": self.failures,
            "open_for": round(max(0.0, left), 3) if self.state is BreakerState.OPEN else 0.0,
        }


class Retry:
    """The layer: resends what is safe to resend; keeps one breaker per account."""

    def __init__(
        self,
        inner: Layer,
        settings: RetrySettings,
        accounts: Iterable[str],
        metrics: Metrics,
        clock: Clock | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.inner = inner
        self.settings = settings
        self.methods = frozenset(m.upper() for m in settings.methods)
        self.metrics = metrics
        self.clock = clock or MonotonicClock()
        self.jitter = jitter
        self.breakers: dict[str, Breaker] = {}
        for name in accounts:
            self.breaker(name)

    def breaker(self, account: str) -> Breaker:
        found = self.breakers.get(account)
        if found is not None:
            return found
        s = self.settings
        made = self.breakers[account] = Breaker(
            account, s.breaker_failures, s.breaker_cooldown, self.clock
        )
        for state in BreakerState:
            # One-hot, like the token's state: 1 for the current one, 0 for the others.
            self.metrics.breaker_state.labels(account, state.name.lower()).set_function(
                lambda state=state: 1 if made.state is state else 0  # type: ignore[misc]
            )
        self.metrics.breaker_opened.labels(account)
        return made

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        breaker = self.breaker(request.account)
        resendable = request.method in self.methods and request.replayable
        attempt = 1
        spent: float | None = None  # upstream seconds of the attempts answered before
        while True:
            breaker.admit()
            try:
                response = await self.inner.send(request)
            except (UpstreamUnreachable, UpstreamTimeout) as e:
                # Raised before any response: Kounta did not answer this attempt.
                self._failed(breaker)
                if not (resendable and await self._pause(request, attempt, _reason(e), None)):
                    raise
            except UpstreamError:
                self._failed(breaker)
                raise
            except BaseException:
                breaker.abandoned()
                raise
            else:
                response.add_upstream_time(spent)
                if response.status not in RETRIED_STATUSES:
                    breaker.succeeded()
                    return response
                self._failed(breaker)
                asked = _retry_after(response)
                reason = str(response.status)
                if not (resendable and await self._pause(request, attempt, reason, asked)):
                    return response
                spent = response.upstream_seconds
                await response.release()
            attempt += 1

    def _failed(self, breaker: Breaker) -> None:
        if breaker.failed():
            self.metrics.breaker_opened.labels(breaker.account).inc()

    async def _pause(
        self, request: ProxyRequest, attempt: int, reason: str, asked: float | None
    ) -> bool:
        """Sleep before the next attempt; False when no attempt is left in time or count."""
        if attempt >= self.settings.attempts:
            return False
        s = self.settings
        delay = backoff(attempt, s.backoff_initial, s.backoff_max, self.jitter)
        if asked is not None:
            delay = max(delay, asked)
        if self.clock.now() + delay >= request.deadline:
            return False
        self.metrics.retries.labels(request.method, reason).inc()
        event(
            "upstream_retry",
            request_id=request.request_id,
            method=request.method,
            attempt=attempt + 1,
            reason=reason,
            delay=round(delay, 3),
        )
        await self.clock.sleep(delay)
        return True


def _reason(error: UpstreamError) -> str:
    return "timeout" if isinstance(error, UpstreamTimeout) else "connect"


def _retry_after(response: ProxyResponse) -> float | None:
    return retry_after(response.headers.get("Retry-After"), time.time())
