"""The cache layer: applies :mod:`proxy.cache.policy`'s decisions and does the I/O.

Outermost layer of the pipeline. For GET/HEAD it looks the key up, then matches on
the decision: a fresh hit is answered from the store; a stale or missing entry is
fetched (or revalidated with its ETag) in one shared *flight* per key, which every
concurrent request for that key waits on. A flight is a task of its own, so it
outlives the caller that started it, and it resolves two futures: ``head`` (the
starter's answer, possibly a stream) and ``done`` (the whole result, for waiters).
Unsafe methods pass through and invalidate what they may have changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, assert_never

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import errors
from proxy.cache.flight import Flight, GoAlone, Outcome, settle
from proxy.cache.policy import (
    CALLER_CONDITIONALS,
    ERROR_STATUSES,
    SELECTING,
    UNSAFE_METHODS,
    Entry,
    Freshened,
    FreshHit,
    HeaderItems,
    Headers,
    Invalidation,
    Miss,
    NotStorable,
    OnlyIfCachedMiss,
    Refetch,
    RequestControl,
    Revalidate,
    ServeStale,
    TakeBody,
    UpstreamFailed,
    answered,
    bypass,
    cache_key,
    fresh_age,
    invalidation,
    lookup,
    not_modified,
    not_modified_headers,
    parse_key,
    request_control,
    stale_on_error,
    to_entry,
    validators,
)
from proxy.cache.shared import SharedEntries
from proxy.cache.store import BodySink, CacheStore, Stored
from proxy.clock import WallClock
from proxy.errors import ProxyError
from proxy.logs import debug, trace
from proxy.messages import ERROR_BODY_LIMIT, CacheStatus, Layer, ProxyRequest, ProxyResponse
from proxy.metrics import Metrics
from proxy.settings import CacheRule, CacheSettings, LiveCache, Settings, live_of

# The body a fresh hit sends, from the stored headers and body (None: not here).
BodyFor = Callable[[HeaderItems, bytes], bytes | None]
# Chunks a streaming starter may fall behind the upstream before the flight stops feeding it.
TEE_DEPTH = 8
# Says a stored answer stands in for one the upstream failed to give (RFC 7234 5.5.2).
STALE_WARNING = '111 - "Revalidation Failed"'


def refuse_repeated_vary(entry: Entry, headers: CIMultiDictProxy[str]) -> None:
    """A header the stored answer varies on must come once: with two lines the upstream may
    read the other one than the one the entry was selected by (the edge refuses repeated
    Accept, X-Page and X-Pretty-Print the same way)."""
    for name, _ in entry.vary:
        if len(headers.getall(name, ())) > 1:
            raise errors.InvalidRequest(
                f"Header {name} is sent more than once; it selects the answer, so send it once",
                code="repeated_header",
            )


class Cache:
    def __init__(
        self,
        inner: Layer,
        store: CacheStore,
        settings: Settings,
        metrics: Metrics,
        clock: WallClock,
        current: Callable[[], LiveCache] | None = None,
    ) -> None:
        self.inner = inner
        self.store = store
        self.config: CacheSettings = settings.cache
        # The cache's live slice (a SIGHUP reload may change the rules); read per decision.
        started = live_of(settings).cache
        self.current = current or (lambda: started)
        self.origin = str(settings.upstream.url.origin())
        self.read_timeout = settings.upstream.read_timeout
        self.metrics = metrics
        self.clock = clock
        self.flights: dict[str, Flight] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        # Tells other replicas about an invalidation before the writer's answer goes out
        # (proxy.cache.broadcast; None: this process is alone).
        self.announce: Callable[[Invalidation], Awaitable[None]] | None = None
        # Entries shared with the other replicas in Redis (None: this process's own only).
        self.shared: SharedEntries | None = None

    def rules(self) -> tuple[CacheRule, ...]:
        return self.current().rules

    # ------------------------------------------------------------------ entry point

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        if request.method in UNSAFE_METHODS:
            return await self._write(request)
        headers = request.headers
        control = request_control(headers.getall("Cache-Control", []), headers.getall("Pragma", []))
        skip = bypass(request.method, headers, control)
        if skip is not None:
            self._count("bypass", skip.code)
            response = await self.inner.send(request)
            response.cache_status = "BYPASS"
            return response
        key = self.key(request.account, request.path, request.query, request.headers)
        if self.shared is None:
            stored = await self.store.get(key)
        else:
            stored = await self._lookup(self.shared, request.account, key)
        if stored is not None:
            refuse_repeated_vary(stored.entry, headers)
        return await self._decide(request, control, key, stored)

    async def _lookup(self, shared: SharedEntries, account: str, key: str) -> Stored | None:
        """Memory tier, then Redis (a hit there joins the memory tier), then the local disk."""
        hot = self.store.hot.get(key)
        if hot is not None:
            return hot
        sequence = self.store.sequence
        found = await shared.get(account, key)
        if found is None:
            return await self.store.get(key)
        entry = found.entry
        if self.store.invalidated_since(sequence, entry.account, entry.path):
            return await self.store.get(key)  # read before an invalidation: maybe older
        newer = self.store.hot.get(key)
        if newer is not None:
            return newer  # stored here while Redis answered
        self.store.promote(key, found)
        return found

    def key(self, account: str, path: str, query: str, headers: Headers) -> str:
        """:func:`cache_key`, remembered: its JSON encoding is a large part of a fresh hit."""
        return _key(account, path, query, *map(headers.get, SELECTING))

    def fresh_hit(
        self,
        account: str,
        path: str,
        query: str,
        headers: Headers,
        body_for: BodyFor | None = None,
    ) -> tuple[int, HeaderItems, bytes, int] | None:
        """Status, upstream headers, body and age of the answer to a plain GET (no
        Cache-Control; If-None-Match and If-Modified-Since allowed) that a fresh 200 held in
        memory gives; else None, and nothing is counted.

        ``body_for`` turns the stored body into the one to send (the caller's coding); when
        it gives None the long way answers. Used by :mod:`proxy.edge.fast`; :meth:`send`
        reaches the same answer the long way.
        """
        stored = self.store.hot.get(self.key(account, path, query, headers))
        if stored is None or stored.body is None:
            return None
        entry = stored.entry
        if entry.status != 200 or entry.vary:  # extra Vary names: compared the long way
            return None
        fresh = fresh_age(entry, self.clock())
        if fresh is None:
            return None
        age = int(fresh)
        conditional = any(name in headers for name in CALLER_CONDITIONALS)
        if conditional and not_modified(200, entry.headers, headers):
            self._count("hit", "fresh")  # the caller's own 304 is still one hit
            return 304, not_modified_headers(entry.headers), b"", age
        body = stored.body if body_for is None else body_for(entry.headers, stored.body)
        if body is None:
            return None
        self._count("hit", "fresh")
        return 200, entry.headers, body, age

    def _caller_304(self, status: int, stored: HeaderItems, headers: Headers) -> bool:
        """Whether the caller's own conditionals make the answer a 304 (the lookup is
        counted once, by what the cache did: one answer, one lookup)."""
        if not any(name in headers for name in CALLER_CONDITIONALS):
            return False  # the common case, without parsing anything
        return not_modified(status, stored, headers)

    async def _decide(
        self, request: ProxyRequest, control: RequestControl, key: str, stored: Stored | None
    ) -> ProxyResponse:
        now = self.clock()
        decision = lookup(stored.entry if stored else None, request.headers, control, now)
        if isinstance(decision, FreshHit):
            assert stored is not None
            self._count("hit", "fresh")
            return self._from_store(request, stored, "HIT", decision.age)
        if isinstance(decision, ServeStale):
            assert stored is not None
            self._count("stale", "while_revalidate" if decision.refresh else "max_stale")
            if decision.refresh:
                self._refresh(key, request, stored)
            answer = self._from_store(request, stored, "STALE", decision.age)
            why = "stale-while-revalidate" if decision.refresh else "max-stale"
            answer.cache_detail = f"hit; detail={why}"
            return answer
        if isinstance(decision, OnlyIfCachedMiss):
            self._count("miss", "only_if_cached")
            raise errors.OnlyIfCachedMiss(
                "Nothing usable is stored for this request (Cache-Control: only-if-cached)"
            )
        if isinstance(decision, Revalidate | Miss):
            # Another request may have stored it while this one read the disk.
            newer = self.store.hot.get(key)
            if newer is not None and newer is not stored:
                return await self._decide(request, control, key, newer)
            usable = isinstance(decision, Revalidate) or decision.stale is not None
            # RFC 9211 fwd: nothing stored for the URI, a stored one to refresh, or neither.
            fwd = "uri-miss" if stored is None else "stale" if usable else "miss"
            answer = await self._fetch(request, key, stored if usable else None, decision)
            if not answer.cache_detail and answer.cache_status != "BYPASS":
                answer.cache_detail = f"fwd={fwd}"
            return answer
        assert_never(decision)

    # ------------------------------------------------------------------ answering

    def _from_store(
        self, request: ProxyRequest, stored: Stored, status: CacheStatus, age: float | None
    ) -> ProxyResponse:
        entry = stored.entry
        return self._respond(
            request,
            entry.status,
            entry.headers,
            stored,
            status,
            None if age is None else int(age),
        )

    def _respond(
        self,
        request: ProxyRequest,
        status: int,
        headers: tuple[tuple[str, str], ...],
        stored: Stored | None,
        cache_status: CacheStatus,
        age: int | None,
        upstream_status: int | None = None,
    ) -> ProxyResponse:
        if self._caller_304(status, headers, request.headers):
            return ProxyResponse(
                status=304,
                headers=CIMultiDict(not_modified_headers(headers)),
                body=b"",
                cache_status=cache_status,
                upstream_status=upstream_status,
                age=age,
            )
        response = ProxyResponse(
            status=status,
            headers=CIMultiDict(headers),
            cache_status=cache_status,
            upstream_status=upstream_status,
            age=age,
        )
        if stored is None:
            return response
        if request.method == "HEAD":
            # HEAD answers with the headers a GET would get, the body's length included.
            response.headers["Content-Length"] = str(stored.entry.size)
        elif stored.body is not None:
            response.body = stored.body
        else:
            stream = self.store.body(stored)
            # release() (the answer's finally) closes the file if the caller left early.
            response.body, response.release = stream, stream.aclose
            response.headers["Content-Length"] = str(stored.entry.size)
        return response

    def _stale_ok(self, stale: Stored, error: ProxyError | None) -> bool:
        """Whether ``stale`` may answer for a failed fetch: ``error`` raised, or (None) an
        error status. An :class:`~proxy.errors.UpstreamError` (refused, reset, timed out,
        the breaker open) means the origin could not be reached, which
        ``cache.stale_if_error`` covers for every stored GET (policy.stale_on_error)."""
        unreachable = isinstance(error, errors.UpstreamError)
        default = self.config.stale_if_error
        return stale_on_error(stale.entry, self.clock(), unreachable=unreachable, default=default)

    def _stale(
        self, request: ProxyRequest, stale: Stored, why: str, status: int | None = None
    ) -> ProxyResponse:
        """The stored answer for a failed fetch, saying so: Warning 111 (RFC 7234 5.5.2) and
        the RFC 9211 parameters of the proxy's one Cache-Status member, which the edge adds
        (``fwd=stale``, the upstream's status if it answered, and ``detail`` = the failure's
        code, e.g. ``upstream_unreachable`` or ``upstream_503``, as the lookup metrics say)."""
        response = self._from_store(request, stale, "STALE", stale.entry.age(self.clock()))
        response.headers["Warning"] = STALE_WARNING
        forwarded = "fwd=stale" if status is None else f"fwd=stale; fwd-status={status}"
        response.cache_detail = f"{forwarded}; detail={why}"
        return response

    def _answer(self, request: ProxyRequest, outcome: Outcome) -> ProxyResponse:
        age = None
        if outcome.entry is not None and outcome.cache_status != "MISS":
            age = int(outcome.entry.age(self.clock()))
        if outcome.stream is not None:
            stream = outcome.stream
            stream.cache_status = outcome.cache_status
            if request.method != "HEAD" and not not_modified(
                outcome.status, outcome.headers, request.headers
            ):
                return stream
            self._spawn(stream.release())
        return self._respond(
            request,
            outcome.status,
            outcome.headers,
            outcome.stored,
            outcome.cache_status,
            age,
            outcome.upstream_status,
        )

    # ------------------------------------------------------------------ fetching

    async def _fetch(
        self,
        request: ProxyRequest,
        key: str,
        stale: Stored | None,
        decision: Revalidate | Miss,
    ) -> ProxyResponse:
        if request.method == "HEAD" and isinstance(decision, Miss):
            return await self._head(request, stale)
        flight = self.flights.get(key)
        starter = flight is None
        try:
            if flight is None:
                flight = self._start(key, request, stale)
                outcome = await asyncio.shield(flight.head)
            else:
                outcome = await self._wait(flight, request, stale)
        except ProxyError as e:
            if e.stale_ok and stale is not None and self._stale_ok(stale, e):
                self._count("stale", "error")
                return self._stale(request, stale, e.code)
            self._count("miss", "error")
            raise
        failed = outcome.status in ERROR_STATUSES and outcome.stream is None
        if failed and stale is not None and self._stale_ok(stale, None):
            self._count("stale", f"upstream_{outcome.status}")
            why = f"upstream_{outcome.status}"
            return self._stale(request, stale, why, outcome.status)
        self._count(outcome.cache_status.lower(), outcome.reason)
        answer = self._answer(request, outcome)
        if starter or outcome.upstream_status is not None:
            # A waiter's answer came from the starter's exchange: its time, as nginx logs
            # $upstream_response_time for a request answered by a locked cache fill.
            answer.upstream_seconds = flight.upstream_seconds
        return answer

    async def _wait(self, flight: Flight, request: ProxyRequest, stale: Stored | None) -> Outcome:
        try:
            outcome = await asyncio.wait_for(asyncio.shield(flight.done), self.config.coalesce_wait)
            self.metrics.cache_coalesced.labels("shared").inc()
            trace().fetched_by = flight.request.request_id  # the access line says whose
            return outcome
        except TimeoutError:
            self.metrics.cache_coalesced.labels("gave_up").inc()
        except GoAlone:
            pass
        alone = self._start(flight.key, request, stale, register=False)
        return await asyncio.shield(alone.head)

    async def _head(self, request: ProxyRequest, stale: Stored | None) -> ProxyResponse:
        """A HEAD with nothing stored goes through as it is (there is no body to store)."""
        try:
            response = await self.inner.send(request)
        except ProxyError as e:
            if e.stale_ok and stale is not None and self._stale_ok(stale, e):
                return self._stale(request, stale, e.code)
            raise
        response.cache_status = "MISS"
        self._count("miss", "head")
        return response

    def _start(
        self, key: str, request: ProxyRequest, stale: Stored | None, *, register: bool = True
    ) -> Flight:
        flight = Flight(key, request, self.store.sequence)
        if register:
            self.flights[key] = flight
        flight.task = self._spawn(self._fly(flight, stale))
        return flight

    def _refresh(self, key: str, request: ProxyRequest, stored: Stored) -> None:
        """One background revalidation per key (stale-while-revalidate)."""
        if key in self.flights:
            return
        flight = self._start(key, replace(request, method="GET"), stored)
        flight.starter_gone = True
        flight.head.add_done_callback(self._drop_unwanted)

    def _drop_unwanted(self, head: asyncio.Future[Outcome]) -> None:
        if not head.cancelled() and head.exception() is None:
            stream = head.result().stream
            if stream is not None:
                self._spawn(stream.release())

    def _spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _fly(self, flight: Flight, stale: Stored | None) -> None:
        try:
            outcome = await self._obtain(flight, stale)
            settle(flight.head, outcome)
            if outcome.stream is None:
                settle(flight.done, outcome)
            await self._share(flight)  # after the answer went out, before the lock goes
        except BaseException as e:
            failure = e if isinstance(e, Exception) else errors.UpstreamUnreachable("cancelled")
            settle(flight.head, failure)
            settle(flight.done, failure)
            if not isinstance(e, Exception):
                raise
        finally:
            if not flight.spilling:
                settle(flight.done, GoAlone())
                self._unregister(flight)

    def _unregister(self, flight: Flight) -> None:
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]
        owner, flight.owner = flight.owner, None
        if owner is not None and self.shared is not None:
            # Only now: what the flight stored in Redis is there before waiters see it free.
            self._spawn(self.shared.release(flight.request.account, flight.key, owner))

    async def _obtain(self, flight: Flight, stale: Stored | None) -> Outcome:
        """With shared entries: take the key's fetch lock in Redis, or wait for the replica
        that holds it to store the entry and answer from that; else (Redis away, the
        owner stored nothing, or it took longer than ``cache.coalesce_wait``) fetch here."""
        shared = self.shared
        if shared is None:
            return await self._exchange(flight, stale)
        account = flight.request.account
        claim = await shared.claim(account, flight.key)
        if claim is not None:
            flight.gen, flight.owner = claim.gen, claim.owner
            if claim.owner is None:
                found = await shared.wait(account, flight.key, self.config.coalesce_wait)
                if found is not None and self._usable(flight, found):
                    self.store.promote(flight.key, found)
                    entry = found.entry
                    return Outcome(
                        entry.status,
                        entry.headers,
                        "MISS",
                        None,
                        stored=found,
                        entry=entry,
                        reason="other_replica",
                    )
        return await self._exchange(flight, stale)

    def _usable(self, flight: Flight, found: Stored) -> bool:
        """Whether another replica's fresh entry answers this flight's request."""
        entry = found.entry
        if flight.cancelled or self.store.invalidated_since(
            flight.sequence, entry.account, entry.path
        ):
            return False
        return fresh_age(entry, self.clock()) is not None and entry.selects(flight.request.headers)

    async def _share(self, flight: Flight) -> None:
        """Store the flight's entry in Redis, unless an invalidation came meanwhile."""
        stored, flight.share = flight.share, None
        if stored is None or self.shared is None or flight.gen is None:
            return
        entry = stored.entry
        if flight.cancelled or self.store.invalidated_since(
            flight.sequence, entry.account, entry.path
        ):
            return
        await self.shared.put(flight.key, stored, flight.gen, self.clock())

    async def _exchange(self, flight: Flight, stale: Stored | None) -> Outcome:
        request = flight.request
        headers = CIMultiDict(request.headers)
        for name in CALLER_CONDITIONALS:
            headers.popall(name, None)
        entry = stale.entry if stale is not None else None
        if entry is not None:
            headers.update(validators(entry))
        sent = replace(request, method="GET", headers=CIMultiDictProxy(headers))
        request_time = self.clock()
        response = await self.inner.send(sent)
        response_time = self.clock()
        response.add_upstream_time(flight.upstream_seconds)  # a refetch after a 304
        flight.upstream_seconds = response.upstream_seconds
        items = tuple(response.headers.items())
        decision = answered(
            entry, response.status, items, request_time, response_time, self.rules()
        )
        if isinstance(decision, Freshened):
            await response.release()
            # Counted by _fetch, once per answer (a background refresh answers nobody).
            # The body (and its CRC32) as stored; only the headers are freshened.
            fresh = (
                replace(stale, entry=decision.entry)
                if stale is not None
                else Stored(decision.entry, None)
            )
            self._keep(flight, fresh)
            return Outcome(
                decision.entry.status,
                decision.entry.headers,
                "REVALIDATED",
                304,
                stored=fresh,
                entry=decision.entry,
                reason="not_modified",
            )
        if isinstance(decision, Refetch):
            await response.release()
            return await self._exchange(flight, None)
        if isinstance(decision, UpstreamFailed):
            body = await response.read(limit=ERROR_BODY_LIMIT)
            return Outcome(
                response.status,
                items,
                "MISS",
                response.status,
                stored=Stored(_placeholder(response.status, items, len(body)), body),
                reason=f"upstream_{response.status}",
            )
        if not isinstance(decision, TakeBody):
            assert_never(decision)
        if decision.forget:
            self.store.delete(flight.key)
        outcome = await self._take_body(flight, response, request_time, response_time)
        if outcome.cache_status == "MISS":
            outcome.reason = "changed" if entry is not None else "cold"
        return outcome

    async def _take_body(
        self, flight: Flight, response: ProxyResponse, request_time: float, response_time: float
    ) -> Outcome:
        items = tuple(response.headers.items())
        length = response.headers.get("Content-Length", "")
        declared = int(length) if length.isdigit() else 0
        entry = self._entry(flight, response.status, items, declared, request_time, response_time)
        if isinstance(entry, NotStorable):
            self.metrics.cache_stores.labels(_store_label(entry)).inc()
            # Not a cacheable answer (docs/cache.md): X-Cache, Cache-Status and the lookup
            # count all say BYPASS.
            return Outcome(
                response.status,
                items,
                "BYPASS",
                response.status,
                stream=response,
                reason=entry.code,
            )
        sink = self.store.sink()
        chunks = _chunks(response)
        prefix: list[bytes] = []  # what the starter has not seen yet (at most SPILL_AT + a chunk)
        try:
            async for chunk in chunks:
                prefix.append(chunk)
                await sink.write(chunk)
                if not sink.in_memory:
                    break
        except BaseException:
            await sink.discard()
            await response.release()
            raise
        if sink.in_memory:
            body = bytes(sink.buffer)
            final = self._entry(
                flight, response.status, items, len(body), request_time, response_time
            )
            stored = Stored(final if isinstance(final, Entry) else entry, body)
            if isinstance(final, Entry):
                self._keep(flight, stored)
            return Outcome(response.status, items, "MISS", response.status, stored=stored)
        flight.spilling = True
        return self._spill(
            flight, response, chunks, prefix, sink, entry, (request_time, response_time)
        )

    def _spill(
        self,
        flight: Flight,
        response: ProxyResponse,
        chunks: AsyncIterator[bytes],
        prefix: list[bytes],
        sink: BodySink,
        entry: Entry,
        times: tuple[float, float],
    ) -> Outcome:
        """A large body: the starter streams it while the flight writes it to a file."""
        queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(TEE_DEPTH)
        items = tuple(response.headers.items())

        async def feed(item: bytes | BaseException | None) -> None:
            if flight.starter_gone:
                return
            try:
                await asyncio.wait_for(queue.put(item), self.read_timeout)
            except TimeoutError:
                flight.starter_gone = True

        async def pump() -> None:
            size = sink.size
            try:
                for chunk in prefix:
                    await feed(chunk)
                prefix.clear()
                async for chunk in chunks:
                    size += len(chunk)
                    if size <= self.config.max_entry_size:
                        await sink.write(chunk)
                    await feed(chunk)
                await response.release()
                await feed(None)
                await self._commit(flight, sink, entry, size, items, *times)
            except Exception as e:
                await sink.discard()
                await feed(e)
                settle(flight.done, e)
            finally:
                sink.abandon()  # cancelled mid-body: the open spill file goes too
                await response.release()
                settle(flight.done, GoAlone())
                self._unregister(flight)

        async def stream() -> AsyncIterator[bytes]:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        async def release() -> None:
            flight.starter_gone = True
            with contextlib.suppress(asyncio.QueueEmpty):
                while True:
                    queue.get_nowait()

        self._spawn(pump())
        out = ProxyResponse(
            status=response.status,
            headers=CIMultiDict(response.headers),
            body=stream(),
            release=release,
            cache_status="MISS",
            upstream_status=response.status,
        )
        return Outcome(response.status, items, "MISS", response.status, stream=out)

    async def _commit(
        self,
        flight: Flight,
        sink: BodySink,
        entry: Entry,
        size: int,
        items: tuple[tuple[str, str], ...],
        request_time: float,
        response_time: float,
    ) -> None:
        final = self._entry(flight, entry.status, items, size, request_time, response_time)
        if not isinstance(final, Entry) or not self._may_store(flight, final):
            await sink.discard()
            settle(flight.done, GoAlone())
            return
        path = await sink.finish()
        body = None
        if self.shared is not None and flight.gen is not None:
            # Read back before the store moves it: whole and checked (size), for Redis.
            body = await self.store.read_spilled(path, size)
        stored = await self.store.commit_file(flight.key, final, path, sink.crc)
        self.metrics.cache_stores.labels("stored").inc()
        if body is not None:
            flight.share = Stored(final, body, None, sink.crc)
            await self._share(flight)
        if stored is None:
            settle(flight.done, GoAlone())
        else:
            settle(flight.done, Outcome(final.status, final.headers, "MISS", final.status, stored))

    def _entry(
        self,
        flight: Flight,
        status: int,
        items: tuple[tuple[str, str], ...],
        size: int,
        request_time: float,
        response_time: float,
    ) -> Entry | NotStorable:
        request = flight.request
        return to_entry(
            account=request.account,
            path=request.path,
            request_headers=request.headers,
            request_control=request_control(request.headers.getall("Cache-Control", [])),
            status=status,
            headers=items,
            size=size,
            whole=True,
            max_size=self.config.max_entry_size,
            request_time=request_time,
            response_time=response_time,
            rules=self.rules(),
        )

    def _may_store(self, flight: Flight, entry: Entry) -> bool:
        if flight.cancelled or self.store.invalidated_since(
            flight.sequence, entry.account, entry.path
        ):
            self.metrics.cache_stores.labels("invalidated").inc()
            return False
        if not self.store.writable:
            self.metrics.cache_stores.labels("disabled").inc()
        return True

    def _keep(self, flight: Flight, stored: Stored) -> None:
        if self._may_store(flight, stored.entry):
            self.store.put(flight.key, stored)
            self.metrics.cache_stores.labels("stored").inc()
            if self.shared is not None:
                flight.share = stored  # to Redis by _share(), once the answer is out

    # ------------------------------------------------------------------ writes

    async def _write(self, request: ProxyRequest) -> ProxyResponse:
        status: int | None = None
        headers: tuple[tuple[str, str], ...] = ()
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
                self.invalidate(inv)
                if self.shared is not None:
                    # In Redis before the answer goes out, so no replica reads it back.
                    await self.shared.drop(inv.account, inv.covers, self._resend(inv))
                if self.announce is not None:
                    await self.announce(inv)

    def _resend(self, inv: Invalidation) -> Callable[[], Awaitable[None]] | None:
        announce = self.announce
        return None if announce is None else functools.partial(announce, inv)

    def invalidate(self, inv: Invalidation) -> int:
        for key, flight in list(self.flights.items()):
            parts = parse_key(key)
            if parts is not None and inv.covers(parts.account, parts.path):
                flight.cancelled = True
                del self.flights[key]
        removed = self.store.invalidate(inv)
        self.metrics.cache_invalidations.inc(removed)
        return removed

    def _count(self, result: str, reason: str) -> None:
        self.metrics.cache_lookups.labels(result, reason).inc()
        debug("cache_lookup", request_id=trace().request_id, result=result, reason=reason)

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _chunks(response: ProxyResponse) -> AsyncIterator[bytes]:
    if isinstance(response.body, bytes):
        if response.body:
            yield response.body
        return
    async for chunk in response.body:
        if chunk:
            yield chunk


def _placeholder(status: int, items: tuple[tuple[str, str], ...], size: int) -> Entry:
    """An unstored entry wrapping an error answer, so it travels like any other."""
    return Entry(status, items, "", "", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, True, (), size)


@functools.lru_cache(maxsize=4096)
def _key(account: str, path: str, query: str, *selecting: str | None) -> str:
    sent = {n: v for n, v in zip(SELECTING, selecting, strict=True) if v is not None}
    return cache_key(account, path, query, sent)


def _store_label(reason: NotStorable) -> str:
    return reason.code if reason.code in ("too_large", "truncated") else "not_storable"
