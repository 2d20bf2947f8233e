"""The cache's storage: diskcache on disk, a small LRU of hot entries in memory.

Every disk operation runs on one worker thread, in submission order, so a delete queued
after a write always wins and the event loop never waits on SQLite or the file system. The
memory LRU is updated on the loop at once (a fresh hit costs no thread hop).

Large bodies are never held whole: :class:`~proxy.cache.disk.BodySink` spills chunks to a
temporary file as they arrive and hands the file to diskcache only once the body is complete.

A body stored apart from its record is checked when read: its size always, its CRC32
(kept in the record) too; one that does not match (a file truncated, deleted or changed
on disk) is dropped and the lookup is a miss, counted, so the answer comes from upstream
instead of a wrong 200 or one that breaks off. Repeated write failures (a corrupt
``cache.db``) turn storing off like a full disk does (readiness says so) until a probe
succeeds. What happens is counted in the metrics the store is given (none for the CLI).

Nothing walks the disk at start-up: what an invalidation or purge covers is found on the disk
when it comes (:func:`~proxy.cache.disk.covered`, indexed queries on the keys), so opening
costs the same over 100 entries as over a million, and memory does not grow with the entries
on disk. With several accounts, each one's share of the disk is counted after start-up, in
pages between other work, from the size each record is tagged with (never reading one).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import time
import uuid
import zlib
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import diskcache  # type: ignore[import-untyped]

from proxy.cache.disk import (
    DISK_ERRORS,
    EPOCH_KEY,
    SPILL_AT,
    BodySink,
    Counting,
    close_opened,
    covered,
    disk_gauges,
    disk_stats,
    file_size,
    is_full,
    open_disk,
    probe_write,
)
from proxy.cache.entry import Entry
from proxy.cache.invalidation import Change, Invalidation, Purge
from proxy.cache.keys import parse_key
from proxy.cache.memory import ENTRY_OVERHEAD, HotEntries, Stored, intact, matches, upgraded
from proxy.cache.metrics import CacheMetrics
from proxy.cache.shares import Ledger
from proxy.compat.diskcache import Cursor
from proxy.errors import StoredBodyError
from proxy.logs import event
from proxy.messages import CHUNK

T = TypeVar("T")
# Bodies up to this size live inside the entry's record; larger ones are a separate value
# (a file in diskcache's directory) so that freshening the headers never rewrites them.
INLINE_BODY = 32 * 1024
# Queued disk writes past which a 304's refresh of an entry held in memory skips the disk
# (proxy.cache.freshen): with every request a revalidation of another key and an upstream
# without a budget, 304s came faster than the disk took them and the queue grew without
# bound (~1,000 a second; ~20 objects each for the collector to walk).
WRITES_BEHIND = 256
# After a full disk, storing is tried again after this many seconds.
FULL_DISK_RETRY = 60.0
# Records counted per page when the shares are counted after start-up.
COUNT_PAGE = 2000
# Write failures in a row (other than a full disk) after which storing is turned off.
FAILURES_TO_DISABLE = 3


class BodyMismatch(Exception):
    """A stored body is not the one its record describes (size or CRC32)."""


class CacheStore:
    """Entries by key: the memory tier, then the disk."""

    def __init__(
        self,
        directory: Path,
        max_size: int,
        memory_size: int,
        metrics: CacheMetrics | None = None,
        shares: Mapping[str, float] | None = None,
    ) -> None:
        self.directory = directory
        self.max_size = max_size
        # shares: each account's weight in both tiers ([accounts.NAME] cache_share).
        self.hot = HotEntries(memory_size, Ledger(memory_size, shares))
        self.ledger = Ledger(max_size, shares)  # the disk's; used on the worker thread only
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-store")
        self.disk: diskcache.Cache = open_disk(directory, max_size)
        # The records on disk counted in their accounts' shares after start-up (set at once
        # when there are no shares to count).
        self.counting = Counting(self.ledger.active)
        self.problem: str | None = None
        self._retry_at = 0.0
        self._failures = 0  # write failures in a row
        self._pending: set[asyncio.Future[Any]] = set()
        # Invalidations by sequence number, so a fetch that began before one does not store.
        self.sequence = 0
        self.recent: deque[tuple[int, Change]] = deque(maxlen=1024)
        self.epoch: int = 0
        # Bumped by every write, delete and invalidation made on the loop.
        self.changes = 0
        self.metrics = metrics

    # ------------------------------------------------------------------ life

    @classmethod
    async def open(
        cls,
        directory: Path,
        max_size: int,
        memory_size: int,
        metrics: CacheMetrics | None = None,
        shares: Mapping[str, float] | None = None,
    ) -> CacheStore:
        loop = asyncio.get_running_loop()
        make = functools.partial(cls, directory, max_size, memory_size, metrics, shares=shares)
        store = await loop.run_in_executor(None, make)
        store.epoch = int(await store._run(store.disk.get, EPOCH_KEY, 0))
        store.counting.start(store._count_shares)
        return store

    # What happens, counted (on the loop or the disk thread: the counters are thread-safe).

    def _failed(self, op: str) -> None:
        if self.metrics is not None:
            self.metrics.cache_store_errors.labels(op).inc()

    def _evicted(self, count: int) -> None:
        if self.metrics is not None:
            self.metrics.cache_evictions.inc(count)

    def _mismatched(self) -> None:
        if self.metrics is not None:
            self.metrics.cache_body_mismatches.inc()

    def _stopped_storing(self, full: bool) -> None:
        if self.metrics is not None:
            if full:
                self.metrics.cache_store_errors.labels("full").inc()
            self.metrics.cache_storing_disabled.set(1)

    async def _count_shares(self) -> None:
        """Count what the disk held at start-up in its accounts' shares, a page at a time
        (other disk work goes on between pages); writes meanwhile are counted as they come."""
        cursor: Cursor = None
        while True:
            cursor = await self._run(self._count_page, cursor)
            if cursor is None:
                return

    def _count_page(self, cursor: Cursor) -> Cursor:
        rows, cursor = self.counting.page(self.disk, cursor, COUNT_PAGE)
        counted = []
        for key, account, size in rows:
            if size is None:  # written before records were tagged with their size
                with contextlib.suppress(Exception):  # a corrupt record: a miss later
                    value = self.disk.get(key)
                    if isinstance(value, Stored):
                        counted.append((key, account, _share(key, value)))
            else:
                counted.append((key, account, size))
        evicted = self._delete(self.ledger.older(counted))
        if evicted:
            self._evicted(evicted)
        return cursor

    async def close(self) -> None:
        await self.counting.stop()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._run(self.disk.close)
        self.executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue a write; it runs after every earlier one, and close() waits for it."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait until every queued write is on disk (tests, shutdown, CLI)."""
        await self._run(lambda: None)

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> Stored | None:
        hot = self.hot.get(key)
        if hot is not None:
            return hot
        changes = self.changes
        try:
            stored = await self._run(self._read, key)
        except BodyMismatch as e:  # dropped already: a miss, fetched again
            self._mismatched()
            event("cache_body_mismatch", logging.WARNING, problem=str(e))
            return None
        except Exception as e:  # a broken record is a miss, never an error
            self._failed("read")
            event("cache_read_failed", error=type(e).__name__)
            return None
        if self.changes != changes:
            # Written or invalidated meanwhile: what was read may be older than that.
            return self.hot.get(key)
        if stored is not None:
            self.hot.put(key, stored)
        return stored

    def _read(self, key: str) -> Stored | None:
        try:
            value = upgraded(self.disk.get(key))
            if value is not None and not intact(value):
                raise TypeError("not a cache record")
        except Exception:
            # A record that cannot be read never heals by itself: drop it, so the next
            # fetch stores a good one instead of failing on it forever.
            with contextlib.suppress(Exception):
                self.disk.delete(key)
            raise
        if not isinstance(value, Stored):
            return None
        if value.body_key is None:
            if value.body is not None and len(value.body) != value.entry.size:
                self._drop(key, value, "an inline body of the wrong size")
            return value
        if value.body_key not in self.disk:
            self.disk.delete(key)  # its body was evicted: the record is useless
            return None
        if value.entry.size <= SPILL_AT:
            body = self.disk.get(value.body_key)
            if not isinstance(body, bytes) or not matches(body, value):
                self._drop(key, value, "a body missing, or of the wrong size or CRC32")
            return Stored(value.entry, body, value.body_key, value.crc)
        handle = self.disk.get(value.body_key, read=True)
        size = -1 if handle is None else file_size(handle)
        if handle is not None:
            handle.close()
        if size != value.entry.size:
            self._drop(key, value, f"a body file of {size} bytes, not {value.entry.size}")
        return value

    def _drop(self, key: str, value: Stored, problem: str) -> None:
        """Remove a record whose body does not match it, then say so (on the thread)."""
        with contextlib.suppress(Exception):
            self.disk.delete(key)
            if value.body_key is not None:
                self.disk.delete(value.body_key)
        raise BodyMismatch(problem)

    async def body(self, stored: Stored) -> AsyncGenerator[bytes, None]:
        """The stored body in chunks (from a file for large bodies, in bounded memory).

        ``aclose()`` it when it is not read to the end: that closes the file at once.
        """
        if stored.body is not None:
            yield stored.body
            return
        assert stored.body_key is not None
        body_key = stored.body_key
        opening = self.executor.submit(self._open_body, body_key)
        try:
            handle: IO[bytes] | None = await asyncio.wrap_future(opening)
        except asyncio.CancelledError:
            # The thread may still open it: close what it opens, nobody else will.
            opening.add_done_callback(close_opened)
            raise
        if handle is None:
            self._mismatch(body_key, "a stored body disappeared before it was read")
        crc, size = 0, 0
        held = b""  # the last chunk goes out only once the whole body has been checked
        try:
            while chunk := await self._run(handle.read, CHUNK):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
                if size > stored.entry.size:
                    break
                if held:
                    yield held
                held = chunk
        finally:
            # On the loop: closing a file opened for reading does not block, and it must
            # also work while the store shuts down and its thread takes no more work.
            handle.close()
        if size != stored.entry.size or (stored.crc is not None and crc != stored.crc):
            # Found only while streaming (changed after the lookup checked it): the
            # caller's connection is broken off, so the answer never looks complete.
            self._mismatch(body_key, "a stored body changed after it was stored")
        if held:
            yield held

    def _mismatch(self, body_key: str, problem: str) -> NoReturn:
        self._mismatched()
        event("cache_body_mismatch", logging.WARNING, problem=problem)
        self._later(self._delete_value, body_key)  # its record then reads as a miss
        raise StoredBodyError(f"The cache found {problem}")

    def _delete_value(self, body_key: str) -> None:
        with contextlib.suppress(*DISK_ERRORS):
            self.disk.delete(body_key)

    def _open_body(self, body_key: str) -> IO[bytes] | None:
        value = self.disk.get(body_key, read=True)
        if isinstance(value, bytes):
            return io.BytesIO(value)
        return value  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ writes

    @property
    def writable(self) -> bool:  # once off, only probe() turns it back on
        return self.problem is None

    async def probe(self) -> bool:
        """Storing off and FULL_DISK_RETRY passed: a small write on the disk thread turns it
        back on if it succeeds (on a timer: an idle proxy's gauge stays true). True if on."""
        if self.problem is None or time.monotonic() < self._retry_at:
            return self.problem is None
        if await self._run(self._guarded, functools.partial(probe_write, self.disk)):
            self.problem = None
            event("cache_storing_enabled")
        return self.problem is None

    @property
    def behind(self) -> bool:
        """Whether the disk's queued writes are past :data:`WRITES_BEHIND`."""
        return len(self._pending) >= WRITES_BEHIND

    def promote(self, key: str, stored: Stored) -> None:
        """Hold an entry read from another tier (Redis) in memory (an invalidation finds it
        there like one stored here)."""
        self.hot.put(key, stored)

    async def read_spilled(self, path: Path, size: int) -> bytes | None:
        """A spilled body read back whole (for the shared store), or None if it is not
        ``size`` bytes or cannot be read."""
        try:
            body = await self._run(path.read_bytes)
        except OSError:
            return None
        return body if len(body) == size else None

    def put(self, key: str, stored: Stored) -> None:
        """Store an entry whose body is in memory (or already stored under body_key)."""
        self.changes += 1
        self.hot.put(key, stored)
        if not self.writable:
            return
        if stored.body_key is not None:
            # The body is on disk already (a 304 freshened the headers): write the record only.
            record = Stored(stored.entry, None, stored.body_key, stored.crc)
            self._later(self._write, key, record)
        elif stored.body is not None and len(stored.body) > INLINE_BODY:
            body_key = f"body:{uuid.uuid4().hex}"
            crc = zlib.crc32(stored.body)  # at most SPILL_AT bytes: well under a millisecond
            self.hot.put(key, Stored(stored.entry, stored.body, body_key, crc))
            record = Stored(stored.entry, None, body_key, crc)
            self._later(self._write_split, key, record, stored.body)
        else:
            self._later(self._write, key, stored)

    def _write(self, key: str, stored: Stored) -> None:
        self._guarded(lambda: self._replace(key, stored))

    def _write_split(self, key: str, record: Stored, body: bytes) -> None:
        assert record.body_key is not None
        body_key = record.body_key

        def write() -> None:
            self.disk.set(body_key, body)
            self._replace(key, record)

        self._guarded(write)

    def _replace(self, key: str, stored: Stored) -> None:
        try:
            old = self.disk.get(key)
        except Exception:  # a corrupt record is simply overwritten
            old = None
        # Tagged with its size in its account's share: counted after a restart unread.
        size = _share(key, stored)
        self.disk.set(key, stored, tag=size)
        if isinstance(old, Stored) and old.body_key and old.body_key != stored.body_key:
            self.disk.delete(old.body_key)
        # Counted in its account's share; the account's oldest evicted past it.
        evicted = self._delete(self.ledger.add(key, stored.entry.account, size))
        culled = evicted + self.disk.cull()
        if culled:
            self._evicted(culled)

    def _guarded(self, write: Callable[[], None]) -> bool:
        try:
            write()
        except Exception as e:
            if is_full(e):
                self._disable(f"disk full: {e}", full=True)
                return False
            self._failed("write")
            self._failures += 1
            event("cache_write_failed", logging.WARNING, error=type(e).__name__, detail=str(e))
            if self._failures >= FAILURES_TO_DISABLE:
                self._disable(f"{self._failures} writes in a row failed: {type(e).__name__}: {e}")
            return False
        self._failures = 0
        return True

    def _disable(self, problem: str, *, full: bool = False) -> None:
        """Stop storing until a probe succeeds (readiness and the gauge say why meanwhile)."""
        problem = " ".join(problem.split())[:200]
        if self.problem is None:
            event(
                "cache_storing_disabled", logging.WARNING, problem=problem, retry_in=FULL_DISK_RETRY
            )
            self._stopped_storing(full)
        self.problem = problem
        self._retry_at = time.monotonic() + FULL_DISK_RETRY

    def sink(self) -> BodySink:
        return BodySink(self._run, self.directory)

    async def commit_file(
        self, key: str, entry: Entry, path: Path, crc: int | None = None
    ) -> Stored | None:
        """Store a body that was spilled to ``path`` (copied into diskcache, then deleted);
        ``crc``: its CRC32, checked whenever it is read back."""
        body_key = f"body:{uuid.uuid4().hex}"
        writable = self.writable

        def write() -> bool:
            try:
                if not writable:
                    return False
                with path.open("rb") as f:
                    return self._guarded(lambda: self._commit(key, entry, body_key, f, crc))
            finally:
                path.unlink(missing_ok=True)

        future = asyncio.get_running_loop().run_in_executor(self.executor, write)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        if not await asyncio.shield(future):
            return None
        self.changes += 1
        self.hot.pop(key)
        return Stored(entry, None, body_key, crc)

    def _commit(self, key: str, entry: Entry, body_key: str, f: IO[bytes], crc: int | None) -> None:
        self.disk.set(body_key, f, read=True)
        self._replace(key, Stored(entry, None, body_key, crc))

    def delete(self, key: str) -> None:
        self.changes += 1
        self.hot.pop(key)
        self._later(self._delete, [key])

    def _delete(self, keys: list[str]) -> int:
        removed = 0
        for key in keys:
            self.ledger.remove(key)
            try:
                old = self.disk.pop(key)
                if isinstance(old, Stored) and old.body_key:
                    self.disk.delete(old.body_key)
                removed += old is not None
            except DISK_ERRORS:
                self._failed("delete")
        return removed

    # ------------------------------------------------------------------ invalidation, purge

    def invalidate(self, inv: Change) -> int:
        """Remove every entry the invalidation covers: from memory at once (returns how many),
        from the disk after every write queued before it (counted there)."""
        self._remember(inv)
        keys = self.hot.take(inv.covers)
        self._later(self._delete_covered, inv)
        return len(keys)

    def _remember(self, covers: Change) -> None:
        self.sequence += 1
        self.changes += 1
        self.recent.append((self.sequence, covers))

    def invalidated_since(self, sequence: int, account: str, path: str) -> bool:
        """Whether an invalidation after ``sequence`` covers the path (a fetch begun before it
        must not store what it got)."""
        if not self.recent:
            return False
        if self.recent[0][0] > sequence + 1 and len(self.recent) == 1024:
            return True  # history overflowed: assume the worst
        return any(s > sequence and inv.covers(account, path) for s, inv in self.recent)

    def _delete_covered(self, change: Change) -> int:
        """Delete every record on disk that ``change`` covers (found on the disk)."""
        try:
            keys = covered(self.disk, change)
        except DISK_ERRORS:  # as a delete that fails: counted, the store goes on
            self._failed("delete")
            return 0
        removed = self._delete(keys)
        if removed and isinstance(change, Invalidation) and self.metrics is not None:
            self.metrics.cache_invalidations.inc(removed)
        return removed

    async def purge(self, prefix: str = "", account: str | None = None) -> int:
        """Remove entries by path prefix and/or account; returns how many were on disk."""
        purge = Purge(prefix, account)
        self._remember(purge)  # a fetch in flight now must not store what it gets
        if purge.everything:
            self.hot.clear()
            removed: int = await self._run(self._clear)
            return removed
        self.hot.take(purge.covers)
        self.epoch += 1
        removed = await self._run(self._delete_covered, purge)
        await self._run(self.disk.set, EPOCH_KEY, self.epoch)
        return removed

    def _clear(self) -> int:
        count = sum(1 for k in self.disk.iterkeys() if isinstance(k, str) and parse_key(k))
        self.disk.clear()
        self.ledger.clear()
        self.disk.set(EPOCH_KEY, self.epoch + 1)
        self.epoch += 1
        return count

    async def check_epoch(self) -> None:
        """Drop the memory copies when another process (the CLI) purged the disk."""
        try:
            epoch = int(await self._run(self.disk.get, EPOCH_KEY, 0))
        except DISK_ERRORS:
            return
        if epoch != self.epoch:
            self.epoch = epoch
            self.hot.clear()

    def gauges(self) -> tuple[int, int]:
        """Entries and bytes on disk, cheap enough for every scrape (on the event loop)."""
        return disk_gauges(self.disk)

    async def stats(self) -> dict[str, int | str | None]:
        """Entries and bytes on disk and in memory; when the disk cannot be read, the disk's
        counts are None and ``error`` says why (the admin route still answers JSON)."""

        try:
            result: dict[str, int | str | None] = await self._run(disk_stats, self.disk)
        except Exception as e:
            self._failed("read")
            error = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            result = {"entries": None, "bytes": None, "error": error}
        result["memory_entries"] = len(self.hot.items)
        result["memory_bytes"] = self.hot.bytes
        return result


def _share(key: str, stored: Stored) -> int:
    """What a record counts in its account's share of the disk."""
    return len(key) + stored.entry.size + ENTRY_OVERHEAD
