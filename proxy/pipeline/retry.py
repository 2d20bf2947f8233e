"""Sending idempotent requests again, and a circuit breaker per account.

The :class:`Retry` layer sits above auth, so each attempt gets fresh credentials
and its own token from the rate budget.

- Only the configured methods are resent (GET, HEAD, OPTIONS by default; PUT and
  DELETE may be added). POST and PATCH never are: Kounta has no idempotency keys,
  and a resent order can become two orders. This layer is the only one that resends: the
  HTTP client below does not (:mod:`proxy.client`), and it never writes a request onto a
  pooled connection the upstream has already closed.
- A resend happens only when Kounta surely did not answer (the connection failed or
  timed out before any response) or answered 502, 503 or 504, with jittered
  exponential backoff, within the attempt cap and the request's deadline.
- A :class:`Breaker` counts consecutive failed *requests* (a GET tried three times is one
  failure, decided by its last attempt). After ``breaker_failures`` of them it opens:
  requests fail fast with :class:`~proxy.errors.CircuitOpen` (503, or stale from the
  cache) for ``breaker_cooldown`` seconds, then one probe is let through; its success
  closes the breaker, its failure opens it again.

What counts, and where (the choice, and why):

- Kounta could not be reached (refused, reset, DNS, TLS, timeout): a failure of the
  account's breaker and of the route's. Every path of the account would fail the same way,
  so once the account's breaker is open all of them fail fast.
- Kounta answered 502, 503 or 504 (after the resends), broke off a body, or answered a
  status outside 100-599: a failure of
  the route's breaker only (the account + route, :func:`proxy.routes.breaker_key`: the
  template, ``/v1/companies/{id}/orders``, or for an undocumented path the part a template
  matched plus the next segment, ``/v1/companies/{id}/novel``, ``/v1/novel``).
  Kounta did answer, and one endpoint that is down, or a test's deliberate 5xx answers,
  must not turn every other path of the account into ``503 circuit_open``.
- Any other answer, a 500 included, is a success: it is one endpoint's own error, not a
  sign that Kounta is away, and resending or failing fast would not help.
- Failures of our own (no budget token, no access token, a caller that left, no free
  upstream connection in the account's share: ``503 upstream_busy``) count for nothing
  either way.

Route breakers are kept only while they have something to say (failures or open), at most
``ROUTES_MAX`` per account; past that a new route is watched by the account's breaker only.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from proxy.clock import Clock, MonotonicClock, backoff
from proxy.dates import retry_after
from proxy.errors import (
    CircuitOpen,
    ProxyError,
    UpstreamBodyError,
    UpstreamBusy,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.logs import debug, event, trace
from proxy.messages import Layer, ProxyRequest, ProxyResponse
from proxy.pipeline.metrics import PipelineMetrics
from proxy.routes import breaker_key
from proxy.settings import RetrySettings

RETRIED_STATUSES = frozenset({502, 503, 504})
# Route breakers kept per account at most (only routes with failures are kept at all).
ROUTES_MAX = 256
# Paths whose breaker key is remembered at most (cleared past it).
KEYS_MAX = 10_000


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Breaker:
    """Counts consecutive upstream failures of one account and fails fast after too many."""

    def __init__(
        self, account: str, failures: int, cooldown: float, clock: Clock, route: str = ""
    ) -> None:
        self.account = account
        self.route = route  # "": the account's breaker; else a route template
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
            event("breaker_probe", logging.INFO, **self._where())
            return True
        left = max(1, math.ceil(self.opened_at + self.cooldown - now))
        where = f" on {self.route}" if self.route else ""
        raise CircuitOpen(
            f"Kounta failed {self.failures} requests in a row for account {self.account!r}"
            f"{where}; requests fail fast for another {left}s",
            retry_after=left,
        )

    @property
    def is_open(self) -> bool:
        """Open and not yet due for a probe: a resend now would only be refused."""
        return self.state is BreakerState.OPEN and self.clock.now() < (
            self.opened_at + self.cooldown
        )

    def _where(self) -> dict[str, str]:
        return (
            {"account": self.account, "route": self.route}
            if self.route
            else {"account": self.account}
        )

    def succeeded(self) -> None:
        if self.state is not BreakerState.CLOSED:
            event("breaker_closed", logging.INFO, **self._where())
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.probing = False

    def failed(self) -> bool:
        """Count a failure; True when it opened a closed breaker (a failed probe opens it
        again, but that is the same outage, not a new opening)."""
        self.failures += 1
        self.probing = False
        if self.threshold and (
            self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold
        ):
            was_closed = self.state is BreakerState.CLOSED
            self.state = BreakerState.OPEN
            self.opened_at = self.clock.now()
            event("breaker_opened", logging.WARNING, **self._where(), failures=self.failures)
            return was_closed
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
    """The layer: resends what is safe to resend; keeps a breaker per account and per
    account + route (see the module docstring for what each counts)."""

    def __init__(
        self,
        inner: Layer,
        settings: RetrySettings,
        accounts: Iterable[str],
        metrics: PipelineMetrics,
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
        self.routes: dict[str, dict[str, Breaker]] = {}
        self._keys: dict[str, str] = {}  # breaker_key per path (a revalidated key: the same)
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
        routes = self.routes[account] = {}
        for state in BreakerState:
            # One-hot, like the token's state: 1 for the current one, 0 for the others.
            self.metrics.breaker_state.labels(account, state.name.lower()).set_function(
                lambda state=state: 1 if made.state is state else 0  # type: ignore[misc]
            )
        self.metrics.breaker_routes_open.labels(account).set_function(
            lambda: sum(1 for b in routes.values() if b.state is not BreakerState.CLOSED)
        )
        self.metrics.breaker_opened.labels(account)
        return made

    def route_breaker(self, account: str, route: str) -> Breaker | None:
        """The breaker of one route of the account (None when too many are kept)."""
        routes = self.routes[account]
        found = routes.get(route)
        if found is None and len(routes) < ROUTES_MAX:
            s = self.settings
            found = Breaker(account, s.breaker_failures, s.breaker_cooldown, self.clock, route)
        return found

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        try:
            return await self._send(request)
        except ProxyError as e:
            # For the access line: the failure an error answer, or a stale one, stands for
            # (Kounta unreachable, the breaker open, no budget in time, no token).
            now = trace()
            now.failure, now.failure_detail = e.code, e.detail
            raise

    async def _send(self, request: ProxyRequest) -> ProxyResponse:
        host = self.breaker(request.account)
        key = self._keys.get(request.path)
        if key is None:
            if len(self._keys) >= KEYS_MAX:
                self._keys.clear()
            key = self._keys[request.path] = breaker_key(request.path)
        route = self.route_breaker(request.account, key)
        probes = self._admit(host, route)
        try:
            response = await self._attempts(request, host, route)
        except UpstreamBusy:
            # The account's own connection share was in use: says nothing of Kounta.
            self._ended(host, route, probes, host_failed=None, route_failed=None)
            raise
        except (UpstreamBodyError, UpstreamInvalid):
            self._ended(host, route, probes, host_failed=None, route_failed=True)
            raise
        except UpstreamError:
            self._ended(host, route, probes, host_failed=True, route_failed=True)
            raise
        except BaseException:
            self._ended(host, route, probes, host_failed=None, route_failed=None)
            raise
        failed = response.status in RETRIED_STATUSES
        self._ended(host, route, probes, host_failed=False, route_failed=failed)
        return response

    def _admit(self, host: Breaker, route: Breaker | None) -> tuple[bool, bool]:
        """Admit the request through both breakers (or raise CircuitOpen); which it probes."""
        host_probe = host.admit()
        try:
            return host_probe, route.admit() if route is not None else False
        except CircuitOpen:
            if host_probe:
                host.abandoned()
            raise

    def _ended(
        self,
        host: Breaker,
        route: Breaker | None,
        probes: tuple[bool, bool],
        *,
        host_failed: bool | None,
        route_failed: bool | None,
    ) -> None:
        """Tell both breakers how the request ended (None: it says nothing of Kounta).
        A request that opens both the account's and its route's breaker is one opening."""
        opened = self._tell(host, host_failed, probes[0])
        if route is not None:
            opened = self._tell(route, route_failed, probes[1]) or opened
        if opened:
            self.metrics.breaker_opened.labels(host.account).inc()
        if route is None:
            return
        routes = self.routes[route.account]
        if route.state is BreakerState.CLOSED and route.failures == 0:
            routes.pop(route.route, None)  # nothing to remember
        else:
            routes[route.route] = route

    def _tell(self, breaker: Breaker, failed: bool | None, probe: bool) -> bool:
        """True when the breaker opened (from closed) because of this request."""
        if failed is None:
            if probe:  # another request may be the probe: leave its flag alone
                breaker.abandoned()
        elif not failed:
            breaker.succeeded()
        else:
            return breaker.failed()
        return False

    async def _attempts(
        self, request: ProxyRequest, host: Breaker, route: Breaker | None
    ) -> ProxyResponse:
        """Send, and send again while it is safe and useful; the last answer or error."""
        resendable = request.method in self.methods and request.replayable
        breakers = (host,) if route is None else (host, route)
        attempt = 1
        spent: float | None = None  # upstream seconds of the attempts answered before
        while True:
            try:
                response = await self.inner.send(request)
            except (UpstreamUnreachable, UpstreamTimeout) as e:
                # Raised before any response: Kounta did not answer this attempt.
                debug(
                    "upstream_attempt_failed",
                    request_id=request.request_id,
                    attempt=attempt,
                    error=e.code,
                    detail=e.detail,
                )
                if not (
                    resendable and await self._again(request, attempt, _reason(e), None, breakers)
                ):
                    raise
            else:
                response.add_upstream_time(spent)
                if response.status not in RETRIED_STATUSES:
                    return response
                asked = _retry_after(response)
                reason = str(response.status)
                if not (
                    resendable and await self._again(request, attempt, reason, asked, breakers)
                ):
                    return response
                spent = response.upstream_seconds
                await response.release()
            attempt += 1

    async def _again(
        self,
        request: ProxyRequest,
        attempt: int,
        reason: str,
        asked: float | None,
        breakers: tuple[Breaker, ...],
    ) -> bool:
        """Sleep before the next attempt; False when no attempt is left in time or count, or
        when other requests opened a breaker meanwhile (a resend would only be refused)."""
        if attempt >= self.settings.attempts or any(b.is_open for b in breakers):
            return False
        s = self.settings
        delay = backoff(attempt, s.backoff_initial, s.backoff_max, self.jitter)
        if asked is not None:
            delay = max(delay, asked)
        if self.clock.now() + delay >= request.deadline:
            return False
        self.metrics.retries.labels(request.method, reason).inc()
        trace().retries += 1
        event(
            "upstream_retry",
            request_id=request.request_id,
            method=request.method,
            attempt=attempt + 1,
            reason=reason,
            delay=round(delay, 3),
        )
        await self.clock.sleep(delay)
        return not any(b.is_open for b in breakers)


def _reason(error: UpstreamError) -> str:
    return "timeout" if isinstance(error, UpstreamTimeout) else "connect"


def _retry_after(response: ProxyResponse) -> float | None:
    return retry_after(response.headers.get("Retry-After"), time.time())
