"""The cache's storage: diskcache on disk, a small LRU of hot entries in memory.

Every disk operation runs on one worker thread, in submission order, so a delete
queued after a write always wins and the event loop never waits on SQLite or the
file system. The memory LRU is updated on the loop at once; it is what makes a
fresh hit cost no thread hop (measured: a hop costs more than a whole hit).

Large bodies are never held whole: :class:`BodySink` spills chunks to a temporary
file as they arrive and hands the file to diskcache only once the body is complete.

A body stored apart from its record is checked when read: its size always, its CRC32
(kept in the record) too; one that does not match (a file truncated, deleted or changed
on disk) is dropped and the lookup is a miss, counted, so the answer comes from upstream
instead of a wrong 200 or one that breaks off. Repeated write failures (a corrupt
``cache.db``) turn storing off for a while like a full disk does, and say so in readiness.

Directories the store creates are 0700 and its files 0600, whatever the umask
(:class:`~proxy.compat.diskcache.PrivateDisk`); directories that exist already are left as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn, Protocol, TypeVar

import diskcache  # type: ignore[import-untyped]

from proxy.cache.policy import Entry, normalise_path, parse_key
from proxy.cache.shares import Ledger
from proxy.compat.diskcache import PrivateDisk, count_keys
from proxy.errors import StoredBodyError
from proxy.files import FILE_MODE, private_dir
from proxy.logs import event
from proxy.messages import CHUNK

T = TypeVar("T")
# Bodies up to this size live inside the entry's record; larger ones are a separate value
# (a file in diskcache's directory) so that freshening the headers never rewrites them.
INLINE_BODY = 32 * 1024
# Bodies up to this size are held in memory while fetched; larger ones spill to a file.
SPILL_AT = 1024 * 1024
EPOCH_KEY = "__purge_epoch__"
# After a full disk, storing is tried again after this many seconds.
FULL_DISK_RETRY = 60.0
# What the store writes (then deletes) to learn whether the disk takes writes again.
PROBE_KEY = "__write_probe__"
PROBE_SIZE = 4096
DISK_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)
# What an entry costs the memory LRU besides its body (key, Entry, headers), so that
# empty bodies (204s, empty lists) cannot fill memory with ever more entries.
ENTRY_OVERHEAD = 512
# Keys the path index holds at most; past that, invalidation and purge scan the disk.
INDEX_LIMIT = 200_000
# Write failures in a row (other than a full disk) after which storing is turned off.
FAILURES_TO_DISABLE = 3


class BodyMismatch(Exception):
    """A stored body is not the one its record describes (size or CRC32)."""


class Covers(Protocol):
    def covers(self, account: str, path: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Purge:
    """An operator's purge, remembered like an invalidation so in-flight fetches don't store."""

    prefix: str
    account: str | None

    def covers(self, account: str, path: str) -> bool:
        return (self.account is None or account == self.account) and path.startswith(self.prefix)


@dataclass(frozen=True, slots=True)
class Stored:
    """An entry and its body: bytes, or the key of a body stored as its own value."""

    entry: Entry
    body: bytes | None
    body_key: str | None = None
    # CRC32 of a body stored apart (None: not known, only the size is checked).
    crc: int | None = None


def _close_opened(opening: Future[IO[bytes] | None]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        handle = opening.result()
        if handle is not None:
            handle.close()


def _is_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, sqlite3.OperationalError) and "full" in str(error).lower()


class HotEntries:
    """A byte-bounded LRU of stored entries (on the event loop only)."""

    def __init__(self, max_bytes: int, ledger: Ledger | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: OrderedDict[str, Stored] = OrderedDict()
        self.ledger = ledger or Ledger()  # each account's share (proxy.cache.shares)

    def get(self, key: str) -> Stored | None:
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
            self.ledger.touch(key)
        return found

    def put(self, key: str, stored: Stored) -> None:
        self.pop(key)
        if stored.body is None:
            return
        size = _cost(key, stored)
        if size > self.max_bytes // 8:
            return
        self.items[key] = stored
        self.bytes += size
        for victim in self.ledger.add(key, stored.entry.account, size):
            self.pop(victim)
        while self.bytes > self.max_bytes:
            old_key, old = self.items.popitem(last=False)
            self.bytes -= _cost(old_key, old)
            self.ledger.remove(old_key)

    def pop(self, key: str) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self.bytes -= _cost(key, old)
            self.ledger.remove(key)

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0
        self.ledger.clear()


def _cost(key: str, stored: Stored) -> int:
    return len(key) + len(stored.body or b"") + ENTRY_OVERHEAD


def _intact(value: object) -> bool:
    """A record of this version: a Stored whose Entry has every field (an Entry pickled by
    an older version can lack some, which would only fail later, on the event loop)."""
    if not isinstance(value, Stored) or not isinstance(value.entry, Entry):
        return False
    if not all(hasattr(value, name) for name in Stored.__slots__):
        return False
    return all(hasattr(value.entry, name) for name in Entry.__slots__)


def _upgraded(value: object) -> object:
    """A record stored before bodies had a CRC32: kept, checked by size only."""
    if isinstance(value, Stored) and not hasattr(value, "crc"):
        object.__setattr__(value, "crc", None)
    return value


def _matches(body: bytes, stored: Stored) -> bool:
    if len(body) != stored.entry.size:
        return False
    return stored.crc is None or zlib.crc32(body) == stored.crc


def _file_size(handle: IO[bytes]) -> int:
    try:
        return os.fstat(handle.fileno()).st_size
    except (OSError, ValueError, AttributeError):  # an in-memory value (BytesIO)
        return len(handle.getbuffer()) if hasattr(handle, "getbuffer") else -1


class CacheStore:
    """Entries by key, with the path index that invalidation and purge need."""

    def __init__(
        self,
        directory: Path,
        max_size: int,
        memory_size: int,
        index_limit: int = INDEX_LIMIT,
        shares: Mapping[str, float] | None = None,
    ) -> None:
        self.directory = directory
        self.max_size = max_size
        # shares: each account's weight in both tiers ([accounts.NAME] cache_share).
        self.hot = HotEntries(memory_size, Ledger(memory_size, shares))
        self.ledger = Ledger(max_size, shares)  # the disk's; used on the worker thread only
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-store")
        self.disk: diskcache.Cache = _open(directory, max_size)
        # (account, normalised path) -> keys; may name keys diskcache has evicted since.
        self.paths: dict[tuple[str, str], set[str]] = {}
        self.indexed = 0
        self.index_limit = index_limit
        # False once a key could not be indexed (limit reached): removals then scan the disk.
        self.index_complete = True
        self.problem: str | None = None
        self._retry_at = 0.0
        self._failures = 0  # write failures in a row
        self._pending: set[asyncio.Future[Any]] = set()
        # Invalidations by sequence number, so a fetch that began before one does not store.
        self.sequence = 0
        self.recent: deque[tuple[int, Covers]] = deque(maxlen=1024)
        self.epoch: int = 0
        # Bumped by every write, delete and invalidation made on the loop.
        self.changes = 0
        self.on_error: Callable[[str], None] = lambda op: None
        self.on_evict: Callable[[int], None] = lambda n: None
        self.on_full: Callable[[], None] = lambda: None
        self.on_disabled: Callable[[], None] = lambda: None
        self.on_mismatch: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ life

    @classmethod
    async def open(
        cls,
        directory: Path,
        max_size: int,
        memory_size: int,
        shares: Mapping[str, float] | None = None,
    ) -> CacheStore:
        loop = asyncio.get_running_loop()
        make = functools.partial(cls, directory, max_size, memory_size, shares=shares)
        store = await loop.run_in_executor(None, make)
        await store._run(store._load_index)
        return store

    def _load_index(self) -> None:
        for key in self.disk.iterkeys():
            parts = parse_key(key) if isinstance(key, str) else None
            if parts is not None:
                self._index(key, parts.account, parts.path)
                if self.ledger.active:
                    self._count(key, self.disk.get(key))
        self.epoch = int(self.disk.get(EPOCH_KEY, 0))

    async def close(self) -> None:
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
            self.on_mismatch()
            event("cache_body_mismatch", logging.WARNING, problem=str(e))
            return None
        except Exception as e:  # a broken record is a miss, never an error
            self.on_error("read")
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
            value = _upgraded(self.disk.get(key))
            if value is not None and not _intact(value):
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
            if not isinstance(body, bytes) or not _matches(body, value):
                self._drop(key, value, "a body missing, or of the wrong size or CRC32")
            return Stored(value.entry, body, value.body_key, value.crc)
        handle = self.disk.get(value.body_key, read=True)
        size = -1 if handle is None else _file_size(handle)
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
            opening.add_done_callback(_close_opened)
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
        self.on_mismatch()
        event("cache_body_mismatch", logging.WARNING, problem=problem)
        self._later(self._delete_value, body_key)  # its record then reads as a miss
        raise StoredBodyError(f"The cache found {problem}")

    def _delete_value(self, body_key: str) -> None:
        with contextlib.suppress(*DISK_ERRORS):
            self.disk.delete(body_key)

    def _open_body(self, body_key: str) -> IO[bytes] | None:
        value = self.disk.get(body_key, read=True)
        if isinstance(value, bytes):
            import io

            return io.BytesIO(value)
        return value  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ writes

    @property
    def writable(self) -> bool:
        """Storing is on; once off, only :meth:`probe` turns it back on."""
        return self.problem is None

    async def probe(self) -> bool:
        """When storing is off and FULL_DISK_RETRY has passed, try a small write on the disk
        thread; storing comes back only if it succeeds. Called on a timer, so an idle proxy
        keeps saying the disk is full (and says so the moment it is not) without a request
        to find out. True when storing is on afterwards."""
        if self.problem is None or time.monotonic() < self._retry_at:
            return self.problem is None
        if await self._run(self._guarded, self._probe_write):
            self.problem = None
            event("cache_storing_enabled")
        return self.problem is None

    def _probe_write(self) -> None:
        self.disk.set(PROBE_KEY, bytes(PROBE_SIZE))
        self.disk.delete(PROBE_KEY)

    def promote(self, key: str, stored: Stored) -> None:
        """Hold an entry read from another tier (Redis) in memory, indexed so that an
        invalidation removes it like one stored here."""
        self.hot.put(key, stored)
        self._index(key, stored.entry.account, stored.entry.path)

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
        self._index(key, stored.entry.account, stored.entry.path)
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
        self.disk.set(key, stored)
        if isinstance(old, Stored) and old.body_key and old.body_key != stored.body_key:
            self.disk.delete(old.body_key)
        self._count(key, stored)
        culled = self.disk.cull()
        if culled:
            self.on_evict(culled)

    def _count(self, key: str, stored: object) -> None:
        """Count a record in its account's share; evict the account's oldest past it."""
        if isinstance(stored, Stored):
            size = len(key) + stored.entry.size + ENTRY_OVERHEAD
            evicted = self._delete(self.ledger.add(key, stored.entry.account, size))
            if evicted:
                self.on_evict(evicted)

    def _guarded(self, write: Callable[[], None]) -> bool:
        try:
            write()
        except Exception as e:
            if _is_full(e):
                self._disable(f"disk full: {e}", full=True)
                return False
            self.on_error("write")
            self._failures += 1
            event("cache_write_failed", logging.WARNING, error=type(e).__name__, detail=str(e))
            if self._failures >= FAILURES_TO_DISABLE:
                self._disable(f"{self._failures} writes in a row failed: {type(e).__name__}: {e}")
            return False
        self._failures = 0
        return True

    def _disable(self, problem: str, *, full: bool = False) -> None:
        """Stop storing until a probe (every FULL_DISK_RETRY seconds) succeeds; readiness
        and the gauge say why meanwhile."""
        problem = " ".join(problem.split())[:200]
        if self.problem is None:
            event(
                "cache_storing_disabled", logging.WARNING, problem=problem, retry_in=FULL_DISK_RETRY
            )
            if full:
                self.on_full()
            else:
                self.on_disabled()
        self.problem = problem
        self._retry_at = time.monotonic() + FULL_DISK_RETRY

    def sink(self) -> BodySink:
        return BodySink(self)

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
        self._index(key, entry.account, entry.path)
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
                self.on_error("delete")
        return removed

    def _index(self, key: str, account: str, path: str) -> None:
        keys = self.paths.setdefault((account, normalise_path(path)), set())
        if key in keys:
            return
        if self.indexed >= self.index_limit:
            # Bounded memory whatever the number of distinct keys: stop indexing and let
            # removals scan the disk instead (slower, but only past the limit).
            if not keys:
                del self.paths[(account, normalise_path(path))]
            self.index_complete = False
            return
        keys.add(key)
        self.indexed += 1

    # ------------------------------------------------------------------ invalidation, purge

    def invalidate(self, inv: Covers) -> int:
        """Remove every entry the invalidation covers; returns how many keys were known."""
        self._remember(inv)
        keys = self._take(inv.covers)
        if keys:
            self._later(self._delete, keys)
        if not self.index_complete:
            self._later(self._delete_matching, inv.covers)
        return len(keys)

    def _remember(self, covers: Covers) -> None:
        self.sequence += 1
        self.changes += 1
        self.recent.append((self.sequence, covers))

    def invalidated_since(self, sequence: int, account: str, path: str) -> bool:
        """Whether an invalidation after ``sequence`` covers the path (a fetch begun before it
        must not store what it got)."""
        if self.recent and self.recent[0][0] > sequence + 1 and len(self.recent) == 1024:
            return True  # history overflowed: assume the worst
        return any(s > sequence and inv.covers(account, path) for s, inv in self.recent)

    def _take(self, covers: Callable[[str, str], bool]) -> list[str]:
        keys: list[str] = []
        for account, path in [k for k in self.paths if covers(*k)]:
            for key in self.paths.pop((account, path)):
                self.hot.pop(key)
                keys.append(key)
        self.indexed -= len(keys)
        if not self.index_complete:
            for key in list(self.hot.items):
                parts = parse_key(key)
                if parts is not None and covers(parts.account, normalise_path(parts.path)):
                    self.hot.pop(key)
        return keys

    def _delete_matching(self, covers: Callable[[str, str], bool]) -> int:
        """Delete every record on disk that ``covers`` names (the index is incomplete)."""
        keys = []
        for key in self.disk.iterkeys():
            parts = parse_key(key) if isinstance(key, str) else None
            if parts is not None and covers(parts.account, normalise_path(parts.path)):
                keys.append(key)
        return self._delete(keys)

    async def purge(self, prefix: str = "", account: str | None = None) -> int:
        """Remove entries by path prefix and/or account; returns how many were on disk."""
        purge = Purge(prefix, account)
        self._remember(purge)  # a fetch in flight now must not store what it gets
        keys = self._take(purge.covers)
        if not prefix and account is None:
            self.hot.clear()
            self.paths.clear()
            self.indexed, self.index_complete = 0, True
            removed: int = await self._run(self._clear)
            return removed
        self.epoch += 1
        if self.index_complete:
            removed = await self._run(self._delete, keys)
        else:
            removed = await self._run(self._delete_matching, purge.covers)
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
        """Entries and bytes on disk, cheap enough for every scrape (on the event loop):
        diskcache's own counters, kept by its triggers, less the keys that are not entries
        (split bodies, counted over the key index, and the purge epoch)."""
        keys = len(self.disk)
        bodies = count_keys(self.disk, "body:", "body;")
        epoch = 1 if EPOCH_KEY in self.disk else 0
        return max(0, keys - int(bodies) - epoch), int(self.disk.volume())

    async def stats(self) -> dict[str, int | str | None]:
        """Entries and bytes on disk and in memory; when the disk cannot be read, the disk's
        counts are None and ``error`` says why (the admin route still answers JSON)."""

        def count() -> dict[str, int | str | None]:
            entries = sum(1 for k in self.disk.iterkeys() if isinstance(k, str) and parse_key(k))
            return {"entries": entries, "bytes": int(self.disk.volume())}

        try:
            result = await self._run(count)
        except Exception as e:
            self.on_error("read")
            error = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            result = {"entries": None, "bytes": None, "error": error}
        result["memory_entries"] = len(self.hot.items)
        result["memory_bytes"] = self.hot.bytes
        return result


class BodySink:
    """A body being fetched: in memory up to SPILL_AT, then in a temporary file."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store
        self.buffer = bytearray()
        self.size = 0
        self.crc = 0  # CRC32 of what was written, checked whenever the body is read back
        self.path: Path | None = None
        self._file: IO[bytes] | None = None

    @property
    def in_memory(self) -> bool:
        return self._file is None

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.crc = zlib.crc32(chunk, self.crc)
        self.buffer += chunk
        if self._file is None and len(self.buffer) <= SPILL_AT:
            return
        if self._file is None:
            self._file, self.path = await self.store._run(self._create)
        if len(self.buffer) >= CHUNK:
            data, self.buffer = bytes(self.buffer), bytearray()
            await self.store._run(self._write_file, data)

    def _write_file(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)

    def _create(self) -> tuple[IO[bytes], Path]:
        tmp = self.store.directory / "tmp"
        private_dir(tmp)
        fd, name = tempfile.mkstemp(dir=tmp, prefix="body-")
        return os.fdopen(fd, "wb"), Path(name)

    async def finish(self) -> Path:
        """Flush and close the file (only for spilled bodies)."""
        assert self._file is not None
        assert self.path is not None
        f, data = self._file, bytes(self.buffer)
        self.buffer = bytearray()

        def close() -> None:
            f.write(data)
            f.close()

        await self.store._run(close)
        self._file = None
        return self.path

    def abandon(self) -> None:
        """Close and remove a file still being written, at once: for a fetch cancelled
        (at shutdown) between writes, when no thread hop may be left to do it."""
        f, path = self._file, self.path
        if f is None:
            return  # never spilled, finished or discarded: nothing is open
        self._file, self.path = None, None
        f.close()
        if path is not None:
            path.unlink(missing_ok=True)

    async def discard(self) -> None:
        f, path = self._file, self.path
        self._file, self.path, self.buffer = None, None, bytearray()
        if path is None:
            return

        def remove() -> None:
            if f is not None:
                f.close()
            path.unlink(missing_ok=True)

        await self.store._run(remove)


