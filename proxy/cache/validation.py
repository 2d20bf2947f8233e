"""Validation (RFC 9111 4.3): the validators a revalidation sends, what the upstream's
answer means (:func:`answered`: a 304 merged into the stored response by :func:`merge_304`,
an error, a body to take), and the caller's own conditionals (:func:`not_modified`: RFC 9110
13.1.2, 13.1.3). Pure: no I/O, every function takes its times."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from proxy.cache.entry import Entry
from proxy.cache.fields import HeaderItems, Headers, age_value, directives, field_values, values_of
from proxy.cache.storable import UNSTORED_HEADERS, reuse_windows, rule_for, storable_headers
from proxy.dates import http_date
from proxy.memo import memoise
from proxy.settings import CacheRule

# Upstream answers for which a stored response may be served instead (RFC 5861 4).
ERROR_STATUSES = frozenset({429, 500, 502, 503, 504})
# RFC 9111 3.2: not updated from a 304 (framing and coding are the stored body's own).
# Content-Type is updated like any other field (cache-tests update304 checks it).
NOT_UPDATED_BY_304 = UNSTORED_HEADERS | {"content-range", "etag", "content-encoding"}
# RFC 9110 15.4.5: what a 304 carries.
NOT_MODIFIED_HEADERS = (
    "ETag",
    "Last-Modified",
    "Cache-Control",
    "Expires",
    "Date",
    "Vary",
    "Content-Location",
    "X-Next-Page",
    "X-Pages",
)
# Caller headers the cache answers itself (RFC 9110 13.1.2, 13.1.3).
CALLER_CONDITIONALS = ("If-None-Match", "If-Modified-Since")


def validators(entry: Entry) -> dict[str, str]:
    """Headers for revalidating a stored response (RFC 9111 4.3.1)."""
    out: dict[str, str] = {}
    if entry.etag is not None:
        out["If-None-Match"] = entry.etag
    if entry.last_modified is not None:
        out["If-Modified-Since"] = entry.last_modified
    return out


def merge_304(
    entry: Entry,
    headers: Sequence[tuple[str, str]],
    request_time: float,
    response_time: float,
    rules: Sequence[CacheRule],
) -> Entry | None:
    """Freshen a stored response with a 304 (RFC 9111 4.3.4, 3.2); None: it does not match.

    A 304 whose strong ETag differs from the stored one selects nothing, so the caller
    must fetch the full response.

    What depends on the headers alone (the match, the merged fields, how long they may be
    reused) is remembered (:func:`_merged_304`): a revalidated key gets the same 304 over
    and over, its Date changing once a second, and the stored headers it merges into are
    the previous merge's.
    """
    if not isinstance(headers, tuple) or not isinstance(rules, tuple):
        merged = _merge_304(entry.headers, tuple(headers), entry.path, tuple(rules))
    else:
        merged = _merged_304(entry.headers, headers, entry.path, rules)
    if merged is None:
        return None
    fields, reuse = merged
    # An Expires without a Date counts from the response time: not remembered.
    r = reuse or reuse_windows(_cc(fields), fields, response_time, rule_for(entry.path, rules))
    return Entry(  # dataclasses.replace, without its look at every field
        entry.status, fields, entry.account, entry.path, request_time, response_time,
        # The freshened response is as old as the 304 (its own Date and Age), not as the
        # stored Date, which a 304 without Date would otherwise leave in place.
        _initial_age(headers, request_time, response_time),
        r["fresh_for"], r["stale_if_error"], r["stale_while_revalidate"], r["strict"],
        entry.vary, entry.size,
    )  # fmt: skip


# The freshened fields and their reuse (None: it depends on the response time), or None: the
# 304 does not match. What merge_304 derives from headers only, remembered.
Merged304 = tuple[HeaderItems, dict[str, Any] | None] | None


def _merge_304(
    stored: HeaderItems, headers: HeaderItems, path: str, rules: tuple[CacheRule, ...]
) -> Merged304:
    new_tag = next(iter(values_of(headers, "ETag")), None)
    old_tag = next(iter(values_of(stored, "ETag")), None)
    if new_tag is not None and old_tag is not None and not weak_match(new_tag, old_tag):
        return None
    updates = [(k, v) for k, v in storable_headers(headers) if k.lower() not in NOT_UPDATED_BY_304]
    replaced = {k.lower() for k, _ in updates}
    merged = tuple((k, v) for k, v in stored if k.lower() not in replaced) + tuple(updates)
    cc = _cc(merged)
    dated = http_date(next(iter(values_of(merged, "Date")), None)) is not None
    if "max-age" not in cc and values_of(merged, "Expires") and not dated:
        return merged, None
    return merged, reuse_windows(cc, merged, 0.0, rule_for(path, rules))


_merged_304 = memoise(_merge_304, 1024)


def _cc(headers: HeaderItems) -> dict[str, str | None]:
    return directives(values_of(headers, "Cache-Control"))


def _initial_age(headers: Sequence[tuple[str, str]], request_time: float, now: float) -> float:
    """:func:`~proxy.cache.storable.initial_age` with the Date parsed once per value (a 304's
    Date changes once a second)."""
    first: str | None = None
    ages: list[str] = []
    for name, value in headers:  # one pass for both fields
        lower = name.lower()
        if lower == "date":
            first = value if first is None else first
        elif lower == "age":
            ages.append(value)
    date = _date_of(first)
    apparent = max(0.0, now - date) if date is not None else 0.0
    age = (age_value(ages) or 0.0) if ages else 0.0
    return max(apparent, age + max(0.0, now - request_time))


_date_of = functools.lru_cache(maxsize=64)(http_date)


# --------------------------------------------------------------------------- upstream answers


@dataclass(frozen=True, slots=True)
class Freshened:
    """A 304 for the stored response: answer it with refreshed headers (RFC 9111 4.3.4)."""

    entry: Entry


@dataclass(frozen=True, slots=True)
class Refetch:
    """A 304 that selects another representation: fetch without validators."""


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """An error answer (429, 5xx): passed on, never stored; a stored response may stand in."""


@dataclass(frozen=True, slots=True)
class TakeBody:
    """A full answer to read (and store if it may be). ``forget`` drops what was stored:
    404 and 410 say the resource is gone (RFC 9111 4.4)."""

    forget: bool


Answered = Freshened | Refetch | UpstreamFailed | TakeBody


def answered(
    stored: Entry | None,
    status: int,
    headers: Sequence[tuple[str, str]],
    request_time: float,
    response_time: float,
    rules: Sequence[CacheRule],
) -> Answered:
    """What to do with the upstream's answer to a fetch or a revalidation of ``stored``."""
    if status == 304 and stored is not None:
        merged = merge_304(stored, headers, request_time, response_time, rules)
        return Refetch() if merged is None else Freshened(merged)
    if status in ERROR_STATUSES:
        return UpstreamFailed()
    return TakeBody(forget=stored is not None and status in (404, 410))


