"""CPython's cyclic garbage collector: an object taken out of its walk (:func:`untrack`).

The collector walks every container it tracks on each full pass (generation 2). The memory
tier holds two such objects per entry (:class:`~proxy.cache.memory.Stored` and its
:class:`~proxy.cache.entry.Entry`, slotted dataclasses: every instance of a class with
``__slots__`` is tracked), so with 100,000 entries a full pass walked ~390,000 objects and
answered nothing for ~390 ms (docs/performance.md, "The tail as the cache grows").
Python has no way to say "never walk this" but the C API's ``PyObject_GC_UnTrack``
(public, meant for a type's own code: hence here), called through ``ctypes.pythonapi``.

Untracking is safe for an object that cannot be part of a reference cycle (what it holds
can never lead back to it: numbers, strings, bytes, tuples of them, other such objects).
The collector then counts it as a root for what it holds: what it holds is never freed
wrongly, and no cycle goes through it to be missed. It is still freed by reference counting
(a slotted instance's dealloc untracks again: ``PyObject_GC_UnTrack`` may be called twice,
CPython's trashcan needs that). Where ``ctypes.pythonapi`` is missing (not CPython),
:func:`untrack` does nothing: the objects are walked as before.

:data:`PINS` lists the assumptions; ``tests/unit/test_compat.py`` checks each and names
:data:`WRITTEN_AGAINST` (the Python minor version) when one fails after an upgrade.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

WRITTEN_AGAINST = "3.11"


def _untracker() -> Callable[[object], None] | None:
    try:
        import ctypes

        function = ctypes.pythonapi.PyObject_GC_UnTrack
    except (ImportError, AttributeError):  # not CPython: nothing to call
        return None
    function.argtypes = [ctypes.py_object]
    function.restype = None
    return function


_UNTRACK = _untracker()


def untrack(value: object) -> None:
    """Take ``value`` (which must hold no reference cycle) out of the collector's walk."""
    if _UNTRACK is not None and gc.is_tracked(value):
        _UNTRACK(value)


@dataclass(frozen=True, slots=True)
class _Probe:
    text: str
    items: tuple[tuple[str, str], ...]


def _untracks() -> bool:
    probe = _Probe("x", (("a", "b"),))
    untrack(probe)
    return gc.is_tracked(_Probe("y", ())) and not gc.is_tracked(probe)


def _frees_once_untracked() -> bool:
    """An untracked object is freed by reference counting (a second untrack in its dealloc
    is harmless) and the collector still runs and frees cycles beside it."""
    import weakref

    class Node:
        __slots__ = ("__weakref__", "other")

        other: object

    for _ in range(1000):
        untrack(_Probe("z", (("c", "d"),)))  # made, untracked, freed at once
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle only the collector frees
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    return gone() is None


PINS: dict[str, Callable[[], bool]] = {
    "ctypes.pythonapi.PyObject_GC_UnTrack untracks a slotted instance": _untracks,
    "an untracked instance is freed, and the collector still frees cycles": _frees_once_untracked,
}
