"""The memory tier: entries with their bodies, in a byte-bounded LRU on the event loop
(what makes a fresh hit cost no thread hop), and :class:`Stored`, the unit every tier holds.

The tier indexes its own keys by (account, normalised path), so an invalidation finds the ones
it covers without looking at every entry; the disk's entries are found on the disk
(:func:`proxy.cache.disk.covered`), so nothing in memory grows with the entries stored there."""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.cache.entry import Entry
from proxy.cache.invalidation import normalise_path
from proxy.cache.shares import Ledger

# What an entry costs the memory LRU besides its body (key, Entry, headers), so that
# empty bodies (204s, empty lists) cannot fill memory with ever more entries.
ENTRY_OVERHEAD = 512


@dataclass(frozen=True, slots=True)
class Stored:
    """An entry and its body: bytes, or the key of a body stored as its own value."""

    entry: Entry
    body: bytes | None
    body_key: str | None = None
    # CRC32 of a body stored apart (None: not known, only the size is checked).
    crc: int | None = None


class HotEntries:
    """A byte-bounded LRU of stored entries (on the event loop only)."""

    def __init__(self, max_bytes: int, ledger: Ledger | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: OrderedDict[str, Stored] = OrderedDict()
        self.ledger = ledger or Ledger()  # each account's share (proxy.cache.shares)
        # (account, normalised path) -> the keys held of it (what invalidations look through)
        self.paths: dict[tuple[str, str], set[str]] = {}

    def get(self, key: str) -> Stored | None:
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
            self.ledger.touch(key)
        return found

    def put(self, key: str, stored: Stored) -> None:
        old = self.items.get(key)
        if (
            old is not None
            and stored.body is not None
            and len(stored.body) == len(old.body or b"")
            and stored.entry.path == old.entry.path
            and stored.entry.account == old.entry.account
        ):
            # A 304 freshened it (the same body): what pop and put would leave, without
            # their bookkeeping (same cost, same account and path: nothing else moves).
            self.items[key] = stored
            self.items.move_to_end(key)
            self.ledger.touch(key)
            return
        self.pop(key)
        if stored.body is None:
            return
        size = _cost(key, stored)
        if size > self.max_bytes // 8:
            return
        self.items[key] = stored
        self.bytes += size
        self.paths.setdefault(_where(stored), set()).add(key)
        for victim in self.ledger.add(key, stored.entry.account, size):
            self.pop(victim)
        while self.bytes > self.max_bytes:
            self.pop(next(iter(self.items)))

    def pop(self, key: str) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self.bytes -= _cost(key, old)
            self.ledger.remove(key)
            where = _where(old)
            keys = self.paths.get(where)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.paths[where]

    def take(self, covers: Callable[[str, str], bool]) -> list[str]:
        """Drop every entry whose (account, normalised path) ``covers`` names; their keys."""
        keys = [key for where in [w for w in self.paths if covers(*w)] for key in self.paths[where]]
        for key in keys:
            self.pop(key)
        return keys

    def clear(self) -> None:
        self.items.clear()
        self.paths.clear()
        self.bytes = 0
        self.ledger.clear()


def _where(stored: Stored) -> tuple[str, str]:
    return stored.entry.account, normalise_path(stored.entry.path)


def _cost(key: str, stored: Stored) -> int:
    return len(key) + len(stored.body or b"") + ENTRY_OVERHEAD


def intact(value: object) -> bool:
    """A record of this version: a Stored whose Entry has every field (an Entry pickled by
    an older version can lack some, which would only fail later, on the event loop)."""
    if not isinstance(value, Stored) or not isinstance(value.entry, Entry):
        return False
    if not all(hasattr(value, name) for name in Stored.__slots__):
        return False
    return all(hasattr(value.entry, name) for name in Entry.__slots__)


def upgraded(value: object) -> object:
    """A record stored before bodies had a CRC32: kept, checked by size only."""
    if isinstance(value, Stored) and not hasattr(value, "crc"):
        object.__setattr__(value, "crc", None)
    return value


def matches(body: bytes, stored: Stored) -> bool:
    if len(body) != stored.entry.size:
        return False
    return stored.crc is None or zlib.crc32(body) == stored.crc