# --------------------------------------------------------------------------- caller conditionals


# An entity-tag (RFC 9110 8.8.3) or "*"; a comma may sit inside the quotes.
ENTITY_TAG = re.compile(r'\*|(?:W/)?"[^"]*"')


def _tags(values: Sequence[str]) -> list[str]:
    return [m.group(0) for value in values for m in ENTITY_TAG.finditer(value)]


def weak_match(a: str, b: str) -> bool:
    """RFC 9110 8.8.3.2 weak comparison."""
    return a.removeprefix("W/") == b.removeprefix("W/")


def not_modified(
    status: int, stored: Sequence[tuple[str, str]], headers: Headers, exists: bool = True
) -> bool:
    """Whether the caller's own conditionals make this answer a 304 (RFC 9110 13.1.2, 13.1.3,
    13.2.2: If-None-Match wins over If-Modified-Since)."""
    if not 200 <= status < 300:
        return False  # RFC 9110 13.2.1: conditionals apply to 2xx answers only
    inm = field_values(headers, "If-None-Match")
    if inm:
        etag = _etag(stored) if isinstance(stored, tuple) else _first_etag(stored)
        if len(inm) == 1 and len(inm[0]) <= MEMO_TAGS:
            return _line_matches(inm[0], etag, exists)
        return _tags_match(_tags(inm), etag, exists)
    ims = http_date(next(iter(field_values(headers, "If-Modified-Since")), None))
    if ims is None:
        return False  # absent or not a valid HTTP-date: ignored (RFC 9110 13.1.3)
    # RFC 9111 4.3.2: without Last-Modified, the stored Date stands in for it.
    modified = http_date(
        next(iter(values_of(stored, "Last-Modified") or values_of(stored, "Date")), None)
    )
    return modified is not None and modified <= ims


def _first_etag(stored: Sequence[tuple[str, str]]) -> str | None:
    return next(iter(values_of(stored, "ETag")), None)


_T = TypeVar("_T")


class Last(Generic[_T]):
    """The value found for the last stored header tuple asked about, known by identity: an
    entry's answers (a fresh hit's, a flight's joiners') all carry the one tuple, and an
    lru_cache would hash all of it on every call. The tuple is held, so its id is not
    reused while it is remembered."""

    __slots__ = ("find", "last")

    def __init__(self, find: Callable[[HeaderItems], _T]) -> None:
        self.find = find
        self.last: tuple[HeaderItems, _T] | None = None

    def __call__(self, stored: HeaderItems) -> _T:
        last = self.last  # one read: a (tuple, value) pair is replaced whole
        if last is not None and last[0] is stored:
            return last[1]
        value = self.find(stored)
        self.last = (stored, value)
        return value


# Per stored header set (an entry's, the same tuple for every answer from it): its ETag and
# the headers its 304s carry, found once. Bounded like the other per-entry memos.
_etag_memo = functools.lru_cache(maxsize=1024)(_first_etag)
_etag = Last(_etag_memo)


# An If-None-Match line longer than this is parsed each time, never remembered.
MEMO_TAGS = 256


def _tags_match(tags: Sequence[str], etag: str | None, exists: bool) -> bool:
    """Whether If-None-Match's entity tags match (RFC 9110 13.1.2: weak comparison)."""
    if "*" in tags:
        return exists
    return etag is not None and any(weak_match(t, etag) for t in tags)


@functools.lru_cache(maxsize=1024)
def _line_matches(line: str, etag: str | None, exists: bool) -> bool:
    """:func:`_tags_match` for one If-None-Match line, remembered: most callers repeat the
    one ETag they hold, and an entry's ETag is the same for all its answers."""
    return _tags_match(_tags((line,)), etag, exists)


_NOT_MODIFIED = frozenset(n.lower() for n in NOT_MODIFIED_HEADERS)


def not_modified_headers(stored: Sequence[tuple[str, str]]) -> HeaderItems:
    """The stored headers a 304 carries (RFC 9110 15.4.5)."""
    if isinstance(stored, tuple):
        return _last_not_modified(stored)
    return tuple((k, v) for k, v in stored if k.lower() in _NOT_MODIFIED)


@functools.lru_cache(maxsize=1024)
def _not_modified_headers(stored: HeaderItems) -> HeaderItems:
    return tuple((k, v) for k, v in stored if k.lower() in _NOT_MODIFIED)


_last_not_modified = Last(_not_modified_headers)
