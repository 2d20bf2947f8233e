"""One exchange with the upstream for a flight: the request made conditional on what is
stored, the answer judged by :func:`proxy.cache.validation.answered`, and its body taken: kept
in memory and stored, or (large) teed to a file while it streams to the starter, or passed
through when it cannot be stored."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import assert_never

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.entry import Entry
from proxy.cache.fields import HeaderItems, request_control
from proxy.cache.flight import Flight, Flights, Outcome, Tee
from proxy.cache.memory import Stored
from proxy.cache.metrics import CacheMetrics
from proxy.cache.notes import Note
from proxy.cache.storable import NotStorable, to_entry
from proxy.cache.tiers import Entries
from proxy.cache.validation import (
    CALLER_CONDITIONALS,
    Freshened,
    Refetch,
    TakeBody,
    UpstreamFailed,
    answered,
    validators,
)
from proxy.clock import WallClock
from proxy.messages import ERROR_BODY_LIMIT, Layer, ProxyResponse
from proxy.settings import CacheRule, Settings


class Exchange:
    def __init__(
        self,
        inner: Layer,
        entries: Entries,
        flights: Flights,
        metrics: CacheMetrics,
        clock: WallClock,
        rules: Callable[[], tuple[CacheRule, ...]],
        settings: Settings,
    ) -> None:
        self.inner = inner
        self.entries = entries
        self.flights = flights
        self.metrics = metrics
        self.clock = clock
        self.rules = rules
        self.max_entry_size = settings.cache.max_entry_size
        self.read_timeout = settings.upstream.read_timeout

    async def run(self, flight: Flight, stale: Stored | None) -> Outcome:
        request = flight.request
        headers = CIMultiDict(request.headers)
        for name in CALLER_CONDITIONALS:
            headers.popall(name, None)
        entry = stale.entry if stale is not None else None
        asked = validators(entry) if entry is not None else None
        if asked is not None:
            headers.update(asked)
        sent = request.sent_as("GET", CIMultiDictProxy(headers), request.authorize)
        request_time = self.clock()
        response = await self.inner.send(sent)
        response_time = self.clock()
        response.add_upstream_time(flight.upstream_seconds)  # a refetch after a 304
        flight.took(response.upstream_seconds)
        items = tuple(response.headers.items())
        decision = answered(
            entry, response.status, items, request_time, response_time, self.rules()
        )
        if isinstance(decision, Freshened):
            await response.release()
            if asked is not None:  # for the replicas waiting on this fetch (Redis)
                told = tuple(asked.items())
                self.entries.revalidated(flight, (told, items, request_time, response_time))
            return self._freshened(flight, stale, decision, "not_modified")
        if isinstance(decision, Refetch):
            await response.release()
            return await self.run(flight, None)
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
            self.entries.forget(flight.key)
        outcome = await self._take_body(flight, response, (request_time, response_time))
        if outcome.cache_status == "MISS":
            outcome.reason = "changed" if entry is not None else "cold"
        return outcome

    def _freshened(
        self, flight: Flight, stale: Stored | None, decision: Freshened, reason: str
    ) -> Outcome:
        # Counted by the layer's _fetch, once per answer (a background refresh answers
        # nobody).
        # The body (and its CRC32) as stored; only the headers are freshened.
        fresh = (
            Stored(decision.entry, stale.body, stale.body_key, stale.crc)  # replace(), faster
            if stale is not None
            else Stored(decision.entry, None)
        )
        self.entries.keep(flight, fresh, freshened=stale is not None)
        return Outcome(
            decision.entry.status,
            decision.entry.headers,
            "REVALIDATED",
            304,
            stored=fresh,
            entry=decision.entry,
            reason=reason,
        )

    def adopt(self, flight: Flight, stale: Stored | None, note: Note) -> Outcome | None:
        """Another replica's 304 (its note, :mod:`proxy.cache.notes`) applied to this
        flight's stored entry as if it were its own: only when it answered the validators
        this entry would send (None: it does not apply; the flight fetches)."""
        if stale is None or tuple(validators(stale.entry).items()) != note.sent:
            return None
        decision = answered(
            stale.entry, 304, note.headers, note.request_time, note.response_time, self.rules()
        )
        if not isinstance(decision, Freshened):
            return None
        return self._freshened(flight, stale, decision, "other_replica")

    async def _take_body(
        self, flight: Flight, response: ProxyResponse, times: tuple[float, float]
    ) -> Outcome:
        items = tuple(response.headers.items())
        length = response.headers.get("Content-Length", "")
        declared = int(length) if length.isdigit() else 0
        entry = self._entry(flight, response.status, items, declared, times)
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
        sink = self.entries.sink()
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
            final = self._entry(flight, response.status, items, len(body), times)
            stored = Stored(final if isinstance(final, Entry) else entry, body)
            if isinstance(final, Entry):
                self.entries.keep(flight, stored)
            return Outcome(response.status, items, "MISS", response.status, stored=stored)
        tee = Tee(
            self.flights,
            flight,
            response,
            sink,
            read_timeout=self.read_timeout,
            max_size=self.max_entry_size,
        )

        async def commit(size: int) -> Outcome | None:
            final = self._entry(flight, entry.status, items, size, times)
            if not isinstance(final, Entry) or not self.entries.may_store(flight, final):
                await sink.discard()
                return None
            stored = await self.entries.commit(flight, sink, final)
            if stored is None:
                return None
            return Outcome(final.status, final.headers, "MISS", final.status, stored)

        stream = tee.start(prefix, chunks, commit, self.entries.finish)
        return Outcome(response.status, items, "MISS", response.status, stream=stream)

    def _entry(
        self, flight: Flight, status: int, items: HeaderItems, size: int, times: tuple[float, float]
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
            max_size=self.max_entry_size,
            request_time=times[0],
            response_time=times[1],
            rules=self.rules(),
        )


async def _chunks(response: ProxyResponse) -> AsyncIterator[bytes]:
    if isinstance(response.body, bytes):
        if response.body:
            yield response.body
        return
    async for chunk in response.body:
        if chunk:
            yield chunk


def _placeholder(status: int, items: HeaderItems, size: int) -> Entry:
    """An unstored entry wrapping an error answer, so it travels like any other."""
    return Entry(status, items, "", "", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, True, (), size)


def _store_label(reason: NotStorable) -> str:
    return reason.code if reason.code in ("too_large", "truncated") else "not_storable"
