"""What to do with what is stored for a request (RFC 9111 4, 4.2, 4.3.1; RFC 5861), as small
frozen decisions the driver (:mod:`proxy.cache.layer`) matches on::

    bypass(...)  -> Bypass | None
    lookup(...)  -> FreshHit | ServeStale | Revalidate | Miss | OnlyIfCachedMiss
    stale_on_error(...) -> bool
    stale_while_busy(...) -> BusyStale | NotBusyStale

Pure: no I/O, no clock of its own (every function takes ``now``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from proxy.cache.entry import Entry
from proxy.cache.fields import Headers, RequestControl, directives, values_of

# Caller headers the cache does not evaluate: such requests go through untouched.
UNHANDLED_CONDITIONALS = ("If-Match", "If-Unmodified-Since", "If-Range", "Range")


BypassCode = Literal["method", "no_store", "conditional"]


@dataclass(frozen=True, slots=True)
class Bypass:
    """The cache stays out: neither looked up nor stored. ``code`` labels the lookup metric."""

    code: BypassCode
    reason: str


@dataclass(frozen=True, slots=True)
class FreshHit:
    entry: Entry
    age: float


@dataclass(frozen=True, slots=True)
class ServeStale:
    """Answer the stale entry now (RFC 5861 3 stale-while-revalidate, or max-stale)."""

    entry: Entry
    age: float
    refresh: bool  # start one background revalidation


@dataclass(frozen=True, slots=True)
class Revalidate:
    entry: Entry


@dataclass(frozen=True, slots=True)
class Miss:
    # A stored response that cannot be used now but may answer if the upstream fails.
    stale: Entry | None = None


@dataclass(frozen=True, slots=True)
class OnlyIfCachedMiss:
    """RFC 9111 5.2.1.7: nothing usable stored; answer 504."""


Decision = FreshHit | ServeStale | Revalidate | Miss | OnlyIfCachedMiss


def bypass(method: str, headers: Headers, control: RequestControl) -> Bypass | None:
    """Requests the cache does not handle at all."""
    if method not in ("GET", "HEAD"):
        return Bypass("method", f"method {method}")
    if control.no_store:
        return Bypass("no_store", "request no-store")
    for name in UNHANDLED_CONDITIONALS:
        if name in headers:
            return Bypass("conditional", f"request has {name}")
    return None


def fresh_age(entry: Entry, now: float) -> float | None:
    """The age of a stored response that is still fresh (RFC 9111 4.2), else None.

    What :func:`lookup` decides for a request without Cache-Control whose Vary values the
    entry matches, in one step, for the fast path (:mod:`proxy.edge.fast`).
    """
    age = entry.initial_age + max(0.0, now - entry.response_time)
    return age if entry.fresh_for - age > 0 else None


def lookup(entry: Entry | None, headers: Headers, control: RequestControl, now: float) -> Decision:
    """What to do with what is stored (RFC 9111 4, 4.2, 4.3; RFC 5861)."""
    if entry is None or not entry.selects(headers):
        return OnlyIfCachedMiss() if control.only_if_cached else Miss()
    age = entry.age(now)
    left = entry.fresh_for - age
    if not control.no_cache and _fresh_enough(left, age, control):
        return FreshHit(entry, age)
    if left <= 0 and not control.no_cache and not entry.strict and control.max_age is None:
        if control.max_stale is not None and -left <= control.max_stale:
            return ServeStale(entry, age, refresh=False)  # RFC 9111 5.2.1.2
        swr = entry.stale_while_revalidate
        if swr > 0 and -left <= swr and not control.only_if_cached:
            return ServeStale(entry, age, refresh=True)
    if control.only_if_cached:
        return OnlyIfCachedMiss()
    if entry.etag is not None or entry.last_modified is not None:
        return Revalidate(entry)
    return Miss(stale=entry)


def _fresh_enough(left: float, age: float, control: RequestControl) -> bool:
    if left <= 0:
        return False
    if control.max_age is not None and age > control.max_age:
        return False  # RFC 9111 5.2.1.1
    return control.min_fresh is None or left >= control.min_fresh  # 5.2.1.3


def stale_on_error(
    entry: Entry | None, now: float, *, unreachable: bool = False, default: float = 0.0
) -> bool:
    """May this entry answer when the upstream fails (RFC 9111 4.2.4, RFC 5861 4)?

    Two windows past freshness:

    - the response's own ``stale-if-error`` or its cache rule's ``stale_if_error``: for any
      failure (the upstream unreachable, a 5xx or 429 answer, the rate budget exhausted);
    - ``default`` (``cache.stale_if_error``): only when the origin could not be reached at
      all (``unreachable``: refused, reset, timed out, or the breaker failing fast), for
      entries that name no window of their own. An explicit window wins where set, smaller
      or larger; a response's ``stale-if-error=0`` is explicit too.

    Never for an entry that must be revalidated once stale (``no-cache``,
    ``must-revalidate``, ``proxy-revalidate``, ``s-maxage``:
    :data:`~proxy.cache.storable.STRICT_DIRECTIVES`).
    """
    if entry is None or entry.strict:
        return False
    window = entry.stale_if_error
    if unreachable and not _explicit_stale_if_error(entry):
        window = default
    return entry.staleness(now) <= window


# Why a stored response does not answer at once while the budget is busy (the lookup
# metric's and the debug line's reason; "busy" when it does).
NotBusyStale = Literal[
    "off", "fresh", "strict", "no_cache", "max_age", "min_fresh", "max_stale", "too_stale",
    "not_busy",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class BusyStale:
    """Answer the stale entry now: the account's budget is busy (stale-while-busy). A
    revalidation follows at batch priority."""

    entry: Entry
    age: float


def stale_while_busy(
    entry: Entry,
    control: RequestControl,
    now: float,
    *,
    window: float,
    wait: Callable[[], float],
    busy_after: float,
) -> BusyStale | NotBusyStale:
    """Whether a stale stored response answers a GET at once because the request would wait
    ``wait()`` seconds for a budget token, more than ``busy_after``: only within ``window``
    seconds past its freshness (``cache.stale_while_busy`` or its rule's; 0: off). ``wait``
    is asked last, only when all else allows (an estimate with a cost, no I/O).

    Never for an entry that must be revalidated once stale (``no-cache``, ``must-revalidate``,
    ``proxy-revalidate``, ``s-maxage``: :data:`~proxy.cache.storable.STRICT_DIRECTIVES`), nor
    for a caller who asks for validation (``no-cache``, ``max-age``: RFC 9111 5.2.1.1,
    5.2.1.4) or for freshness (``min-fresh``, 5.2.1.3). A caller's ``max-stale=N`` bounds the
    staleness further (5.2.1.2; ``max-stale=0`` opts out); a bare ``max-stale`` leaves the
    window as it is (the proxy's bound holds: RFC 9111 4.2.4 lets a cache serve stale only
    where allowed).
    """
    if window <= 0:
        return "off"
    staleness = entry.staleness(now)
    if staleness <= 0:
        return "fresh"
    if entry.strict:
        return "strict"
    if control.no_cache:
        return "no_cache"
    if control.max_age is not None:
        return "max_age"
    if control.min_fresh is not None:
        return "min_fresh"
    if control.max_stale is not None and staleness > control.max_stale:
        return "max_stale"
    if staleness > window:
        return "too_stale"
    if wait() <= busy_after:
        return "not_busy"
    return BusyStale(entry, entry.age(now))


def _explicit_stale_if_error(entry: Entry) -> bool:
    if entry.stale_if_error > 0:
        return True
    return "stale-if-error" in directives(values_of(entry.headers, "Cache-Control"))
