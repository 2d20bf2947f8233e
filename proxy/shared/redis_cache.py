"""The cache's records in Redis (:mod:`proxy.cache.redis_records`), a part of
:class:`~proxy.shared.redis_backend.RedisBackend`: entries, fetch locks, the notes a lock's
owner leaves its waiters (:mod:`proxy.shared.notes`) and invalidations.

Keys (``P`` is ``shared.key_prefix``)::

    P:cache:ACCOUNT:e:D         a cache entry (record + body, sealed with its MAC), with a TTL
    P:cache:ACCOUNT:lock:D      the fetch lock of one key (owner token, PX = upstream timeout)
    P:cache:ACCOUNT:lock:D:waiting  the replicas waiting on it (a set, the lock's TTL), to
                                whom its release publishes the owner's note
    P:cache:notes:REPLICA       a channel: notes for one replica (HOLDER|note sealed over
                                P:cache:ACCOUNT:note:D)
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import redis.asyncio as aioredis

from proxy.shared.base import Claim, SharedUnavailable, SlotAsk, Taken
from proxy.shared.metrics import SharedMetrics
from proxy.shared.notes import Notes
from proxy.shared.piped import Script
from proxy.shared.reads import LARGER, Reads
from proxy.shared.records import BadRecord, RecordKeys
from proxy.shared.redis_budget import owned, taken_of
from proxy.shared.wire import Wire

T = TypeVar("T")
# The suffix of a fetch lock's waiters set.
WAITING = ":waiting"


class CacheRecords:
    """Mixed into the Redis backend (its connections, scripts, keys and error handling)."""

    # Bytes a cache record may hold on top of the body: envelope, entry header.
    OVERHEAD = 1024 * 1024
    prefix: str
    client: aioredis.Redis
    reads: Reads
    wire: Wire
    records: RecordKeys
    metrics: SharedMetrics
    notes: Notes
    _replica: str
    _cache_put: Any
    _sent: int
    _cache_claim: Script  # on the pipelined connection (proxy.shared.piped)
    _take_owned: Script
    _cache_release: Script
    _cache_drop: Any
    _cache_get: Any

    if TYPE_CHECKING:

        async def _run(
            self, op: str, call: Callable[[], Awaitable[T]], limit: float | None = 0.0
        ) -> T: ...

        def _run_off(self, op: str, call: Callable[[], Awaitable[Any]]) -> None: ...

        def _bad(self, kind: str, problem: str) -> NoReturn: ...

        def key(self, kind: str, account: str, suffix: str = "") -> str: ...

    def _cache_key(self, account: str, kind: str, name: str = "") -> str:
        return _key(self.prefix, account, kind, name)

    async def cache_get(self, account: str, digest: str, limit: int) -> bytes | memoryview | None:
        """The entry's payload, size checked before it is read (the envelope and header on
        top of the body), MAC verified: one round trip on the pipelined connection
        (:mod:`proxy.shared.reads`), one more (the script) for a large one; or BadRecord."""
        found = await self.cache_read(account, digest, limit)
        return None if found is None else found[1]

    async def cache_read(
        self, account: str, digest: str, limit: int
    ) -> tuple[bytes, bytes | memoryview] | None:
        """:meth:`cache_get`, with the record's verified MAC tag (empty: format 1, no MAC)."""
        key, name = _entry_key(self.prefix, account, digest)
        read = functools.partial(self.reads.get, name, limit + self.OVERHEAD)
        found = await self._run("cache_get", read, None)
        if isinstance(found, int) and found == LARGER:  # (a view compared with an int: slower)
            call = functools.partial(self._cache_get, keys=[key], args=[limit + self.OVERHEAD])
            found, _ = await self._run("cache_get", call)
        return None if found is None else self._verified(name, found)

    def _verified(
        self, key: bytes, found: bytes | memoryview | int
    ) -> tuple[bytes, bytes | memoryview]:
        if isinstance(found, int):
            self._bad("cache", "a record too large or of another type")
        try:
            if isinstance(found, memoryview):
                return self.records.opened(key, found)
            return self.records.opened(key, found)
        except BadRecord as e:
            self._bad("cache", str(e))

    def _opened_entry(self, key: bytes, found: bytes | memoryview | int) -> bytes | memoryview:
        return self._verified(key, found)[1]

    async def cache_put(
        self, account: str, digest: str, path: str, data: bytes, ttl: float, gen: str
    ) -> bool:
        # Lua's redis.sha1hex names the same key when a path expires or is invalidated.
        path_digest = hashlib.sha1(path.encode(), usedforsecurity=False).hexdigest()
        keys = [
            self._cache_key(account, "e", digest),
            self._cache_key(account, "p", path_digest),
            self._cache_key(account, "paths"),
            self._cache_key(account, "gen"),
        ]
        ttl_ms = max(1, int(ttl * 1000))
        record = self.records.seal(keys[0].encode(), data)
        args: list[Any] = [gen, record, ttl_ms, digest, path, self._cache_key(account, "p") + ":"]
        stored = await self._run("cache_put", lambda: self._cache_put(keys=keys, args=args))
        return int(stored) == 1

    async def cache_claim(
        self,
        account: str,
        digest: str,
        owner: str,
        ttl: float,
        limit: int,
        wait: bool = False,
        peek: int = 0,
        slot: SlotAsk | None = None,
    ) -> Claim:
        """The fetch lock's claim (``CACHE_CLAIM``) and, with ``slot``, the budget's slot for
        its owner (``TAKE_OWNED``) written right behind it: one round trip, and Redis runs
        the take after the claim, so it takes a slot only if the claim took the lock."""
        keys = [
            self._cache_key(account, "lock", digest),
            self._cache_key(account, "gen"),
            self._cache_key(account, "e", digest),
        ]
        waiter = self._replica if wait and self.notes.subscribed else ""
        if waiter:
            keys.append(self._cache_key(account, "lock", digest + WAITING))
        args: list[Any] = [owner, max(1, int(ttl * 1000)), limit + self.OVERHEAD, waiter]
        if peek > 0:
            args.append(peek)
        cap = limit + self.OVERHEAD  # the most of an entry the claim answers
        took: asyncio.Future[Any] | None = None
        # The slot's ask, packed (its parts an account's asks share packed once).
        asked = None if slot is None else owned(self, slot, keys[0], owner)

        def claim() -> Awaitable[Any]:
            nonlocal took
            claimed = self._cache_claim(keys, args, cap)
            if asked is not None and self.wire.connected:  # else the budget asks by itself
                sent = self._take_owned.packed(asked[0], asked[1])
                took = sent if isinstance(sent, asyncio.Future) else None
            # At once, as the release is: the flight's callers (and this replica's every
            # connection, at times) wait on this round trip, while the rest of the turn is
            # this replica's own work (the joiners that came with the starter parked).
            self.wire.flush()
            return claimed

        try:
            found = await self._run("cache_lock", claim, None)
        except asyncio.CancelledError:
            self._forget_claim(keys[0], owner)  # a slot it took lapses, as a lost reply's
            _drop(took)
            raise
        except BaseException:
            _drop(took)
            raise
        taken, gen, data = int(found[0]), found[1], found[2] if len(found) > 2 else None
        if taken != 1:
            _drop(took)  # not the owner: Redis took nothing (TAKE_OWNED's -1)
            holder = _text(data) if isinstance(data, bytes | str) else None
            return Claim(None, _text(gen), holder=holder, noted=bool(waiter))
        slotted = None if took is None or asked is None else await self._slot(took, asked[2])
        if len(found) > 3 and isinstance(data, bytes):  # a head: checked once read whole
            return Claim(owner, _text(gen), self.records.unchecked(data), head=True, taken=slotted)
        return Claim(owner, _text(gen), self._claimed(keys[2], data), taken=slotted)

    async def _slot(self, took: asyncio.Future[Any], member: str) -> Taken | None:
        """The slot asked with a claim that took the lock (its reply came with the claim's);
        None when the ask failed (the budget then asks by itself)."""
        try:
            return taken_of(await self._run("budget", lambda: took, None), member)
        except SharedUnavailable:
            took.add_done_callback(_quiet)  # not awaited when the backend was already down
            return None

    def _forget_claim(self, key: str, owner: str) -> None:
        """A claim its caller gave up may still run (its place on the pipelined connection
        is kept): its lock, if it took it, is let go just after it, in order on the same
        connection, rather than held by no one until its TTL. Best effort: unanswered."""
        if self.wire.connected:
            let_go = asyncio.ensure_future(self._cache_release([key], [owner]))
            let_go.add_done_callback(_quiet)

    def _claimed(self, key: str, data: Any) -> bytes | None:
        """The entry a claim found, verified; a bad one (too large, another type, a MAC that
        does not verify) is counted and treated as none (the fetch then stores over it)."""
        if data is None:
            return None
        if not isinstance(data, bytes):
            self.metrics.shared_bad_records.labels("cache").inc()
            return None
        try:
            return self.records.open(key.encode(), data)
        except BadRecord:
            self.metrics.shared_bad_records.labels("cache").inc()
            return None

    async def cache_poll(self, account: str, digest: str, limit: int) -> tuple[bytes | None, bool]:
        # One script reads entry and lock together (read apart, the owner could store and
        # release in between, and the waiter would see neither and fetch again); the
        # entry's size is checked before it is read (the envelope and header on top).
        key = self._cache_key(account, "e", digest)
        keys, args = [key, self._cache_key(account, "lock", digest)], [limit + self.OVERHEAD]
        found, locked = await self._run("cache_poll", lambda: self._cache_get(keys=keys, args=args))
        return None if found is None else bytes(self._opened_entry(key.encode(), found)), bool(
            locked
        )

    async def cache_release(
        self, account: str, digest: str, owner: str, note: bytes | None = None
    ) -> None:
        """Let go of the lock (only its owner can) and publish ``note`` (sealed here) to the
        replicas that waited on it: one script, one round trip."""
        keys, args = self._release_of(account, digest, owner, note)

        def release() -> Awaitable[Any]:
            sent = self._cache_release(keys, args)
            # At once: the waiting replicas hear it before this one answers its own callers
            # (the flight's wake-up answers its joiners in the callbacks queued after this).
            self.wire.flush()
            return sent

        await self._run("cache_unlock", release, None)

    def cache_let_go(self, account: str, digest: str, owner: str, note: bytes | None) -> None:
        """:meth:`cache_release` written and flushed within this call, as one step: no task,
        no coroutine chain and no step of a task when its reply comes (a 304's release, which
        nobody waits on: ``RedisEntries.revalidated``); the reply counted as ``_run`` counts
        it, by a callback on its future."""
        keys, args = self._release_of(account, digest, owner, note)
        self._run_off("cache_unlock", lambda: self._cache_release(keys, args))
        self.wire.flush()

    def _release_of(
        self, account: str, digest: str, owner: str, note: bytes | None
    ) -> tuple[list[str], list[Any]]:
        """The release script's keys and arguments: the lock, the owner; with ``note``, the
        waiters' set, the note sealed for this key, and the notes channels' prefix."""
        keys = [self._cache_key(account, "lock", digest)]
        args: list[Any] = [owner]
        if note is not None:
            keys.append(self._cache_key(account, "lock", digest + WAITING))
            sealed = self.records.seal(self._cache_key(account, "note", digest).encode(), note)
            args += [owner.encode() + b"|" + sealed, self.key("cache", "notes") + ":"]
        return keys, args

    async def cache_note(
        self, account: str, digest: str, holder: str, seconds: float
    ) -> bytes | None:
        """The note the lock's ``holder`` published on letting go, heard within ``seconds``
        (None: none yet), MAC verified for this key; raises BadRecord."""
        sealed = await self.notes.wait(holder, seconds)
        if sealed is None:
            return None
        try:
            return self.records.open(self._cache_key(account, "note", digest).encode(), sealed)
        except BadRecord as e:
            self.metrics.shared_bad_records.labels("message").inc()
            raise BadRecord(f"a note: {e}") from None

    async def cache_drop(self, account: str, covers: Callable[[str], bool]) -> int:
        """Two trips: count the invalidation and read the paths atomically (MULTI), so any
        store racing with it is refused or listed; then delete what ``covers`` names."""
        paths_key = self._cache_key(account, "paths")
        gen = self._cache_key(account, "gen")

        async def count() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.incr(gen)
            pipe.zrange(paths_key, 0, -1)
            return await pipe.execute()

        _, paths = await self._run("cache_invalidate", count)
        chosen = [p for p in map(_text, paths) if covers(p)]
        if not chosen:
            return 0
        args: list[Any] = [self._cache_key(account, "e") + ":", self._cache_key(account, "p") + ":"]
        args += chosen
        removed = await self._run(
            "cache_delete", lambda: self._cache_drop(keys=[paths_key], args=args)
        )
        return int(removed)


@functools.lru_cache(maxsize=4096)
def _entry_key(prefix: str, account: str, digest: str) -> tuple[str, bytes]:
    """An entry's Redis key (as ``_cache_key`` makes it), and in bytes: made once per key
    read (as many as the read path's other per-key memos)."""
    key = _key(prefix, account, "e", digest)
    return key, key.encode()


def _key(prefix: str, account: str, kind: str, name: str = "") -> str:
    """A cache key of ``account`` in Redis: its ``kind`` (entry, path, lock, ...) and name."""
    return f"{prefix}:cache:{account}:{kind}{':' + name if name else ''}"


def _drop(took: asyncio.Future[Any] | None) -> None:
    """A call's reply nobody will read (still answered in order on the connection)."""
    if took is not None:
        took.add_done_callback(_quiet)


def _quiet(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()  # retrieved: nobody waits for it


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
