"""The cache layer: applies :mod:`proxy.cache.policy`'s decisions and does the I/O.

Outermost layer of the pipeline, read top-down like hishel's loop. For GET/HEAD it looks
the key up in its :class:`~proxy.cache.tiers.Entries`, asks the policy what to do, and acts:
a fresh hit is answered from the store; a stale or missing entry is fetched (or revalidated
with its ETag) in one shared flight per key (:mod:`proxy.cache.flight`), one upstream
exchange each (:mod:`proxy.cache.exchange`). Unsafe methods pass through and hand what they
may have changed to the :class:`~proxy.cache.invalidation.Invalidator`.

Where entries live (this process, or Redis too) is the tier's business: nothing here asks.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import replace
from typing import assert_never

from multidict import CIMultiDictProxy

from proxy import errors
from proxy.cache.answers import Answers, refuse_repeated_vary
from proxy.cache.exchange import Exchange
from proxy.cache.fastlook import (
    BodyFor,
    FastAnswer,
    Joined,
    Looked,
    Pending,
    plain_answer,
    taken,
)
from proxy.cache.flight import Flight, Flights, GoAlone, Outcome
from proxy.cache.invalidation import Invalidator
from proxy.cache.memory import Stored
from proxy.cache.metrics import CacheMetrics
from proxy.cache.policy import (
    ERROR_STATUSES,
    NO_CONTROL,
    SELECTING,
    UNSAFE_METHODS,
    BusyStale,
    Entry,
    FreshHit,
    HeaderItems,
    Headers,
    Miss,
    OnlyIfCachedMiss,
    RequestControl,
    Revalidate,
    ServeStale,
    bypass,
    cache_key,
    fresh_age,
    invalidation,
    lookup,
    not_modified_headers,
    request_control,
    rule_for,
    stale_while_busy,
)
from proxy.cache.store import CacheStore
from proxy.cache.tiers import Entries, LocalEntries
from proxy.cache.webhooks.health import Feeds
from proxy.clock import WallClock
from proxy.errors import ProxyError
from proxy.logs import trace
from proxy.messages import Layer, ProxyRequest, ProxyResponse
from proxy.settings import CacheRule, LiveCache, Settings, live_of

# Seconds a request of (account, caller, class) would now wait for a budget token (no I/O).
ExpectedWait = Callable[[str, str, str], float]
# Who background refreshes wait in the budget's batch class as (one round-robin turn).
REFRESHER = "cache-refresh"


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
        self.busy = busy
        self.busy_after = settings.budget.busy_after
        self.total_timeout = settings.upstream.total_timeout
        # Background refreshes (stale-while-revalidate, stale-while-busy): one per key.
        self.refreshes: dict[str, Flight] = {}

    @property
    def tasks(self) -> set[asyncio.Task[object]]:
        return self.flights.tasks

    def rules(self) -> tuple[CacheRule, ...]:
        return self.current().rules

    def key(self, account: str, path: str, query: str, headers: Headers) -> str:
        """:func:`cache_key`, remembered: its JSON encoding is a large part of a fresh hit."""
        return _key(account, path, query, *map(headers.get, SELECTING))

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
        if self.on_read is not None and _webhook_rule(request.path, self.rules()) is not None:
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

    def _webhook_fresh(self, account: str, stored: Stored | None) -> tuple[Stored | None, str]:
        """A webhook rule's entry as :meth:`_held` holds it, and the Cache-Status detail
        saying which ("": no webhook rule)."""
        if stored is None:
            return None, ""
        if _webhook_rule(stored.entry.path, self.rules()) is None:
            return stored, ""
        held = self._held(account, stored.entry)
        if held is stored.entry:
            return stored, "webhooks"
        return replace(stored, entry=held), "webhooks-fallback"

    def _held(self, account: str, entry: Entry) -> Entry:
        """A webhook rule's entry keeps its ``fresh_for`` while the account's feed is
        healthy and was trusted when the entry was stored; otherwise (distrusted now, or
        stored before a distrust ended: a lost delivery may have left it stale) it is fresh
        for ``fallback_fresh_for`` at most. Entries of other rules: unchanged."""
        rule = _webhook_rule(entry.path, self.rules())
        if rule is None:
            return entry
        healthy = self.feeds.healthy(account)
        if healthy and entry.response_time >= self.feeds.trusted_since(account):
            return entry
        return replace(entry, fresh_for=min(entry.fresh_for, rule.fallback_fresh_for))

    async def _decide(
        self, request: ProxyRequest, control: RequestControl, key: str, stored: Stored | None
    ) -> ProxyResponse:
        original = stored
        stored, hooks = self._webhook_fresh(request.account, stored)
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
                self._refresh(key, request, stored)
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
                busy = self._busy_stale(request, control, key, stored)
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
        """Fetch or revalidate (or join the flight doing so; ``joined``: joined at the edge
        already), and say why in Cache-Status."""
        usable = isinstance(decision, Revalidate) or decision.stale is not None
        # RFC 9211 fwd: nothing stored for the URI, a stored one to refresh, or neither.
        fwd = "uri-miss" if stored is None else "stale" if usable else "miss"
        answer = await self._fetch(request, key, stored if usable else None, decision, joined)
        if not answer.cache_detail and answer.cache_status != "BYPASS":
            answer.cache_detail = f"fwd={fwd}" + (f"; detail={hooks}" if hooks else "")
        return answer

    def _busy_stale(
        self, request: ProxyRequest, control: RequestControl, key: str, stored: Stored
    ) -> ProxyResponse | None:
        """Stale-while-busy: the stored answer at once when the request's token is further off
        than ``budget.busy_after`` (:func:`~proxy.cache.policy.stale_while_busy` decides), and
        a refresh behind at batch priority; None: the request goes on as usual."""
        expected = self.busy
        if expected is None:
            return None
        entry = stored.entry
        window = _busy_window(entry.path, self.rules(), self.config.stale_while_busy)
        decision = stale_while_busy(
            entry,
            control,
            self.clock(),
            window=window,
            wait=lambda: expected(request.account, request.caller, request.priority),
            busy_after=self.busy_after,
        )
        if not isinstance(decision, BusyStale):
            return None
        self.answers.count("stale", "busy")
        self._refresh(key, request, stored)
        answer = self.answers.from_store(request, stored, "STALE", decision.age)
        answer.cache_detail = "fwd=stale; detail=budget"
        return answer

    def _refresh(self, key: str, request: ProxyRequest, stored: Stored) -> None:
        """A background revalidation of ``stored``, at batch priority, one per key (none
        while one is out, or while a caller's fetch of the key is). Not joinable: a caller's
        own fetch never waits behind it at batch priority. The budget drops it once it is no
        longer useful: the entry was invalidated or replaced by a newer one meanwhile, or no
        token comes within ``budget.max_wait``."""
        if key in self.refreshes or key in self.flights:
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
        )
        flight = self._start(key, background, stored, alone=True, unwanted=True)
        started.append(flight)
        self.refreshes[key] = flight

        def over(_: object) -> None:
            if self.refreshes.get(key) is flight:
                del self.refreshes[key]

        flight.done.add_done_callback(over)

    def _still_wanted(self, flight: Flight, stored: Stored) -> bool:
        if self.entries.stale(flight, stored.entry):
            return False  # invalidated since: the next caller fetches anew
        current = self.entries.hot(flight.key)
        return current is None or current.entry.response_time <= stored.entry.response_time

    def fresh_hit(
        self,
        account: str,
        path: str,
        query: str,
        headers: Headers,
        body_for: BodyFor | None = None,
    ) -> FastAnswer | None:
        """Status, upstream headers, body and age of the answer to a plain GET (no
        Cache-Control; If-None-Match and If-Modified-Since allowed) that a fresh 200 held in
        memory gives; else None, and nothing is counted.

        ``body_for`` turns the stored body into the one to send (the caller's coding); when
        it gives None the long way answers. Used by :mod:`proxy.edge.fast`; :meth:`send`
        reaches the same answer the long way.
        """
        found = self._plain(self.key(account, path, query, headers))
        if found is None:
            return None
        entry, stored_body = found[0].entry, found[1]
        fresh = fresh_age(entry, self.clock())
        if fresh is None:
            return None
        return plain_answer(self.answers, entry, stored_body, int(fresh), headers, body_for)

    def _plain(self, key: str) -> tuple[Stored, bytes] | None:
        """The memory tier's entry for ``key`` if the fast path may answer from it: a 200
        with its body in memory, no extra Vary names (compared the long way), no webhook
        rule (the feed's health decides, and Cache-Status says so: the long way)."""
        stored = self.entries.hot(key)
        if stored is None or stored.body is None:
            return None
        entry = stored.entry
        if entry.status != 200 or entry.vary:
            return None
        if _webhook_rule(entry.path, self.rules()) is not None:
            return None
        return stored, stored.body

    # ------------------------------------------------------------------ joiners at the edge

    def joinable(self, account: str, path: str, query: str, headers: Headers) -> Pending | None:
        """For a plain GET (as :meth:`fresh_hit` takes) whose stored 200 in memory a flight
        in progress revalidates: where the long way would be when it joins that flight (its
        lookup and decision made, without I/O); else None. Counts nothing."""
        key = self.key(account, path, query, headers)
        flight = self.flights.get(key)
        if flight is None:
            return None
        found = self._plain(key)
        if found is None:
            return None
        decision = lookup(found[0].entry, headers, NO_CONTROL, self.clock())
        if not isinstance(decision, Revalidate):
            return None
        return Pending(key, flight, found[0], decision)

    async def wait(self, pending: Pending) -> Outcome | Exception:
        """The pending request's flight's outcome, or what waiting for it raised (the long
        way's :meth:`_wait` decides what that means, see
        :func:`~proxy.cache.fastlook.handing_over`)."""
        try:
            return await self.flights.join(pending.flight, self.config.coalesce_wait)
        except Exception as e:
            return e

    def joined(
        self, pending: Pending, outcome: Outcome, headers: Headers, body_for: BodyFor | None
    ) -> tuple[FastAnswer, float | None] | None:
        """A joiner's answer when its flight freshened the stored 200 in memory (what the
        long way's :meth:`_wait`, :meth:`_fetch` and :meth:`Answers.outcome` give, counted as
        they count), and the upstream time it shares; None, counting nothing: the long way
        goes on from ``outcome`` (:func:`~proxy.cache.fastlook.handing_over`)."""
        stored, entry = outcome.stored, outcome.entry
        if (
            outcome.cache_status != "REVALIDATED"
            or outcome.status != 200
            or outcome.stream is not None
            or stored is None
            or stored.body is None
            or entry is None
        ):
            return None
        answer: FastAnswer
        age = int(entry.age(self.clock()))
        if self.answers.caller_304(200, outcome.headers, headers):
            answer = 304, not_modified_headers(outcome.headers), b"", age
        else:
            body = stored.body if body_for is None else body_for(outcome.headers, stored.body)
            if body is None:
                return None
            answer = 200, outcome.headers, body, age
        flight = pending.flight
        self.coalesced.inc()
        trace().fetched_by = flight.request.request_id
        self.answers.count("revalidated", outcome.reason)
        return answer, flight.upstream_seconds

    def cold(self, account: str, path: str, query: str, headers: Headers) -> bool:
        """Whether the memory tier has nothing for a plain GET (:meth:`tier_hit` may look)."""
        return self.entries.hot(self.key(account, path, query, headers)) is None

    async def tier_hit(
        self,
        account: str,
        path: str,
        query: str,
        headers: Headers,
        body_for: BodyFor | None,
        proxied: Callable[[], CIMultiDictProxy[str]],
    ) -> FastAnswer | Looked:
        """For a plain GET (as :meth:`fresh_hit` takes) the memory tier has nothing for: the
        tier's lookup (disk, Redis: promoted as :meth:`send` promotes), and the answer when
        it is a fresh 200 the long way would send as a plain HIT (same decision: the webhook
        hold, Vary, :func:`lookup`); else what was found, counting nothing, for the long way
        (:func:`~proxy.cache.fastlook.handing_over`). ``proxied``: the headers of the request
        the long way would make (what a stored Vary selects by), only made when needed."""
        key = self.key(account, path, query, headers)
        looked = Looked(key, await self.entries.lookup(account, key))
        stored, hooks = self._webhook_fresh(account, looked.stored)
        if stored is None or stored.body is None or hooks or stored.entry.status != 200:
            return looked
        selecting: Headers = headers
        if stored.entry.vary:  # selected by the request made of the caller's, as in send()
            try:
                refuse_repeated_vary(stored.entry, selecting := proxied())
            except ProxyError:
                return looked  # the long way refuses it
        decision = lookup(stored.entry, selecting, NO_CONTROL, self.clock())
        if not isinstance(decision, FreshHit):
            return looked
        age = int(decision.age)
        answer = plain_answer(self.answers, stored.entry, stored.body, age, headers, body_for)
        return looked if answer is None else answer

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
        starter = flight is None
        try:
            if flight is None:
                flight = self._start(key, request, stale)
                outcome = await asyncio.shield(flight.head)
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
    ) -> Flight:
        # Another replica's copy (Redis) is held to the same webhook rule as a local one.
        hold = functools.partial(self._held, request.account)

        async def fly(flight: Flight) -> Outcome:
            fetch = functools.partial(self.exchange.run, flight, stale)
            return await self.entries.obtain(flight, fetch, hold)

        return self.flights.start(
            key,
            request,
            self.entries.sequence,
            fly,
            self.entries.finish,
            alone=alone,
            unwanted=unwanted,
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


@functools.lru_cache(maxsize=4096)
def _key(account: str, path: str, query: str, *selecting: str | None) -> str:
    sent = {n: v for n, v in zip(SELECTING, selecting, strict=True) if v is not None}
    return cache_key(account, path, query, sent)


@functools.lru_cache(maxsize=4096)
def _webhook_rule(path: str, rules: tuple[CacheRule, ...]) -> CacheRule | None:
    """The rule for ``path`` if it opts in to webhooks (``webhooks = true``)."""
    rule = rule_for(path, rules)
    return rule if rule is not None and rule.webhooks else None


@functools.lru_cache(maxsize=4096)
def _busy_window(path: str, rules: tuple[CacheRule, ...], default: float) -> float:
    """Seconds past freshness ``path``'s entries may answer while the budget is busy: its
    rule's ``stale_while_busy`` where set, else ``cache.stale_while_busy``."""
    rule = rule_for(path, rules)
    if rule is not None and rule.stale_while_busy is not None:
        return rule.stale_while_busy
    return default
