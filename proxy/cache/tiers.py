"""Where entries live: one :class:`Entries` protocol, chosen once when the proxy is built.

- :class:`LocalEntries`: this process's memory tier and disk (:mod:`proxy.cache.store`).
- :class:`RedisEntries`: the memory tier, then the entries every replica shares in Redis
  (:mod:`proxy.cache.redis_records`), then the local disk; a fetch lock per key across replicas.

The driver (:mod:`proxy.cache.layer`) asks the tier, never which tier it is: look an entry
up, *obtain* a flight's outcome (the shared tier may find another replica's entry instead of
fetching), *keep* what a fetch got, *commit* a spilled body, *finish* a flight (to Redis, then
let go of the lock) and *apply* a change here (flights cancelled, memory tier and disk).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol, cast

from proxy.cache.disk import BodySink
from proxy.cache.entry import Entry
from proxy.cache.fields import request_control
from proxy.cache.flight import Dropped, Flight, Flights, Outcome
from proxy.cache.freshen import Throttle
from proxy.cache.invalidation import Change, Purge
from proxy.cache.lookup import FreshHit, fresh_age, lookup
from proxy.cache.memory import Kept, Stored
from proxy.cache.metrics import CacheMetrics
from proxy.cache.notes import Note
from proxy.cache.notes import decode as decode_note
from proxy.cache.notes import encode as encode_note
from proxy.cache.records import BadRecord
from proxy.cache.redis_records import RedisRecords
from proxy.cache.store import CacheStore
from proxy.clock import WallClock
from proxy.messages import ProxyRequest
from proxy.shared.base import Claim, SlotAsk, Taken

Fetch = Callable[[], Awaitable[Outcome]]
# Takes a background request's budget token ahead of its send (the budget's ``prepay``).
Prepay = Callable[[ProxyRequest], Awaitable[None]]
# Hands a token taken ahead but not spent to the account's next request (``refund``).
Refund = Callable[[ProxyRequest], None]


class Ahead(Protocol):
    """The budget's slot for a flight's upstream request, asked with the fetch lock's claim
    (one round trip; Redis takes it only for the lock's owner): the budget's ``ahead``."""

    def ask(self, request: ProxyRequest) -> SlotAsk | None:
        """The slot's ask (None: the budget asks by itself when the request is sent)."""
        ...

    def took(self, request: ProxyRequest, slot: SlotAsk, taken: Taken) -> None:
        """What Redis answered: a slot taken is the request's first send's."""
        ...

    def unspent(self, request: ProxyRequest) -> None:
        """The flight is over: a slot it took with its claim and did not send goes back."""
        ...


# An entry as the cache's rules hold it now (a webhook rule's fallback may cut fresh_for).
Hold = Callable[[Entry], Entry]
# Another replica's 304 applied to the flight's stored entry (None: it does not apply).
Adopt = Callable[[Note], Outcome | None]
# What a 304 answered: the validators sent, its headers, request and response times.
Revalidation = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], float, float]
# After a waited-on lock is gone without a note, how long its note may still be on its way.
NOTE_GRACE = 0.01
# How often a flight that will hear the holder's note looks at the lock meanwhile (the note
# wakes it at once; the look finds an owner that died, or a note that was lost).
NOTED_POLL = 0.25
# What a shared read's waiters get when its reader gave up (cancelled: its caller left):
# each then reads on its own.
ABANDONED = object()


class Entries(Protocol):
    @property
    def sequence(self) -> int:
        """The count of changes applied here (a flight begun before one must not store)."""
        ...

    def hot(self, key: str) -> Stored | None:
        """The entry in the memory tier (no I/O: the fresh-hit fast path)."""
        ...

    def kept(self, key: str, stored: Stored) -> Kept:
        """What the fast path made of ``stored``, which :meth:`hot` just gave for ``key``
        (:meth:`~proxy.cache.memory.HotEntries.kept`: dropped with the entry)."""
        ...

    async def lookup(self, account: str, key: str) -> Stored | None: ...

    async def obtain(
        self, flight: Flight, fetch: Fetch, hold: Hold | None = None, adopt: Adopt | None = None
    ) -> Outcome:
        """The flight's outcome: ``fetch()``, or what another replica fetched (its entry as
        ``hold`` holds it, when given: a webhook rule's fallback), or its 304 (``adopt``)."""
        ...

    def revalidated(self, flight: Flight, answer: Revalidation) -> None:
        """The flight's fetch was a 304 (told to the replicas waiting on it)."""
        ...

    def keep(self, flight: Flight, stored: Stored, *, freshened: bool = False) -> None:
        """Store what the flight got (unless a change covered it meanwhile); ``freshened``:
        a 304 refreshed a stored entry (the same body; to disk at most once a second)."""
        ...

    def may_store(self, flight: Flight, entry: Entry) -> bool: ...

    def stale(self, flight: Flight, entry: Entry) -> bool:
        """Whether a change came while the flight was out (what it got may be old)."""
        ...

    async def commit(self, flight: Flight, sink: BodySink, entry: Entry) -> Stored | None:
        """Store a body spilled to a file, now whole (None: it could not be stored)."""
        ...

    def finish(self, flight: Flight) -> Awaitable[None] | None:
        """The flight is over and its answer is out: what follows (None: nothing)."""
        ...

    def forget(self, key: str) -> None: ...

    def sink(self) -> BodySink: ...

    def body(self, stored: Stored) -> AsyncGenerator[bytes, None]: ...

    async def apply(self, change: Change) -> int:
        """Remove what ``change`` covers here (:class:`~proxy.cache.invalidation.LocalTier`)."""
        ...

    async def close(self) -> None: ...


