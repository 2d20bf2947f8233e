"""A bounded memo whose entries the cyclic garbage collector never walks (:func:`memo`).

``functools.lru_cache`` keeps each call's arguments as its key: a tuple. CPython takes a
tuple out of the collector's walk only when none of its items can be tracked, and an
instance of any class (a settings dataclass, a ``Place``, a URL) always can, so a memo keyed
by a tuple holding one (the cache rules, the answers' ``Place``) kept every key walked by
every full pass, and a memo returning a tuple that holds one (a ``Target``) kept every value
walked too: with a few memos at their bounds, ~45,000 objects and ~40 ms a full pass
(docs/performance.md, "The memos out of the collector's walk").

:func:`memoise` makes ``lru_cache``'s like for functions of hashable positional arguments
whose arguments and results hold no reference cycle (settings, strings, numbers, tuples of
them): each key and result it keeps, and its store, are untracked
(:func:`~proxy.compat.collector.untrack`); what they hold stays alive by reference counting
and is walked (if at all) by itself. The least recently used entry goes past ``size``.

A hit costs a Python call (``lru_cache``'s is C), so it does as little as it can: the
arguments are hashed once (the store is keyed by that hash, a second dict holding each
hash's arguments, compared on a hit: a tuple's hash is not cached, and a rendered head's key
hashes every stored header; an OrderedDict's ``get`` and ``move_to_end`` each hashed it),
and a function of one argument is called without packing it in a tuple. Two arguments of
one hash (rare: 64 bits) share its slot, the later one replacing the other. A miss untracks
the arguments and the result (each a C call through ctypes, ~0.3 µs) and nothing else: both
dicts, keyed by ints and holding untracked objects, are never tracked again.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar, cast

from proxy.compat.collector import untrack

R = TypeVar("R")
_MISSING: Any = object()
R_co = TypeVar("R_co", covariant=True)
# Memos with an entry per cache key the fast path answers (its target, key, head): sized to
# the keys the memory tier can hold (:func:`fit_keys`), ~1.4 KB an entry between them; each
# with the most entries it grows to (None: as many as the tier's keys).
PER_KEY: list[tuple[Memo[Any], int | None]] = []
KEY_BYTES = 8192  # a stored answer's size, as the memory tier's keys are counted
MOST_KEYS = 65_536  # ~90 MB of memos at most (but those with no ceiling of their own)


class MemoInfo(NamedTuple):
    """As ``functools.lru_cache``'s ``cache_info()``."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class Memo(Protocol[R_co]):
    """A function remembered by :func:`memoise` (see the module)."""

    @property
    def __wrapped__(self) -> Callable[..., R_co]: ...

    @property
    def size(self) -> int:
        """The entries it holds at most."""

    def __call__(self, *args: Any) -> R_co: ...

    def grow(self, size: int) -> None:
        """Hold up to ``size`` entries from now on (never fewer than before)."""

    def cache_info(self) -> MemoInfo: ...

    def cache_clear(self) -> None: ...


def memoise(function: Callable[..., R], size: int) -> Memo[R]:
    """``function`` remembered for the last ``size`` argument tuples (see the module)."""
    store: OrderedDict[int, R] = OrderedDict()  # the arguments' hash -> the result
    keys: dict[int, Any] = {}  # the arguments' hash -> the arguments
    untrack(store)
    get, to_end = store.get, store.move_to_end
    hits = misses = 0
    bound = size

    def keep(hashed: int, key: Any, value: R) -> R:
        if store.pop(hashed, _MISSING) is _MISSING and len(store) >= bound:
            del keys[store.popitem(last=False)[0]]
        untrack(key)
        untrack(value)
        keys[hashed] = key  # int keys, untracked values: neither dict is tracked again
        store[hashed] = value
        untrack(store)
        return value

    # ``one`` and ``many`` are the same but for packing the arguments: kept apart on purpose
    # (one shared for both would cost each hit another Python call, what this saves).
    def one(arg: Any) -> R:
        nonlocal hits, misses
        hashed = hash(arg)
        found = get(hashed, _MISSING)
        if found is not _MISSING and keys[hashed] == arg:
            hits += 1
            to_end(hashed)
            return found  # type: ignore[no-any-return]
        misses += 1
        return keep(hashed, arg, function(arg))  # a raise is not remembered

    def many(*args: Any) -> R:
        nonlocal hits, misses
        hashed = hash(args)
        found = get(hashed, _MISSING)
        if found is not _MISSING and keys[hashed] == args:
            hits += 1
            to_end(hashed)
            return found  # type: ignore[no-any-return]
        misses += 1
        return keep(hashed, args, function(*args))  # a raise is not remembered

    def grow(size: int) -> None:
        nonlocal bound
        bound = shown["size"] = max(bound, size)

    def cache_info() -> MemoInfo:
        return MemoInfo(hits, misses, bound, len(store))

    def cache_clear() -> None:
        nonlocal hits, misses
        store.clear()
        keys.clear()
        hits = misses = 0

    made = functools.update_wrapper(one if _one_argument(function) else many, function)
    shown = vars(made)
    shown.update(size=bound, grow=grow, cache_info=cache_info, cache_clear=cache_clear)
    return cast(Memo[R], made)


def _one_argument(function: Callable[..., Any]) -> bool:
    """Whether ``function`` takes exactly one positional argument."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # no signature to read: called as any
        return False
    return len(parameters) == 1 and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


def memo(
    size: int, per_key: bool = False, most: int | None = MOST_KEYS
) -> Callable[[Callable[..., R]], Memo[R]]:
    """A decorator: ``@memo(4096)`` as ``@functools.lru_cache(maxsize=4096)`` (see
    :func:`memoise`); ``per_key``: one of :data:`PER_KEY`, grown to ``most`` entries at most
    (None: to every key the memory tier holds, for a memo whose entry costs a small part of
    the entry it stands for)."""

    def wrap(function: Callable[..., R]) -> Memo[R]:
        made = memoise(function, size)
        if per_key:
            PER_KEY.append((made, most))
        return made

    return wrap


def fit_keys(memory_size: int) -> None:
    """The :data:`PER_KEY` memos grown to the keys a memory tier of ``memory_size`` bytes
    holds (entries of :data:`KEY_BYTES`; at most each memo's own ceiling, :data:`MOST_KEYS`
    unless it has none). Smaller than the keys asked over and over, every answer of a key
    that fell out paid for it again: fresh hits over 5,000 keys ran at 0.6 of the rate over
    500, and first touches at 100,000 keys re-parsed their targets (docs/performance.md)."""
    keys = memory_size // KEY_BYTES
    for each, most in PER_KEY:
        each.grow(keys if most is None else min(most, keys))
