"""The cache layer: applies the pure decisions (:mod:`proxy.cache.lookup`,
:mod:`proxy.cache.storable`, :mod:`proxy.cache.validation`, and
:func:`~proxy.cache.invalidation.invalidation`) and does the I/O.

Outermost layer of the pipeline, read top-down like hishel's loop. For GET/HEAD it looks
the key up in its :class:`~proxy.cache.tiers.Entries`, asks
:func:`~proxy.cache.lookup.lookup` what to do, and acts: a fresh hit is answered from the
store; a stale or missing entry is fetched (or revalidated with its ETag) in one shared
flight per key (:mod:`proxy.cache.flight`), one upstream
exchange each (:mod:`proxy.cache.exchange`). Unsafe methods pass through and hand what they
may have changed to the :class:`~proxy.cache.invalidation.Invalidator`.

Where entries live (this process, or Redis too) is the tier's business: nothing here asks.
What the fast path asks without the long way is :class:`~proxy.cache.fastlook.FastLook`
(``Cache.fast``); background refreshes (stale-while-revalidate, stale-while-busy) are
:class:`~proxy.cache.refresh.Refreshes` (``Cache.background``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import assert_never

from proxy import errors
from proxy.cache.answers import Answers, refuse_repeated_vary
from proxy.cache.exchange import Exchange
from proxy.cache.fastlook import (
    FastLook,
    Joined,
    cached_key,
    held,
    taken,
    webhook_fresh,
    webhook_rule,
)
from proxy.cache.fields import HeaderItems, Headers, RequestControl, request_control
from proxy.cache.flight import Flight, Flights, GoAlone, Outcome
from proxy.cache.invalidation import UNSAFE_METHODS, Invalidator, invalidation
from proxy.cache.keys import SELECTING
from proxy.cache.lookup import (
    FreshHit,
    Miss,
    OnlyIfCachedMiss,
    Revalidate,
    ServeStale,
    bypass,
    lookup,
)
from proxy.cache.memory import Stored
from proxy.cache.metrics import CacheMetrics
from proxy.cache.refresh import ExpectedWait, Refreshes, busy_window
from proxy.cache.store import CacheStore
from proxy.cache.tiers import Entries, LocalEntries
from proxy.cache.validation import ERROR_STATUSES
from proxy.cache.webhooks.health import Feeds
from proxy.clock import WallClock
from proxy.errors import ProxyError
from proxy.logs import trace
from proxy.messages import Layer, ProxyRequest, ProxyResponse
from proxy.settings import CacheRule, LiveCache, Settings, live_of


class Cache:
    def __init__(
        self,
        inner: Layer,
        entries: Entries | CacheStore,
        settings: Settings,
        metrics: CacheMetrics,
        clock: WallClock,
        current: Callable[[], LiveCache] | None = None,
        *,
        flights: Flights | None = None,
        invalidator: Invalidator | None = None,
        feeds: Feeds | None = None,
        busy: ExpectedWait | None = None,
    ) -> None:
        """``entries``: the tier (a bare store: this process's own, for tests and tools);
        ``flights``: the registry the tier cancels in; ``invalidator``: where writes go
        (default: this process only); ``busy``: the budget's expected wait, for
        stale-while-busy (None: never busy)."""
        self.inner = inner
        self.flights = flights or Flights()
        if isinstance(entries, CacheStore):
            entries = LocalEntries(entries, self.flights, metrics)
        self.entries = entries
        self.invalidator = invalidator or Invalidator(entries)
        # Each account's webhook feed: whether rules with webhooks = true keep fresh_for.
        self.feeds = feeds or Feeds(tuple(settings.accounts), enabled=False)
        self.config = settings.cache
        # The cache's live slice (a SIGHUP reload may change the rules); read per decision.
        started = live_of(settings).cache
        self.current = current or (lambda: started)
        self.origin = str(settings.upstream.url.origin())
        self.metrics = metrics
        # Counted for every joiner of a flight: the child looked up once.
        self.coalesced = metrics.cache_coalesced.labels("shared")
        self.clock = clock
        # Told of each read of a webhook rule's entry (the refetcher; set while services
        # are built).
        self.on_read: Callable[[str, ProxyRequest], None] | None = None
        self.answers = Answers(entries, self.flights, metrics, clock, self.config.stale_if_error)
        self.exchange = Exchange(inner, entries, self.flights, metrics, clock, self.rules, settings)
        # Background refreshes (stale-while-revalidate, stale-while-busy): one per key.
        self.background = Refreshes(
            entries, self.flights, self.answers, clock, self.rules, self._start, settings, busy
        )
        self.refreshes = self.background.running
        # What the fast path asks (proxy.edge.fast).
        self.fast = FastLook(
            self.key,
            entries,
            self.flights,
            self.answers,
            clock,
            self.rules,
            self.feeds,
            self.config.coalesce_wait,
            self.coalesced,
            # Started at the edge: its request goes out before the loop reads on (eager).
            functools.partial(self._start, eager=True),
            self._may_be_busy,
        )

    @property
    def tasks(self) -> set[asyncio.Task[object]]:
        return self.flights.tasks

    def rules(self) -> tuple[CacheRule, ...]:
        return self.current().rules

    def _may_be_busy(self, path: str) -> bool:
        """Whether stale-while-busy may answer stale entries of ``path`` (then whether it
        does is the budget's expected wait, asked by the long way: ``Refreshes.busy_stale``)."""
        if self.background.busy is None:
            return False
        return busy_window(path, self.rules(), self.config.stale_while_busy) > 0

    def key(self, account: str, path: str, query: str, headers: Headers) -> str:
        """The key :func:`~proxy.cache.fastlook.cached_key` remembers."""
        return cached_key(account, path, query, *map(headers.get, SELECTING))

    # ------------------------------------------------------------------ lookup → decide → act

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        if request.method in UNSAFE_METHODS:
            return await self._write(request)
        headers = request.headers
        control = request_control(headers.getall("Cache-Control", []), headers.getall("Pragma", []))
        skip = bypass(request.method, headers, control)
        if skip is not None:
            self.answers.count("bypass", skip.code)
            response = await self.inner.send(request)
            response.cache_status = "BYPASS"
            return response
        key = self.key(request.account, request.path, request.query, request.headers)
        if self.on_read is not None and webhook_rule(request.path, self.rules()) is not None:
            self.on_read(key, request)
        handed = taken(key, request.method)
        if isinstance(handed, Joined):
            on = handed.pending
            return await self._forward(request, key, on.stale, on.decision, "", handed)
        if handed is not None:
            stored = handed.stored  # looked up at the edge already
        else:
            stored = await self.entries.lookup(request.account, key)
        if stored is not None:
            refuse_repeated_vary(stored.entry, headers)
        return await self._decide(request, control, key, stored)

    async def _decide(
        self, request: ProxyRequest, control: RequestControl, key: str, stored: Stored | None
    ) -> ProxyResponse:
        original = stored
        stored, hooks = webhook_fresh(self.feeds, self.rules(), request.account, stored)
        decision = lookup(stored.entry if stored else None, request.headers, control, self.clock())
        if isinstance(decision, FreshHit):
            assert stored is not None
            self.answers.count("hit", "fresh")
            answer = self.answers.from_store(request, stored, "HIT", decision.age)
            if hooks:
                answer.cache_detail = f"hit; detail={hooks}"
                if hooks == "webhooks":
                    self.feeds.read(request.account, key, request)
            return answer
        if isinstance(decision, ServeStale):
            assert stored is not None
            self.answers.count("stale", "while_revalidate" if decision.refresh else "max_stale")
            if decision.refresh:
                self.background.refresh(key, request, stored)
            answer = self.answers.from_store(request, stored, "STALE", decision.age)
            why = "stale-while-revalidate" if decision.refresh else "max-stale"
            answer.cache_detail = f"hit; detail={why}"
            return answer
        if isinstance(decision, OnlyIfCachedMiss):
            self.answers.count("miss", "only_if_cached")
            raise errors.OnlyIfCachedMiss(
                "Nothing usable is stored for this request (Cache-Control: only-if-cached)"
            )
        if isinstance(decision, Revalidate | Miss):
            # Another request may have stored it while this one read the disk.
            newer = self.entries.hot(key)
            if newer is not None and newer is not original:
                return await self._decide(request, control, key, newer)
            usable = isinstance(decision, Revalidate) or decision.stale is not None
            if usable and stored is not None and request.method == "GET":
                busy = await self.background.busy_stale(request, control, key, stored)
                if busy is not None:
                    return busy
            return await self._forward(request, key, stored, decision, hooks)
        assert_never(decision)

    async def _forward(
        self,
        request: ProxyRequest,
        key: str,
        stored: Stored | None,
        decision: Revalidate | Miss,
        hooks: str,
        joined: Joined | None = None,
    ) -> ProxyResponse:
        """Fetch or revalidate (or join the flight doing so; ``joined``: joined, or started,
        at the edge already), and say why in Cache-Status."""
        usable = isinstance(decision, Revalidate) or decision.stale is not None
        # RFC 9211 fwd: nothing stored for the URI, a stored one to refresh, or neither.
        fwd = "uri-miss" if stored is None else "stale" if usable else "miss"
        answer = await self._fetch(request, key, stored if usable else None, decision, joined)
        if not answer.cache_detail and answer.cache_status != "BYPASS":
            answer.cache_detail = f"fwd={fwd}" + (f"; detail={hooks}" if hooks else "")
        return answer

    # ------------------------------------------------------------------ fetching

    async def _fetch(
        self,
        request: ProxyRequest,
        key: str,
        stale: Stored | None,
        decision: Revalidate | Miss,
        joined: Joined | None = None,
    ) -> ProxyResponse:
        if request.method == "HEAD" and isinstance(decision, Miss):
            return await self._head(request, stale)
        flight = self.flights.get(key) if joined is None else joined.pending.flight
        starter = flight is None or (joined is not None and joined.pending.starter)
        try:
            if flight is None:
                flight = self._start(key, request, stale)
                outcome = await asyncio.shield(flight.head)
            elif joined is not None and joined.pending.starter:
                outcome = _settled(joined.result)  # the edge started it and awaited its head
            else:
                early = None if joined is None else joined.result
                outcome = await self._wait(flight, request, stale, early)
        except ProxyError as e:
            if e.stale_ok and stale is not None and self.answers.stale_ok(stale, e):
                self.answers.count("stale", "error")
                return self.answers.stale(request, stale, e.code)
            self.answers.count("miss", "error")
            raise
        failed = outcome.status in ERROR_STATUSES and outcome.stream is None
        if failed and stale is not None and self.answers.stale_ok(stale, None):
            why = f"upstream_{outcome.status}"
            self.answers.count("stale", why)
            return self.answers.stale(request, stale, why, outcome.status)
        self.answers.count(outcome.cache_status.lower(), outcome.reason)
        answer = self.answers.outcome(request, outcome)
        if starter or outcome.upstream_status is not None:
            # A waiter's answer came from the starter's exchange: its time, as nginx logs
            # $upstream_response_time for a request answered by a locked cache fill.
            answer.upstream_seconds = flight.upstream_seconds
        return answer

    async def _wait(
        self,
        flight: Flight,
        request: ProxyRequest,
        stale: Stored | None,
        early: Outcome | Exception | None = None,
    ) -> Outcome:
        """The flight's outcome for a joiner (``early``: what the edge's wait got)."""
        try:
            if early is None:
                outcome = await self.flights.join(flight, self.config.coalesce_wait)
            elif isinstance(early, Exception):
                raise early
            else:
                outcome = early
            self.coalesced.inc()
            trace().fetched_by = flight.request.request_id  # the access line says whose
            return outcome
        except TimeoutError:
            self.metrics.cache_coalesced.labels("gave_up").inc()
        except GoAlone:
            pass
        alone = self._start(flight.key, request, stale, alone=True)
        return await asyncio.shield(alone.head)

    async def _head(self, request: ProxyRequest, stale: Stored | None) -> ProxyResponse:
        """A HEAD with nothing stored goes through as it is (there is no body to store)."""
        try:
            response = await self.inner.send(request)
        except ProxyError as e:
            if e.stale_ok and stale is not None and self.answers.stale_ok(stale, e):
                return self.answers.stale(request, stale, e.code)
            raise
        response.cache_status = "MISS"
        self.answers.count("miss", "head")
        return response

    def _start(
        self,
        key: str,
        request: ProxyRequest,
        stale: Stored | None,
        *,
        alone: bool = False,
        unwanted: bool = False,
        eager: bool = False,
    ) -> Flight:
        # Another replica's copy (Redis) is held to the same webhook rule as a local one.
        hold = functools.partial(held, self.feeds, self.rules(), request.account)

        async def fly(flight: Flight) -> Outcome:
            fetch = functools.partial(self.exchange.run, flight, stale)
            # Another replica's 304 for the same stored entry, applied here (Redis).
            adopt = functools.partial(self.exchange.adopt, flight, stale)
            return await self.entries.obtain(flight, fetch, hold, adopt)

        return self.flights.start(
            key,
            request,
            self.entries.sequence,
            fly,
            self.entries.finish,
            alone=alone,
            unwanted=unwanted,
            eager=eager,
        )

    # ------------------------------------------------------------------ writes

    async def _write(self, request: ProxyRequest) -> ProxyResponse:
        status: int | None = None
        headers: HeaderItems = ()
        try:
            response = await self.inner.send(request)
            status, headers = response.status, tuple(response.headers.items())
            response.cache_status = "BYPASS"
            return response
        finally:
            inv = invalidation(
                request.account, request.method, request.path, status, headers, self.origin
            )
            if inv is not None:
                # Here, in Redis and told to the other replicas, before the answer goes out.
                await self.invalidator.apply(inv)

    async def close(self) -> None:
        # Flights first: a flight cancelled here finishes against the tier (Redis) still open.
        await self.flights.close()
        await self.entries.close()


def _settled(result: Outcome | Exception) -> Outcome:
    """A flight's answer as awaiting its head gives it: the outcome, or what it raised."""
    if isinstance(result, Exception):
        raise result
    return result