class LocalEntries:
    """The memory tier and the disk of this process."""

    def __init__(self, store: CacheStore, flights: Flights, metrics: CacheMetrics) -> None:
        self.store = store
        self.flights = flights
        self.metrics = metrics
        self.freshen = Throttle()

    @property
    def sequence(self) -> int:
        return self.store.sequence

    def hot(self, key: str) -> Stored | None:
        return self.store.hot.get(key)

    def kept(self, key: str, stored: Stored) -> Kept:
        return self.store.hot.kept(key, stored)

    async def lookup(self, account: str, key: str) -> Stored | None:
        return await self.store.get(key)

    async def obtain(
        self, flight: Flight, fetch: Fetch, hold: Hold | None = None, adopt: Adopt | None = None
    ) -> Outcome:
        return await fetch()

    def revalidated(self, flight: Flight, answer: Revalidation) -> None:
        return None

    def stale(self, flight: Flight, entry: Entry) -> bool:
        """Whether a change came while the flight was out (what it got may be old)."""
        return flight.cancelled or self.store.invalidated_since(
            flight.sequence, entry.account, entry.path
        )

    def may_store(self, flight: Flight, entry: Entry) -> bool:
        if self.stale(flight, entry):
            self.metrics.cache_stores.labels("invalidated").inc()
            return False
        if not self.store.writable:
            self.metrics.cache_stores.labels("disabled").inc()
        return True

    def keep(self, flight: Flight, stored: Stored, *, freshened: bool = False) -> None:
        if self.may_store(flight, stored.entry):
            self._put(flight.key, stored, freshened)
            self.metrics.cache_stores.labels("stored").inc()

    def _put(self, key: str, stored: Stored, freshened: bool) -> bool:
        """Memory and disk; a freshened entry held in memory reaches the disk at most once
        a second (:mod:`proxy.cache.freshen`): the memory tier answers meanwhile. Whether
        it was due (the disk got it, or skipped it while its writes are behind)."""
        if freshened and key in self.store.hot.items:
            if not self.freshen.due(key):
                self.store.promote(key, stored)
                return False
            if self.store.behind:  # the memory tier takes it; the disk's record stays older
                self.store.promote(key, stored)
                return True
        self.store.put(key, stored)
        return True

    async def commit(self, flight: Flight, sink: BodySink, entry: Entry) -> Stored | None:
        path = await sink.finish()
        stored = await self.store.commit_file(flight.key, entry, path, sink.crc)
        self.metrics.cache_stores.labels("stored").inc()
        return stored

    def finish(self, flight: Flight) -> Awaitable[None] | None:
        return None  # nothing follows here: no task per flight (proxy.cache.flight)

    def forget(self, key: str) -> None:
        self.store.delete(key)

    def sink(self) -> BodySink:
        return self.store.sink()

    def body(self, stored: Stored) -> AsyncGenerator[bytes, None]:
        return self.store.body(stored)

    async def apply(self, change: Change) -> int:
        self.flights.cancel(change)
        if isinstance(change, Purge):
            return await self.store.purge(change.prefix, change.account)
        return self.store.invalidate(change)  # the disk's removals counted by the store

    async def close(self) -> None:
        return None


