"""The memory tier: entries with their bodies, in a byte-bounded LRU on the event loop
(what makes a fresh hit cost no thread hop), and :class:`Stored`, the unit every tier holds."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from proxy.cache.policy import Entry
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
