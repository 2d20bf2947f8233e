"""One record per raw request target the fast path accepted (:func:`known`).

A fresh hit needs its target parsed and checked (:func:`~proxy.target.parse_target`), its
route label (:func:`~proxy.edge.middlewares.route_of`) and its cache key
(:func:`~proxy.cache.fastlook.selected_key`). All three follow from the raw target (and, for
the key, the caller's account and selecting headers), so one memo keyed by the raw target
holds them: one lookup a fresh hit, where two memos (the target and route, then the key)
each hashed their own argument tuple.

A :class:`Known` keeps the key last made from it, with the account and selecting values it
was made for: the same target asked by another account, or with other selecting headers, has
its key made again (and kept in place of the other). A refused target raises, so it is never
remembered (the long way words the refusal).

What the memo keeps is out of the collector's walk: the record and its target are
untracked (strings and tuples of strings, no cycle), as :mod:`proxy.memo` keeps its own.

The memo holds as many records as the memory tier holds keys of 8 KB
(:func:`~proxy.memo.fit_keys`, with no ceiling of its own): a record with its key costs
~0.6 KB, a thirteenth of the 8 KB counted for it (so at most ~7.5 % of ``memory_size``
beside the tier), and a key whose record fell out pays ~30 µs on its next fresh hit (its
target parsed and checked, its key made, another record pushed out). Capped at 65,536 as
the other per-key memos are, a tier of 100,000 entries filled in order had its first keys'
records pushed out by the last ones (docs/performance.md, "The cache-size series, part 2").
"""

from __future__ import annotations

from yarl import URL

from proxy.cache.fastlook import selected_key
from proxy.compat.collector import untrack
from proxy.edge.middlewares import route_of
from proxy.memo import memo
from proxy.target import Target, parse_target


class Known:
    """An accepted raw target: its :class:`~proxy.target.Target`, its route label, and the
    cache key last made for it (:meth:`key_for`)."""

    __slots__ = ("account", "key", "route", "selecting", "target")

    def __init__(self, target: Target, route: str) -> None:
        self.target = target
        self.route = route
        self.account: str | None = None
        self.selecting: tuple[str | None, ...] | None = None
        self.key = ""

    def key_for(self, account: str, selecting: tuple[str | None, ...]) -> str:
        """The cache key of this target for ``account`` and the request's selecting
        headers' values (:data:`~proxy.cache.keys.SELECTING`'s order), made once for
        the last pair asked."""
        if account == self.account and selecting == self.selecting:
            return self.key
        target = self.target
        key = selected_key(account, target.path, target.query, selecting)
        untrack(selecting)  # strings and None only
        self.account, self.selecting, self.key = account, selecting, key
        return key


@memo(4096, per_key=True, most=None)
def known(raw: str) -> Known:
    """The record of an accepted raw target (a refusal raises, so it is never remembered).
    Its route label is the one the long way gives (:func:`~proxy.edge.middlewares.route_of`
    of the request's decoded path: the path as aiohttp's parsers decode an origin-form
    target, which :func:`~proxy.target.parse_target` allows no ``#`` in)."""
    target = parse_target(raw)
    untrack(target)
    path = target.path
    if "%" in path:  # decoded as the request's path is (else it is that path already)
        path = URL.build(path=path, encoded=True).path
    record = Known(target, route_of(path))
    untrack(record)
    return record