class RedisEntries(LocalEntries):
    """The memory tier, then Redis (shared by every replica), then this process's disk."""

    def __init__(
        self,
        store: CacheStore,
        flights: Flights,
        metrics: CacheMetrics,
        records: RedisRecords,
        clock: WallClock,
        coalesce_wait: float,
        prepay: Prepay | None = None,
        refund: Refund | None = None,
        ahead: Ahead | None = None,
    ) -> None:
        """``prepay``: takes a background refresh's budget token before its fetch lock
        (None: the refresh takes the lock first and its token when it sends); ``refund``:
        passes on such a token the refresh did not spend; ``ahead``: a caller's flight asks
        its budget slot with its claim (None: when it sends)."""
        super().__init__(store, flights, metrics)
        self.records = records
        self.clock = clock
        self.coalesce_wait = coalesce_wait
        self.prepay = prepay
        self.refund = refund
        self.ahead = ahead
        # Background refreshes' claims (owner tokens), let go of by finish().
        self._refreshing: dict[Flight, str] = {}
        # Reads of Redis in flight, by key (:meth:`_read`).
        self._reading: dict[str, _Reading] = {}

    async def lookup(self, account: str, key: str) -> Stored | None:
        """Memory tier, then Redis (a hit there joins the memory tier), then the local disk."""
        hot = self.store.hot.get(key)
        if hot is not None:
            return hot
        sequence = self.store.sequence
        found = await self._read(account, key, sequence)
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

    async def _read(self, account: str, key: str, sequence: int) -> Stored | None:
        """The key's entry in Redis (:meth:`RedisRecords.get`: read, its MAC, key, size and
        CRC32 checked). A lookup of a key already being read, with no invalidation since that
        read was sent (the same ``sequence``), waits for its answer instead of sending its
        own: one read, verified once, answers every lookup that came while it was out (a
        hot key read by many callers at once costs one round trip). A read that fails
        (Redis away, a bad record) answers each of them None, as it answers its own caller;
        one whose caller gave up (cancelled) lets each of its waiters read on its own."""
        reading = self._reading.get(key)
        if reading is not None and reading.sequence == sequence and reading.account == account:
            waiter: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            reading.waiters.append(waiter)
            shared = await waiter  # its own future: a waiter cancelled leaves the others be
            if shared is not ABANDONED:
                self.records.joined()
                return cast("Stored | None", shared)
            return await self._read(account, key, sequence)
        self._reading[key] = reading = _Reading(account, sequence)
        try:
            found = await self.records.get(account, key)
        except BaseException:
            _tell(reading.waiters, ABANDONED)
            raise
        finally:
            if self._reading.get(key) is reading:
                del self._reading[key]
        _tell(reading.waiters, found)
        return found

    async def obtain(
        self, flight: Flight, fetch: Fetch, hold: Hold | None = None, adopt: Adopt | None = None
    ) -> Outcome:
        """Take the key's fetch lock in Redis, or wait for the replica that holds it: answer
        from the entry it stores, or from its 304 (its note, ``adopt``); else (Redis away,
        nothing usable, or it took longer than ``cache.coalesce_wait``) fetch here."""
        account = flight.request.account
        began = self.clock()  # a note's 304 must come after this (proxy.cache.notes)
        if flight.request.prepaid is not None and self.prepay is not None:
            await self._queue(flight)
        request, ahead = flight.request, self.ahead
        slot = None
        if ahead is not None and request.prepaid is None and request.wanted is None:
            slot = ahead.ask(request)
        claim = await self.records.claim(account, flight.key, wait=adopt is not None, slot=slot)
        if claim is None:
            return await fetch()
        flight.claimed(claim.gen, claim.owner)
        if claim.taken is not None and slot is not None and ahead is not None:
            ahead.took(request, slot, claim.taken)
        if claim.owner is None and flight.request.wanted is not None:
            # A background refresh while another replica fetches the key: that one will do.
            raise Dropped(flight.key)
        if claim.owner is None:
            other = await self._other(flight, claim, began, hold, adopt)
            if isinstance(other, Outcome):
                return other
            found = other
        else:  # the lock's last owner may have stored it since this flight's lookup
            found = await self._found(flight, claim, began, hold)
        if found is None or not self._answers(flight, found.entry, began, hold):
            return await fetch()
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

    async def _other(
        self,
        flight: Flight,
        claim: Claim,
        began: float,
        hold: Hold | None,
        adopt: Adopt | None,
    ) -> Outcome | Stored | None:
        """Wait for the fetch another replica holds the lock for: its note (heard at once
        when it lets go), else a look at the entry every ``NOTED_POLL`` seconds while the
        lock is held. An answer from its 304, the entry it stored, or None (fetch here)."""
        account, key = flight.request.account, flight.key
        if not claim.noted or claim.holder is None or adopt is None:
            return await self.records.wait(account, key, self.coalesce_wait)
        deadline = time.monotonic() + self.coalesce_wait
        wait = min(NOTED_POLL, self.coalesce_wait)
        while True:
            data = await self.records.heard(account, key, claim.holder, wait)
            if data is not None:
                return await self._noted(flight, claim.holder, data, began, adopt)
            found, locked = await self.records.poll(account, key)
            if locked is None:
                return None
            if found is not None and self._usable(flight, found.entry, hold):
                return found
            if not locked:  # let go just now: its note may still be on its way
                data = await self.records.heard(account, key, claim.holder, NOTE_GRACE)
                if data is not None:
                    return await self._noted(flight, claim.holder, data, began, adopt)
                self.metrics.cache_shared.labels("lock", "alone").inc()  # lost, or none left
                return found
            if time.monotonic() >= deadline:
                self.metrics.cache_shared.labels("lock", "alone").inc()
                return None
            wait = min(NOTED_POLL, max(0.0, deadline - time.monotonic()))

    async def _noted(
        self, flight: Flight, holder: str, data: bytes, began: float, adopt: Adopt
    ) -> Outcome | Stored | None:
        """The holder's note: its 304 applied here when it may answer this flight (it came
        after the flight began, for the validators of this flight's entry, and no change
        came meanwhile); else what it stored (looked for once), or None."""
        account, key = flight.request.account, flight.key
        try:
            note = decode_note(data, key, holder)
        except BadRecord:
            self.metrics.cache_shared.labels("note", "bad_record").inc()
            note = None
        if note is not None and note.got == "304":
            if note.response_time < began or self._changed(flight):
                self.metrics.cache_shared.labels("note", "ignored").inc()
                return None
            outcome = adopt(note)
            result = "ignored" if outcome is None else "adopted"
            self.metrics.cache_shared.labels("note", result).inc()
            return outcome
        found, _ = await self.records.poll(account, key)
        return found

    async def _found(
        self, flight: Flight, claim: Claim, began: float, hold: Hold | None
    ) -> Stored | None:
        """The entry under the key once the flight took its lock: as the claim read it, or,
        when it read only a large record's head, the record read whole (one more round trip)
        only if the head's entry may answer the flight (else None: the flight fetches)."""
        account, key = flight.request.account, flight.key
        if not claim.head or claim.data is None:
            return await self.records.found(account, key, claim.data)
        entry = self.records.peeked(account, key, claim.data)
        if entry is not None and not self._answers(flight, entry, began, hold):
            self.metrics.cache_shared.labels("lock", "peeked").inc()
            return None
        return await self.records.get(account, key)  # whole, every check made

    def _answers(self, flight: Flight, entry: Entry, began: float, hold: Hold | None) -> bool:
        """Whether another replica's entry answers the flight: a fresh hit by this replica's
        rules, or fetched since the flight began."""
        return self._usable(flight, entry, hold) or self._since(flight, entry, began)

    def _changed(self, flight: Flight) -> bool:
        request = flight.request
        return flight.cancelled or self.store.invalidated_since(
            flight.sequence, request.account, request.path
        )

    def _since(self, flight: Flight, entry: Entry, began: float) -> bool:
        """Whether another replica's entry was fetched after this flight began (it may
        answer the flight's requests, fresh or not, as a flight of this replica's would)."""
        return entry.response_time >= began and not self.stale(flight, entry)

    async def _queue(self, flight: Flight) -> None:
        """A background refresh: one per key for the fleet (its own claim in Redis, apart
        from the fetch lock: another replica's refresh of the key, queued or out, drops
        this one), then its batch token, and only then (back in :meth:`obtain`) the fetch
        lock. While it waits for its token, another replica's caller who must fetch the key
        takes the lock at once instead of waiting behind a batch request."""
        assert self.prepay is not None
        claim = await self.records.claim_refresh(flight.request.account, flight.key)
        if claim is not None and claim.owner is None:
            raise Dropped(flight.key)
        if claim is not None and claim.owner is not None:
            self._refreshing[flight] = claim.owner
        await self.prepay(flight.request)

    def _usable(self, flight: Flight, found: Entry, hold: Hold | None = None) -> bool:
        """Whether another replica's entry answers this flight's request as a fresh hit, by
        the same rule as a local one (:func:`~proxy.cache.lookup.lookup`): never for a request
        that asks for validation (``no-cache``, ``max-age=0``, RFC 9111 5.2.1), and as
        ``hold`` holds it (a webhook rule's fallback while the feed is distrusted)."""
        entry = found if hold is None else hold(found)
        if self.stale(flight, entry):
            return False
        headers = flight.request.headers
        control = request_control(headers.getall("Cache-Control", []), headers.getall("Pragma", []))
        return isinstance(lookup(entry, headers, control, self.clock()), FreshHit)

    def revalidated(self, flight: Flight, answer: Revalidation) -> None:
        """A 304 needs nothing stored in Redis for the waiters to answer from it: the lock
        is let go at once, with the note, while this replica still answers its callers (the
        freshened entry reaches Redis by :meth:`finish`, as :meth:`keep` decides).

        At once means within this call: the release (its script) is written to Redis here
        (:meth:`RedisRecords.let_go`), not in a step of its own queued behind the rest of
        this one (the 304 merged, the entry freshened, the flight settled) and behind
        whatever the loop's next turn reads first: the other replicas' flights waiting on
        this lock, and every connection parked on them, hear the note that much sooner. And
        in one step: no task, coroutine chain or later task step for a reply nobody here
        waits on (a callback counts it)."""
        if flight.owner is None or self._changed(flight):
            return
        owner = flight.let_go()
        assert owner is not None
        note = encode_note(Note(owner, flight.key, "304", *answer))
        if note is None:  # too large to send: the waiters look for the entry
            note = encode_note(Note(owner, flight.key, "done"))
        self.records.let_go(flight.request.account, flight.key, owner, note)

    def keep(self, flight: Flight, stored: Stored, *, freshened: bool = False) -> None:
        """As the local tier keeps it, and to Redis by :meth:`finish` once the answer is out:
        a freshened entry (the same body) as the disk gets it, at most once a second, unless
        it is fresh now (another replica may answer from it at once)."""
        if self.may_store(flight, stored.entry):
            wrote = self._put(flight.key, stored, freshened)
            self.metrics.cache_stores.labels("stored").inc()
            if wrote or fresh_age(stored.entry, self.clock()) is not None:
                flight.to_share(stored)

    async def commit(self, flight: Flight, sink: BodySink, entry: Entry) -> Stored | None:
        path = await sink.finish()
        body = None
        if flight.gen is not None:
            # Read back before the store moves it: whole and checked (size), for Redis.
            body = await self.store.read_spilled(path, sink.size)
        stored = await self.store.commit_file(flight.key, entry, path, sink.crc)
        self.metrics.cache_stores.labels("stored").inc()
        if body is not None:
            flight.to_share(Stored(entry, body, None, sink.crc))
        return stored

    def finish(self, flight: Flight) -> Awaitable[None] | None:
        """:meth:`_finish`, in a task only when something of it goes to Redis: a flight with
        nothing to store, no lock left to let go (a 304's went in :meth:`revalidated`; a
        waiter holds none) and no refresh claim has its refund and slot handed back here,
        in the flight's own step (no task and no later step per revalidation)."""
        if flight.share is None and flight.owner is None and flight not in self._refreshing:
            self._handed_back(flight)
            return None
        return self._finish(flight)

    def _handed_back(self, flight: Flight) -> None:
        if self.refund is not None and flight.request.prepaid is not None:
            self.refund(flight.request)  # its token, if it found the key fetched meanwhile
        if self.ahead is not None:
            self.ahead.unspent(flight.request)  # the slot its claim took, if never sent

    async def _finish(self, flight: Flight) -> None:
        """Store the flight's entry in Redis (unless a change came meanwhile), and only then
        let go of the fetch lock: what it stored is there before waiters see it free (a 304
        let go already, its note is what the waiters answer from: :meth:`revalidated`)."""
        stored = flight.take_share()
        if stored is not None and flight.gen is not None and not self.stale(flight, stored.entry):
            await self.records.put(flight.key, stored, flight.gen, self.clock())
        owner = flight.let_go()
        if owner is not None:  # a 304 let go already (revalidated)
            note = encode_note(Note(owner, flight.key, "done"))
            await self.records.release(flight.request.account, flight.key, owner, note)
        refreshing = self._refreshing.pop(flight, None)
        if refreshing is not None:  # after the entry and the lock: a later refresh finds both
            await self.records.release_refresh(flight.request.account, flight.key, refreshing)
        self._handed_back(flight)

    async def close(self) -> None:
        await self.records.close()


class _Reading:
    """A read of one key in Redis in flight (:meth:`RedisEntries._read`): the account and the
    invalidation sequence it was sent under, and the lookups waiting for its answer."""

    __slots__ = ("account", "sequence", "waiters")

    def __init__(self, account: str, sequence: int) -> None:
        self.account, self.sequence = account, sequence
        self.waiters: list[asyncio.Future[object]] = []


def _tell(waiters: list[asyncio.Future[object]], answer: object) -> None:
    for waiter in waiters:
        if not waiter.done():  # else its lookup was cancelled meanwhile
            waiter.set_result(answer)
