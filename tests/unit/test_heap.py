"""Start-up's objects frozen out of the collector's full passes while serving (proxy.ops.heap)."""

from __future__ import annotations

import gc
import weakref

from proxy.ops import heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """A reference cycle nobody holds: only the cyclic collector frees it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_frozen_heap_collects_first_freezes_the_rest_and_unfreezes_after() -> None:
    alive = Node()  # held: frozen, not freed
    garbage = cycle()
    with heap.frozen_heap() as frozen:
        assert garbage() is None  # collected before the freeze, not frozen for good
        assert frozen > 0
        assert gc.get_freeze_count() > 0
        assert gc.is_tracked(alive)
        assert all(o is not alive for o in gc.get_objects())  # no longer walked
    assert gc.get_freeze_count() == 0
    assert any(o is alive for o in gc.get_objects(generation=2))


def test_refreeze_collects_the_frozen_cycles_a_reload_left_behind() -> None:
    with heap.frozen_heap():
        node = Node()
        node.other = node  # held while the old settings are in use
        old = weakref.ref(node)
        heap.refreeze()  # a reload froze it with the rest
        del node  # the next reload drops it: a cycle nobody holds
        gc.collect()
        assert old() is not None  # frozen: the collector does not see it
        heap.refreeze()
        assert old() is None
        assert gc.get_freeze_count() > 0
