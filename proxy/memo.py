"""A bounded memo whose entries the cyclic garbage collector never walks (:func:`memo`).

``functools.lru_cache`` keeps each call's arguments as its key: a tuple. CPython takes a
tuple out of the collector's walk only when none of its items can be tracked, and an
instance of any class (a settings dataclass, a ``Place``, a URL) always can, so a memo keyed
by a tuple holding one (the cache rules, the answers' ``Place``) kept every key walked by
every full pass, and a memo returning a tuple that holds one (a ``Target``) kept every value
walked too: with a few memos at their bounds, ~45,000 objects and ~40 ms a full pass
(docs/performance.md, "The memos out of the collector's walk").

:class:`Memo` is ``lru_cache`` for functions of hashable positional arguments whose
arguments and results hold no reference cycle (settings, strings, numbers, tuples of them):
each key and result it keeps, and its store, are untracked
(:func:`~proxy.compat.collector.untrack`); what they hold stays alive by reference counting
and is walked (if at all) by itself. The least recently used entry goes past ``size``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

from proxy.compat.collector import untrack

R = TypeVar("R")
_MISSING: Any = object()
# Memos with an entry per cache key the fast path answers (its target, key, head): sized to
# the keys the memory tier can hold (:func:`fit_keys`), ~1.4 KB an entry between them.
PER_KEY: list[Memo[Any]] = []
KEY_BYTES = 8192  # a stored answer's size, as the memory tier's keys are counted
MOST_KEYS = 65_536  # ~90 MB of memos at most


class MemoInfo(NamedTuple):
    """As ``functools.lru_cache``'s ``cache_info()``."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class Memo(Generic[R]):
    """``function`` remembered for the last ``size`` argument tuples (see the module)."""

    __slots__ = ("__wrapped__", "_store", "hits", "misses", "size")

    def __init__(self, function: Callable[..., R], size: int) -> None:
        self.__wrapped__ = function
        self.size = size
        self._store: OrderedDict[tuple[Any, ...], R] = OrderedDict()
        untrack(self._store)
        self.hits = self.misses = 0

    def __call__(self, *args: Any) -> R:
        store = self._store
        found = store.get(args, _MISSING)
        if found is not _MISSING:
            self.hits += 1
            store.move_to_end(args)
            return found  # type: ignore[no-any-return]
        self.misses += 1
        value = self.__wrapped__(*args)  # a raise is not remembered
        if len(store) >= self.size:
            store.popitem(last=False)
        store[args] = value
        untrack(args)
        untrack(value)
        untrack(store)  # an insert of an object that may be tracked tracks a dict again
        return value

    def grow(self, size: int) -> None:
        """Hold up to ``size`` entries from now on (never fewer than before)."""
        self.size = max(self.size, size)

    def cache_info(self) -> MemoInfo:
        return MemoInfo(self.hits, self.misses, self.size, len(self._store))

    def cache_clear(self) -> None:
        self._store.clear()
        self.hits = self.misses = 0


def memo(size: int, per_key: bool = False) -> Callable[[Callable[..., R]], Memo[R]]:
    """A decorator: ``@memo(4096)`` as ``@functools.lru_cache(maxsize=4096)`` (see
    :class:`Memo`); ``per_key``: one of :data:`PER_KEY`."""

    def wrap(function: Callable[..., R]) -> Memo[R]:
        made = Memo(function, size)
        if per_key:
            PER_KEY.append(made)
        return made

    return wrap


def fit_keys(memory_size: int) -> None:
    """The :data:`PER_KEY` memos grown to the keys a memory tier of ``memory_size`` bytes
    holds (entries of :data:`KEY_BYTES`; at most :data:`MOST_KEYS`). Smaller than the keys
    asked over and over, every answer of a key that fell out paid for it again: fresh hits
    over 5,000 keys ran at 0.6 of the rate over 500 (docs/performance.md)."""
    keys = min(MOST_KEYS, memory_size // KEY_BYTES)
    for each in PER_KEY:
        each.grow(keys)
