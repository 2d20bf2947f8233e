"""Background revalidations of stored entries, one per key: stale-while-revalidate's, and
stale-while-busy's (the stored answer at once when the budget is busy, refreshed behind at
batch priority). Not joinable by callers' own fetches; dropped once no longer useful."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace

from proxy.cache.answers import Answers
from proxy.cache.fields import RequestControl
from proxy.cache.flight import Flight, Flights
from proxy.cache.lookup import BusyStale, stale_while_busy
from proxy.cache.memory import Stored
from proxy.cache.storable import rule_for
from proxy.cache.tiers import Entries
from proxy.clock import WallClock
from proxy.memo import memo
from proxy.messages import Prepaid, ProxyRequest, ProxyResponse
from proxy.settings import CacheRule, Settings

# Seconds a request of (account, caller, class) would now wait for a budget token (shared:
# at most one read-only round trip, cached for a short time).
ExpectedWait = Callable[[str, str, str], Awaitable[float]]
# Who background refreshes wait in the budget's batch class as (one round-robin turn).
REFRESHER = "cache-refresh"
# Starts a flight for (key, request, stale entry), alone (never joined), unwanted by callers.
Start = Callable[..., Flight]


class Refreshes:
    """The background refreshes under way (``running``: key → flight) and when to start one."""

    def __init__(
        self,
        entries: Entries,
        flights: Flights,
        answers: Answers,
        clock: WallClock,
        rules: Callable[[], tuple[CacheRule, ...]],
        start: Start,
        settings: Settings,
        busy: ExpectedWait | None = None,
    ) -> None:
        """``start``: the cache's flight starter; ``busy``: the budget's expected wait (None:
        never busy)."""
        self.entries = entries
        self.flights = flights
        self.answers = answers
        self.clock = clock
        self.rules = rules
        self._start = start
        self.busy = busy
        self.busy_after = settings.budget.busy_after
        self.default_window = settings.cache.stale_while_busy
        self.total_timeout = settings.upstream.total_timeout
        self.running: dict[str, Flight] = {}

    async def busy_stale(
        self, request: ProxyRequest, control: RequestControl, key: str, stored: Stored
    ) -> ProxyResponse | None:
        """Stale-while-busy: the stored answer at once when the request's token is further off
        than ``budget.busy_after`` (:func:`~proxy.cache.lookup.stale_while_busy` decides), and
        a refresh behind at batch priority; None: the request goes on as usual."""
        expected = self.busy
        if expected is None:
            return None
        entry = stored.entry
        window = busy_window(entry.path, self.rules(), self.default_window)
        # The decision first as if the wait were long (pure), then the wait (it may read Redis).
        decision = stale_while_busy(
            entry, control, self.clock(), window=window, wait=lambda: math.inf, busy_after=0.0
        )
        if not isinstance(decision, BusyStale):
            return None
        if await expected(request.account, request.caller, request.priority) <= self.busy_after:
            return None
        self.answers.count("stale", "busy")
        self.refresh(key, request, stored)
        answer = self.answers.from_store(request, stored, "STALE", decision.age)
        answer.cache_detail = "fwd=stale; detail=budget"
        return answer

    def refresh(self, key: str, request: ProxyRequest, stored: Stored) -> None:
        """A background revalidation of ``stored``, at batch priority, one per key (none
        while one is out, or while a caller's fetch of the key is). Not joinable: a caller's
        own fetch never waits behind it at batch priority. The budget drops it once it is no
        longer useful: the entry was invalidated or replaced by a newer one meanwhile, or no
        token comes within ``budget.max_wait``."""
        if key in self.running or key in self.flights:
            return
        started: list[Flight] = []

        def wanted() -> bool:
            return not started or self._still_wanted(started[0], stored)

        background = replace(
            request,
            method="GET",
            caller=REFRESHER,
            priority="batch",
            deadline=asyncio.get_running_loop().time() + self.total_timeout,
            wanted=wanted,
            prepaid=Prepaid(),  # with Redis, its token is taken before the key's fetch lock
        )
        flight = self._start(key, background, stored, alone=True, unwanted=True)
        started.append(flight)
        self.running[key] = flight

        def over(_: object) -> None:
            if self.running.get(key) is flight:
                del self.running[key]

        flight.done.add_done_callback(over)

    def _still_wanted(self, flight: Flight, stored: Stored) -> bool:
        if self.entries.stale(flight, stored.entry):
            return False  # invalidated since: the next caller fetches anew
        current = self.entries.hot(flight.key)
        return current is None or current.entry.response_time <= stored.entry.response_time


@memo(4096)
def busy_window(path: str, rules: tuple[CacheRule, ...], default: float) -> float:
    """Seconds past freshness ``path``'s entries may answer while the budget is busy: its
    rule's ``stale_while_busy`` where set, else ``cache.stale_while_busy``."""
    rule = rule_for(path, rules)
    if rule is not None and rule.stale_while_busy is not None:
        return rule.stale_while_busy
    return default
