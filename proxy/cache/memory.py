"""The memory tier: entries with their bodies, in a byte-bounded LRU on the event loop
(what makes a fresh hit cost no thread hop), and :class:`Stored`, the unit every tier holds.

The tier indexes its own keys by (account, normalised path), so an invalidation finds the ones
it covers without looking at every entry; the disk's entries are found on the disk
(:func:`proxy.cache.disk.covered`), so nothing in memory grows with the entries stored there.

What the tier holds is out of the cyclic collector's walk: each :class:`Stored` and its
:class:`~proxy.cache.entry.Entry` are untracked when put (they hold numbers, strings, bytes
and tuples of them: no cycle can go through them; :func:`proxy.compat.collector.untrack`),
so are the LRU's and the paths' dicts, and a path's index holds its one key as a string (a
set only for a path stored under several keys). Tracked, 100,000 entries made a full pass
walk ~330,000 objects: ~410 ms with nothing answered (docs/performance.md, "The tail as the
cache grows").

What the fast path learns of a held entry on its first look (its coding, whether its path has
a webhook rule, its answer's head) is kept beside it (:class:`Kept`, :meth:`HotEntries.kept`)
and dropped with it, rather than in memos keyed by the entry's headers or path; each record
counts :data:`KEPT_BYTES` against the tier's bound while held."""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.cache.entry import Entry
from proxy.cache.invalidation import normalise_path
from proxy.cache.shares import Ledger
from proxy.compat.collector import untrack
from proxy.memo import fit_keys

# What an entry costs the memory LRU besides its body (key, Entry, headers), so that
# empty bodies (204s, empty lists) cannot fill memory with ever more entries.
ENTRY_OVERHEAD = 512
# What the fast path's record of a held entry costs the memory LRU (:class:`Kept`: its
# rendered head ~850 bytes, the record and its shape's tuple), counted while it is held.
KEPT_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Stored:
    """An entry and its body: bytes, or the key of a body stored as its own value."""

    entry: Entry
    body: bytes | None
    body_key: str | None = None
    # CRC32 of a body stored apart (None: not known, only the size is checked).
    crc: int | None = None


class Kept:
    """What the fast path made of one held :class:`Stored` (``stored``), kept while the
    memory tier holds it (:meth:`HotEntries.kept`): its body's coding (None: not yet
    found), whether its path has a webhook rule under ``rules`` (the rules object it was
    found for: a reload gives a new one, so the flag is found again at once), and its
    answer's head for the last shape asked (``shape_of``: what the head depends on besides
    the entry; ``shape``: the rendered head). Untracked: it holds strings, numbers,
    bytes, tuples of them and the rules (alive anyway)."""

    __slots__ = ("coding", "rules", "shape", "shape_of", "stored", "webhook")

    def __init__(self, stored: Stored) -> None:
        self.stored = stored
        self.coding: str | None = None
        self.rules: object = None
        self.webhook = False
        self.shape_of: tuple[int, str, str, bool, str] | None = None
        self.shape: tuple[bytes, bool] | None = None


class HotEntries:
    """A byte-bounded LRU of stored entries (on the event loop only)."""

    def __init__(self, max_bytes: int, ledger: Ledger | None = None) -> None:
        self.max_bytes = max_bytes
        fit_keys(max_bytes)  # the per-key memos as large as the keys held here
        self.bytes = 0
        # Neither the LRU nor the paths' index is walked by the collector (untracked after each
        # insert, which tracks a dict again): a full pass would visit every entry's key and
        # Stored through them, scattered over the tier's memory (~11 ms for 100,000 entries
        # in a quiet process; its keys, tuples and strings, never lead back to a dict).
        self.items: OrderedDict[str, Stored] = OrderedDict()
        self.ledger = ledger or Ledger()  # each account's share (proxy.cache.shares)
        # (account, normalised path) -> the key held of it, or the keys (several: a set) (what
        # invalidations look through); a lone key is a string, which the collector never walks
        self.paths: dict[tuple[str, str], str | set[str]] = {}
        # key -> what the fast path made of the entry held under it (dropped with it)
        self.made: dict[str, Kept] = {}

    def get(self, key: str) -> Stored | None:
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
            self.ledger.touch(key)
        return found

    def kept(self, key: str, stored: Stored) -> Kept:
        """The fast path's record of ``stored``, held under ``key`` (:meth:`get` just gave
        it): made on the first ask, made again once another entry is held there."""
        made = self.made.get(key)
        if made is None or made.stored is not stored:
            if made is None:
                self.bytes += KEPT_BYTES
            made = self.made[key] = Kept(stored)
            untrack(made)
            untrack(self.made)
            while self.bytes > self.max_bytes:  # the least recently used go, never this key
                oldest = next(iter(self.items))
                if oldest == key:
                    break
                self.pop(oldest)
        return made

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
            self.items[key] = _held(stored)
            untrack(self.items)  # an insert tracks it again
            self._unmade(key)  # made of the old entry
            self.items.move_to_end(key)
            self.ledger.touch(key)
            return
        self.pop(key)
        if stored.body is None:
            return
        size = _cost(key, stored)
        if size > self.max_bytes // 8:
            return
        self.items[key] = _held(stored)
        self.bytes += size
        where = _where(stored)
        known = self.paths.get(where)
        if known is None or known == key:
            self.paths[where] = key
        elif isinstance(known, str):
            self.paths[where] = {known, key}
        else:
            known.add(key)
        untrack(self.items)  # each insert of a Stored (a tuple key) tracks them again
        untrack(self.paths)
        for victim in self.ledger.add(key, stored.entry.account, size):
            self.pop(victim)
        while self.bytes > self.max_bytes:
            self.pop(next(iter(self.items)))

    def pop(self, key: str) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self._unmade(key)
            self.bytes -= _cost(key, old)
            self.ledger.remove(key)
            where = _where(old)
            keys = self.paths.get(where)
            if keys == key:
                del self.paths[where]
            elif isinstance(keys, set):
                keys.discard(key)
                if len(keys) == 1:
                    self.paths[where] = keys.pop()
                    untrack(self.paths)

    def _unmade(self, key: str) -> None:
        if self.made.pop(key, None) is not None:
            self.bytes -= KEPT_BYTES

    def take(self, covers: Callable[[str, str], bool]) -> list[str]:
        """Drop every entry whose (account, normalised path) ``covers`` names; their keys."""
        keys = [key for where in [w for w in self.paths if covers(*w)] for key in self._keys(where)]
        for key in keys:
            self.pop(key)
        return keys

    def _keys(self, where: tuple[str, str]) -> list[str]:
        found = self.paths[where]
        return [found] if isinstance(found, str) else list(found)

    def clear(self) -> None:
        self.items.clear()
        self.paths.clear()
        self.made.clear()
        self.bytes = 0
        self.ledger.clear()


def _held(stored: Stored) -> Stored:
    """``stored``, out of the collector's walk (with its entry) for as long as it is held."""
    untrack(stored.entry)
    untrack(stored)
    return stored


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
