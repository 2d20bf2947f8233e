"""The store's files: diskcache opened with private modes (or moved aside when corrupt),
:class:`BodySink`, a body being fetched that spills to a temporary file when large, and the
disk's keys looked through: what a change covers (:func:`covered`) and each account's share
counted after start-up (:class:`Counting`).

Directories the store creates are 0700 and its files 0600, whatever the umask
(:class:`~proxy.compat.diskcache.PrivateDisk`); directories that exist already are left as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

import diskcache  # type: ignore[import-untyped]

from proxy.cache.invalidation import Change, Purge, normalise_path
from proxy.cache.keys import key_prefix, parse_key
from proxy.compat.diskcache import (
    TOP,
    Cursor,
    PrivateDisk,
    count_keys,
    keys_between,
    keys_holding,
    keys_listing,
    rows_by_age,
)
from proxy.files import FILE_MODE, private_dir
from proxy.logs import event
from proxy.messages import CHUNK

# Bodies up to this size are held in memory while fetched; larger ones spill to a file.
SPILL_AT = 1024 * 1024
EPOCH_KEY = "__purge_epoch__"
# What the store writes (then deletes) to learn whether the disk takes writes again.
PROBE_KEY = "__write_probe__"
PROBE_SIZE = 4096
DISK_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)
# Pages (4 KiB) of SQLite's page cache per connection: the B-tree's inner pages of 100k keys
# fit; diskcache's default is 8,192 (32 MiB each).
SQLITE_CACHE_PAGES = 1024
# Runs a function on the store's one disk thread.
Run = Callable[..., Awaitable[Any]]
# Every cache key is a JSON array: it begins with "[", and "\\" is the character after it.
KEYS = ("[", "\\")


def close_opened(opening: Future[IO[bytes] | None]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        handle = opening.result()
        if handle is not None:
            handle.close()


def is_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, sqlite3.OperationalError) and "full" in str(error).lower()


def file_size(handle: IO[bytes]) -> int:
    try:
        return os.fstat(handle.fileno()).st_size
    except (OSError, ValueError, AttributeError):  # an in-memory value (BytesIO)
        return len(handle.getbuffer()) if hasattr(handle, "getbuffer") else -1


class BodySink:
    """A body being fetched: in memory up to SPILL_AT, then in a temporary file."""

    def __init__(self, run: Run, directory: Path) -> None:
        self.run = run
        self.directory = directory
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
            self._file, self.path = await self.run(self._create)
        if len(self.buffer) >= CHUNK:
            data, self.buffer = bytes(self.buffer), bytearray()
            await self.run(self._write_file, data)

    def _write_file(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)

    def _create(self) -> tuple[IO[bytes], Path]:
        tmp = self.directory / "tmp"
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

        await self.run(close)
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

        await self.run(remove)


def disk_gauges(disk: diskcache.Cache) -> tuple[int, int]:
    """Entries and bytes on disk, cheap enough for every scrape: diskcache's own counters,
    kept by its triggers, less the keys that are not entries (split bodies, counted over
    the key index, and the purge epoch)."""
    keys = len(disk)
    bodies = count_keys(disk, "body:", "body;")
    epoch = 1 if EPOCH_KEY in disk else 0
    return max(0, keys - int(bodies) - epoch), int(disk.volume())


def disk_stats(disk: diskcache.Cache) -> dict[str, int | str | None]:
    """Entries and bytes on disk, counted (on the disk thread)."""
    entries = sum(1 for k in disk.iterkeys() if isinstance(k, str) and parse_key(k))
    return {"entries": entries, "bytes": int(disk.volume())}


def probe_write(disk: diskcache.Cache) -> None:
    """A small write (then delete): whether the disk takes writes again."""
    disk.set(PROBE_KEY, bytes(PROBE_SIZE))
    disk.delete(PROBE_KEY)


class RecordDisk(PrivateDisk):
    """The store's files, private (:class:`~proxy.compat.diskcache.PrivateDisk`), and its
    records read back though a class they name has moved: records written before the cache's
    decisions were split into modules (main d3a0c1d and earlier) name their Entry in the
    module that held them all then."""

    moved = {("proxy.cache.policy", "Entry"): ("proxy.cache.entry", "Entry")}


def open_disk(directory: Path, max_size: int) -> diskcache.Cache:
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
        disk=RecordDisk,
        size_limit=max_size,
        eviction_policy="least-recently-stored",
        cull_limit=0,  # culled explicitly after each write, so evictions can be counted
        statistics=False,
        # SQLite's own memory, per connection (the store's thread, the scrapes' gauges): no
        # memory map of the database (its pages counted in the process's RSS, up to 64 MB)
        # and a small page cache; the kernel's page cache holds the file at no cost to RSS.
        sqlite_mmap_size=0,
        sqlite_cache_size=SQLITE_CACHE_PAGES,
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


def covered(disk: diskcache.Cache, change: Change) -> list[str]:
    """The keys on disk that ``change`` covers: what queries on the key index find for each of
    its paths, patterns and lists (a superset: a key holds its path after the account's
    prefix), each then checked with ``change.covers`` itself."""
    found: set[str] = set()
    for query in _queries(change):
        found.update(query(disk))
    keys = []
    for key in found:
        parts = parse_key(key)
        if parts is not None and change.covers(parts.account, normalise_path(parts.path)):
            keys.append(key)
    return keys


Query = Callable[[diskcache.Cache], list[str]]


def _queries(change: Change) -> list[Query]:
    """Queries on the keys that find every key ``change`` may cover."""
    if isinstance(change, Purge):
        if change.account is None:  # any account: the path comes after the method
            text = '"GET",' + json.dumps(change.prefix)[:-1]
            return [functools.partial(keys_holding, low=KEYS[0], high=KEYS[1], text=text)]
        return [_prefixed(key_prefix(change.account, change.prefix))]
    queries = [_prefixed(key_prefix(change.account, p)) for p in change.paths]
    # A pattern's text before its first "*" begins every path it matches.
    queries += [_prefixed(key_prefix(change.account, p.split("*")[0])) for p in change.patterns]
    low = key_prefix(change.account)
    for segment in change.lists_of:
        name = "/" + json.dumps(segment)[1:-1]  # as it is written inside a key
        queries.append(functools.partial(keys_listing, low=low, high=low + TOP, name=name))
    return queries


def _prefixed(prefix: str) -> Query:
    return functools.partial(keys_between, low=prefix, high=prefix + TOP)


# A page of records counted: (key, account, its size in the share, None if not tagged).
Counted = list[tuple[str, str, int | None]]


class Counting:
    """The records on disk counted in their accounts' shares after start-up: a task that
    counts a page at a time; :attr:`done` is set once it is over (at once when the shares
    are not kept: one account)."""

    def __init__(self, needed: bool) -> None:
        self.done = asyncio.Event()
        if not needed:
            self.done.set()
        self.task: asyncio.Task[None] | None = None

    def start(self, count: Callable[[], Awaitable[None]]) -> None:
        if not self.done.is_set():
            loop = asyncio.get_running_loop()
            self.task = loop.create_task(self._counted(count), name="cache-count-shares")

    async def _counted(self, count: Callable[[], Awaitable[None]]) -> None:
        try:
            await count()
        except Exception as e:  # shares partly counted; the disk's own limit still holds
            event("cache_shares_not_counted", logging.WARNING, error=type(e).__name__)
        finally:
            self.done.set()

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    @staticmethod
    def page(disk: diskcache.Cache, cursor: Cursor, limit: int) -> tuple[Counted, Cursor]:
        """The next page of records older than ``cursor``, newest first, and the cursor."""
        rows, cursor = rows_by_age(disk, *KEYS, cursor, limit)
        counted: Counted = []
        for key, tag in rows:
            parts = parse_key(key)
            if parts is not None:
                counted.append((key, parts.account, tag if type(tag) is int else None))
        return counted, cursor
