"""Cache entries shared by every replica in Redis (``[shared] backend = "redis"``).

The shared tier (:class:`proxy.cache.tiers.RedisEntries`) reads memory tier → Redis → local
disk and, after a fetch, writes the entry to Redis too, when its body arrived whole and is at most
``cache.max_entry_size``. Before a flight asks Kounta for a key it *claims* the key's fetch
lock in Redis; a replica that finds the lock taken waits (up to ``cache.coalesce_wait``) for
the owner's note, published as it lets go (:mod:`proxy.cache.notes`), and answers from the
owner's 304 or the entry it stored, or fetches alone once the owner has finished with nothing
it may answer from. So a cold key fetched through every replica at once costs Kounta one
request, and so does a revalidation.

Records are the format of :mod:`proxy.cache.records` (never the disk's pickles). A record
that fails its checks, is for another key or account, is larger than
``cache.max_entry_size`` (its size is checked before it is read), or whose MAC, size or CRC32
does not match is a miss, is deleted and is counted ``bad_record``.

Redis failing never fails a request: every method here turns
:class:`~proxy.shared.SharedUnavailable` into "not shared" (a miss, nothing stored, a fetch
of this replica's own), counted in ``kounta_proxy_cache_shared_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from proxy.cache.entry import Entry
from proxy.cache.invalidation import normalise_path
from proxy.cache.keys import parse_key
from proxy.cache.memory import Stored
from proxy.cache.metrics import CacheMetrics
from proxy.cache.records import BadRecord, decode, digest, encode, envelope
from proxy.logs import event
from proxy.shared import SharedUnavailable
from proxy.shared.base import Claim, SharedCache, SlotAsk
from proxy.shared.records import BadRecord as BadSharedRecord

# Seconds a shared entry outlives its reuse window, and the least it is kept: its validators
# still save a body when it is revalidated later.
TTL_MARGIN = 60.0
MIN_TTL = 60.0
# How often a replica waiting for another's fetch looks for the entry (one round trip each).
POLL_SECONDS = 0.05
# The suffix of a key's background-refresh claim beside its fetch lock (claim_refresh).
REFRESH = ":refresh"
# A claim that takes the lock over a record larger than this reads only its first PEEK bytes
# (the envelope and the entry's header) and the whole record only when the entry may answer
# the flight: a revalidating flight over its own 500 KB entry does not read 500 KB each time.
PEEK = 8192
# Invalidations kept while Redis is away; past that, one purge of everything replaces them.
MAX_PENDING = 1000
# How often a replica holding invalidations Redis missed tries them again.
RETRY_SECONDS = 0.25

Resend = Callable[[], Awaitable[None]]
# An invalidation Redis has not taken yet: account (None: all), what it covers, and how to
# tell the other replicas again once it is applied.
Pending = tuple[str | None, Callable[[str, str], bool], Resend | None]


def ttl_for(entry: Entry, now: float, stale_if_error: float) -> float:
    """How long Redis keeps an entry: what is left of its freshness, plus the longest it may
    still answer stale (its own stale-if-error or stale-while-revalidate, or the cache-wide
    ``cache.stale_if_error``), plus a margin; at least :data:`MIN_TTL`."""
    left = max(0.0, entry.fresh_for - entry.age(now))
    stale = 0.0 if entry.strict else max(entry.stale_if_error, entry.stale_while_revalidate)
    return max(MIN_TTL, left + max(stale, stale_if_error) + TTL_MARGIN)


class RedisRecords:
    """The cache layer's view of the shared store: never raises for Redis' sake."""

    def __init__(
        self,
        backend: SharedCache,
        metrics: CacheMetrics,
        *,
        max_entry_size: int,
        stale_if_error: float,
        lock_ttl: float,
        accounts: tuple[str, ...],
        announce_all: Resend | None = None,
    ) -> None:
        """``announce_all`` tells every replica to purge everything (None: alone)."""
        self.backend = backend
        self.metrics = metrics
        self.max_entry_size = max_entry_size
        self.stale_if_error = stale_if_error
        self.lock_ttl = lock_ttl
        self.accounts = accounts
        # Invalidations Redis did not take (it was away): replayed before this replica reads
        # or writes Redis again, and by a retry task as soon as Redis answers; then told to
        # the other replicas again (their copies of what Redis held may be old).
        self.pending: list[Pending] = []
        # One replay at a time: lookups that arrive while it waits on Redis wait for it
        # (each would otherwise pop an invalidation another is still replaying).
        self.replaying = asyncio.Lock()
        self.retrying: asyncio.Task[None] | None = None
        self.replaying = asyncio.Lock()
        self.announce_all = announce_all

    def _count(self, op: str, result: str) -> None:
        self.metrics.cache_shared.labels(op, result).inc()

    async def _caught_up(self) -> bool:
        """Whether every invalidation has reached Redis (replaying the ones that had not).
        One replay at a time: a reader, the retry task and a resubscription may all ask at
        once, and each invalidation is dropped, removed and told again exactly once."""
        if not self.pending:
            return True
        async with self.replaying:
            while self.pending:
                head = self.pending[0]
                account, covers, resend = head
                if not await self._drop(account, covers):
                    return False
                if self.pending and self.pending[0] is head:  # else replaced meanwhile
                    self.pending.pop(0)
                if resend is not None:
                    await resend()
        return True

    async def _retry(self) -> None:
        while True:
            if await self._caught_up():
                return
            await asyncio.sleep(RETRY_SECONDS)

    async def catch_up(self) -> None:
        """Replay the invalidations Redis missed, now (the subscription is back)."""
        await self._caught_up()

    async def get(self, account: str, key: str) -> Stored | None:
        name = digest(key)
        if self.pending and not await self._caught_up():
            self._count("get", "error")
            return None
        try:
            found = await self.backend.cache_read(account, name, self.max_entry_size)
            if found is None:
                self._count("get", "miss")
                return None
            return self._checked(account, key, found[1], found[0])
        except SharedUnavailable:
            self._count("get", "error")
            return None
        except (BadSharedRecord, BadRecord) as e:
            return await self._bad(account, key, str(e))

    def joined(self) -> None:
        """A lookup answered by another's read of the same key (no read of its own)."""
        self._count("get", "joined")

    async def _decoded(self, account: str, key: str, name: str, data: bytes) -> Stored | None:
        try:
            return self._checked(account, key, data)
        except BadRecord as e:
            return await self._bad(account, key, str(e))

    def _checked(
        self, account: str, key: str, data: bytes | memoryview, tag: bytes = b""
    ) -> Stored:
        """The entry of a record read for ``key`` of ``account`` (counted a hit; ``tag``: its
        verified MAC tag, :func:`decode`); raises :class:`BadRecord`."""
        stored = decode(key, data, tag)
        if stored.entry.account != account:
            raise BadRecord("a record of another account")
        self._count("get", "hit")
        return stored

    async def _bad(self, account: str, key: str, problem: str) -> Stored | None:
        """A bad record is a miss: counted, logged (what is wrong, never its contents) and
        deleted."""
        self._count("get", "bad_record")
        event("cache_shared_bad_record", logging.WARNING, problem=problem)
        await self._drop_one(account, key)
        return None

    async def _drop_one(self, account: str, key: str) -> None:
        """A damaged record is removed with its whole path (the index names it by path)."""
        path = _path_of(key)
        if path is None:
            return
        try:
            await self.backend.cache_drop(account, lambda p: p == path)
        except SharedUnavailable:
            self._count("delete", "error")

    def shareable(self, stored: Stored) -> bool:
        return stored.body is not None and stored.entry.size <= self.max_entry_size

    async def put(self, key: str, stored: Stored, gen: str, now: float) -> None:
        """Store an entry whose body is in memory and arrived whole (the layer checked)."""
        if not self.shareable(stored):
            return
        entry = stored.entry
        ttl = ttl_for(entry, now, self.stale_if_error)
        if not await self._caught_up():
            self._count("put", "error")
            return
        path, record = normalise_path(entry.path), encode(key, stored)
        try:
            done = await self.backend.cache_put(entry.account, digest(key), path, record, ttl, gen)
        except SharedUnavailable:
            self._count("put", "error")
            return
        self._count("put", "ok" if done else "invalidated")

    async def claim(
        self, account: str, key: str, *, wait: bool = False, slot: SlotAsk | None = None
    ) -> Claim | None:
        """Take the key's fetch lock, or learn it is taken (None: Redis is away); ``wait``:
        if taken, be named among its waiters (its owner's note comes here: :meth:`heard`);
        ``slot``: the budget's slot asked in the same round trip, for the lock's owner only
        (``Claim.taken``)."""
        if not await self._caught_up():
            self._count("lock", "error")
            return None
        try:
            claim = await self.backend.cache_claim(
                account,
                digest(key),
                uuid.uuid4().hex,
                self.lock_ttl,
                self.max_entry_size,
                wait,
                PEEK,
                slot,
            )
        except SharedUnavailable:
            self._count("lock", "error")
            return None
        self._count("lock", "taken" if claim.owner is not None else "waited")
        return claim

    async def claim_refresh(self, account: str, key: str) -> Claim | None:
        """Claim the key's background refresh for the fleet (a lock of its own beside the
        fetch lock, with the same TTL): ``owner`` None when another replica's refresh of the
        key is queued or out; None when Redis is away (the refresh goes on alone)."""
        try:
            return await self.backend.cache_claim(
                account, digest(key) + REFRESH, uuid.uuid4().hex, self.lock_ttl, 0
            )
        except SharedUnavailable:
            return None

    async def release_refresh(self, account: str, key: str, owner: str) -> None:
        with contextlib.suppress(SharedUnavailable):  # it expires by itself
            await self.backend.cache_release(account, digest(key) + REFRESH, owner)

    async def found(self, account: str, key: str, data: bytes | None) -> Stored | None:
        """The entry a claim found under the key once it took the lock (None: none, or bad)."""
        return None if data is None else await self._decoded(account, key, digest(key), data)

    def peeked(self, account: str, key: str, head: bytes) -> Entry | None:
        """The entry in a record's head (:meth:`claim`: its MAC not checked, so only to tell
        whether to read the record whole); None when the head does not hold it whole, or is
        not an entry of this key and account."""
        try:
            entry = envelope(key, head)[0]
        except BadRecord:
            return None
        return entry if entry.account == account else None

    async def wait(self, account: str, key: str, patience: float) -> Stored | None:
        """The entry another replica's fetch stores, or None once its lock is gone without
        one (not storable, failed, owner died and the lock expired), Redis fails, or
        ``patience`` runs out. Each look is one round trip."""
        deadline = time.monotonic() + patience
        while True:
            found, locked = await self.poll(account, key)
            if found is not None or locked is None:
                return found
            if not locked or time.monotonic() >= deadline:
                self._count("lock", "alone")
                return None
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    async def poll(self, account: str, key: str) -> tuple[Stored | None, bool | None]:
        """The entry under the key (None: none, or a bad one) and whether its fetch lock is
        still held (None: Redis failed; counted ``alone``). One round trip."""
        name = digest(key)
        try:
            data, locked = await self.backend.cache_poll(account, name, self.max_entry_size)
        except SharedUnavailable:
            self._count("lock", "alone")
            return None, None
        except BadSharedRecord as e:
            return await self._bad(account, key, str(e)), None
        if data is not None:
            return await self._decoded(account, key, name, data), locked
        return None, locked

    async def heard(self, account: str, key: str, holder: str, seconds: float) -> bytes | None:
        """The note the lock's ``holder`` left on letting go (MAC checked, not yet read),
        heard within ``seconds``; None: none yet, or one that failed its MAC (counted)."""
        try:
            return await self.backend.cache_note(account, digest(key), holder, seconds)
        except BadSharedRecord as e:
            self._count("note", "bad_record")
            event("cache_shared_bad_note", logging.WARNING, problem=str(e))
            return None

    async def release(self, account: str, key: str, owner: str, note: bytes | None = None) -> None:
        """Let go of the fetch lock, leaving ``note`` (:mod:`proxy.cache.notes`) to the
        replicas that waited on it."""
        try:
            await self.backend.cache_release(account, digest(key), owner, note)
        except SharedUnavailable:
            self._count("unlock", "error")  # it expires by itself

    def let_go(self, account: str, key: str, owner: str, note: bytes | None) -> None:
        """:meth:`release`, written within this call and not waited on (no task: its reply
        is only counted when it comes); for a 304's release, which nobody here waits on."""
        try:
            self.backend.cache_let_go(account, digest(key), owner, note)
        except SharedUnavailable:
            self._count("unlock", "error")  # it expires by itself

    async def drop(
        self,
        account: str | None,
        covers: Callable[[str, str], bool],
        resend: Resend | None = None,
    ) -> None:
        """Count an invalidation and delete what it covers in Redis, for one account or every
        one. When Redis is away it is kept, replayed as soon as Redis answers (and before
        this replica uses Redis again), and then ``resend`` tells the other replicas again."""
        if self.pending or not await self._drop(account, covers):
            if len(self.pending) >= MAX_PENDING:  # everything, once
                self.pending = [(None, lambda account, path: True, self.announce_all)]
            else:
                self.pending.append((account, covers, resend))
            if self.retrying is None or self.retrying.done():
                self.retrying = asyncio.get_running_loop().create_task(self._retry())

    async def close(self) -> None:
        if self.retrying is not None:
            self.retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.retrying

    async def _drop(self, account: str | None, covers: Callable[[str, str], bool]) -> bool:
        for name in self.accounts if account is None else (account,):
            try:
                await self.backend.cache_drop(name, functools.partial(covers, name))
            except SharedUnavailable:
                self._count("delete", "error")
                return False
            self._count("delete", "ok")
        return True


def _path_of(key: str) -> str | None:
    parts = parse_key(key)
    return None if parts is None else normalise_path(parts.path)
