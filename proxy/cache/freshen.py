"""How often a 304 from Kounta reaches the disk: at most once a second per key.

A revalidated entry whose upstream answers 304 keeps its body; only its headers and freshness
change. The memory tier takes every such change at once (every answer reads it from there);
the disk record is rewritten at most once per :data:`FRESHEN_EVERY` seconds per key, so a key
revalidated on every request (no cache rule) does not rewrite its record a hundred times a
second. Nor is it rewritten while the disk's queued writes are behind
(:data:`~proxy.cache.store.WRITES_BEHIND`): 304s of many keys can come faster than the disk
takes them. A record the disk did not get is older in freshness, which only makes it
revalidate sooner (never served stale), and an entry that is not in the memory tier is always
written through.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

FRESHEN_EVERY = 1.0


class Throttle:
    """Which keys were written to disk within the last ``every`` seconds."""

    def __init__(self, every: float = FRESHEN_EVERY, clock: Callable[[], float] = time.monotonic):
        self.every = every
        self.clock = clock
        self.written: OrderedDict[str, float] = OrderedDict()  # oldest first

    def due(self, key: str) -> bool:
        """Whether ``key`` may be written now; if so, it counts as written from now."""
        now = self.clock()
        written = self.written
        while written and next(iter(written.values())) <= now - self.every:
            written.popitem(last=False)
        if key in written:
            return False
        written[key] = now
        return True