def _open(directory: Path, max_size: int) -> diskcache.Cache:
    """Open the cache; a corrupt one is moved aside and a fresh one made (one log line)."""
    try:
        return _probe(directory, max_size)
    except (sqlite3.DatabaseError, OSError, diskcache.Timeout) as e:
        aside = directory.with_name(f"{directory.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            if directory.is_dir():
                shutil.move(str(directory), aside)
            elif directory.exists():
                directory.rename(aside)
        event("cache_dir_corrupt", dir=str(directory), moved_to=str(aside), error=str(e))
        return _probe(directory, max_size)


def _probe(directory: Path, max_size: int) -> diskcache.Cache:
    private_dir(directory)
    database = directory / "cache.db"
    if not database.exists():
        # SQLite gives its -wal and -shm files the database file's own mode.
        with contextlib.suppress(FileExistsError):
            fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            os.fchmod(fd, FILE_MODE)
            os.close(fd)
    disk = diskcache.Cache(
        str(directory),
        disk=PrivateDisk,
        size_limit=max_size,
        eviction_policy="least-recently-stored",
        cull_limit=0,  # culled explicitly after each write, so evictions can be counted
        statistics=False,
    )
    try:
        disk.get(EPOCH_KEY)
        len(disk)
        for stale in (directory / "tmp").glob("body-*"):
            stale.unlink(missing_ok=True)  # spilled bodies of a previous run
    except BaseException:
        disk.close()
        raise
    return disk
