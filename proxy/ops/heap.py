"""Python's cyclic garbage collector while serving: start-up's objects frozen out of its way.

Measured (docs/performance.md, "The tail: what sets the proxy's p99"):
a revalidating proxy allocates enough that the collector's full pass (generation 2) runs
every second or two, and each pass walks every object the process holds, the ~64,000 made at
start-up included (the settings, the routes, aiohttp's and prometheus-client's tables):
24-42 ms with nothing answered. At 128 connections one such pause delays 128 requests, about
as many as the slowest 1 % of a 3-second run: the pauses were the whole p99.

:func:`frozen_heap` collects once, then moves every object alive after start-up to the
collector's permanent generation (``gc.freeze()``, as Instagram's Django servers do): those
are still freed by reference counting when dropped, only never walked again, so a full pass
walks what was made since. Reference cycles among frozen objects are not collected while
frozen; on reload (:func:`refreeze`) and when serving stops everything is unfrozen and
collected, so an in-process server (tests, the demo) leaves the collector as it found it.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze() -> int:
    """Collect, then freeze what is left; the number of objects now frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def refreeze() -> int:
    """After a reload: what the old settings left in cycles is collected, the rest frozen
    again with the new settings' objects."""
    gc.unfreeze()
    return freeze()


@contextlib.contextmanager
def frozen_heap() -> Iterator[int]:
    """Serve with start-up's objects frozen (yields how many); unfrozen when it ends."""
    try:
        yield freeze()
    finally:
        gc.unfreeze()
