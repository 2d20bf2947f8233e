"""Whether a response is stored, and for how long it may be reused (RFC 9111 3, 4.2):
:func:`to_entry` gives an :class:`~proxy.cache.entry.Entry` or why not
(:class:`NotStorable`). The cache is *private* (RFC 9111 1, 3.5): each account has its own
entries, so ``private`` responses may be stored and ``s-maxage`` is ignored. Pure: no I/O,
every function takes its times."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

from proxy.cache.entry import Entry
from proxy.cache.fields import (
    HeaderItems,
    Headers,
    RequestControl,
    age_value,
    directives,
    seconds,
    values_of,
)
from proxy.cache.invalidation import normalise_path
from proxy.cache.keys import vary_names, vary_value
from proxy.coding import GZIP, IDENTITY, coding_of
from proxy.dates import http_date
from proxy.headers import HOP_BY_HOP, RESPONSE_DROPPED, connection_named
from proxy.settings import CacheRule

# Statuses a cache may store without explicit freshness (RFC 9110 15.1 "heuristically cacheable").
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Never stored with an entry (RFC 9111 3.1: hop-by-hop; the rest is recomputed per answer).
# Content-Encoding is kept: the stored body is the representation as sent (gzip stays gzip).
UNSTORED_HEADERS = (HOP_BY_HOP | RESPONSE_DROPPED | {"age", "x-request-id"}) - {"content-encoding"}


NotStorableCode = Literal[
    "request_no_store",
    "not_final",
    "no_store",
    "set_cookie",
    "vary_star",
    "unknown_coding",
    "truncated",
    "too_large",
    "no_explicit_freshness",
    "nothing_to_reuse",
]


@dataclass(frozen=True, slots=True)
class NotStorable:
    """Why a response is not stored: ``code`` for labels and logs, ``reason`` for people."""

    code: NotStorableCode
    reason: str


def rule_for(path: str, rules: Sequence[CacheRule]) -> CacheRule | None:
    """The first operator rule whose glob matches the path (with or without ``.json``)."""
    bare = normalise_path(path)
    for rule in rules:
        if fnmatchcase(bare, rule.path) or fnmatchcase(path, rule.path):
            return rule
    return None


def storable_headers(headers: Sequence[tuple[str, str]]) -> HeaderItems:
    """The fields stored with a response (RFC 9111 3.1): not the hop-by-hop ones, which
    include every field the ``Connection`` header names (RFC 9110 7.6.1), nor the ones
    recomputed for each answer. The stored ``Connection`` itself is dropped, so a field it
    named would otherwise reach every later caller of a hit."""
    named = connection_named(headers)
    return tuple(
        (k, v) for k, v in headers if k.lower() not in UNSTORED_HEADERS and k.lower() not in named
    )


def to_entry(
    *,
    account: str,
    path: str,
    request_headers: Headers,
    request_control: RequestControl,
    status: int,
    headers: Sequence[tuple[str, str]],
    size: int,
    whole: bool,
    max_size: int,
    request_time: float,
    response_time: float,
    rules: Sequence[CacheRule],
) -> Entry | NotStorable:
    """Whether a GET response may be stored (RFC 9111 3) and, if so, its entry."""
    cc = directives(values_of(headers, "Cache-Control"))
    names = vary_names(headers)
    refused = _unstorable(status, cc, headers, request_control, names, whole, size, max_size)
    if refused is not None:
        return refused
    assert names is not None
    explicit = freshness_lifetime(cc, headers, response_time) is not None
    has_validator = bool(values_of(headers, "ETag") or values_of(headers, "Last-Modified"))
    reuse = reuse_windows(cc, headers, response_time, rule_for(path, rules))
    entry = Entry(
        status=status,
        headers=storable_headers(headers),
        account=account,
        path=path,
        request_time=request_time,
        response_time=response_time,
        initial_age=initial_age(headers, request_time, response_time),
        **reuse,
        vary=tuple((n, vary_value(request_headers, n)) for n in names),
        size=size,
    )
    if status not in HEURISTIC_STATUSES and not explicit:
        return NotStorable("no_explicit_freshness", f"status {status} without explicit freshness")
    if not (has_validator or entry.fresh_for > 0 or entry.stale_if_error > 0):
        return NotStorable("nothing_to_reuse", "no validator and no freshness: nothing to reuse")
    if status != 200 and not (has_validator or explicit):
        return NotStorable(
            "no_explicit_freshness", f"status {status} without validator or explicit freshness"
        )
    return entry


# Directives after which a stored response is never used unvalidated once stale (RFC 9111
# 5.2.2.2, 5.2.2.4). proxy-revalidate binds shared caches only (5.2.2.8), and s-maxage
# implies it for them (5.2.2.10); this cache serves many callers of one account, so both
# are honoured too: never wrong beats one more hit (DESIGN.md, "The cache is private per
# account": s-maxage still does not change the freshness lifetime).
STRICT_DIRECTIVES = ("no-cache", "must-revalidate", "proxy-revalidate", "s-maxage")


def reuse_windows(
    cc: Mapping[str, str | None],
    headers: Sequence[tuple[str, str]],
    response_time: float,
    rule: CacheRule | None,
) -> dict[str, Any]:
    """The Entry fields that say how long a response may be reused, fresh or stale."""
    lifetime = freshness_lifetime(cc, headers, response_time)
    if lifetime is None:
        lifetime = rule.fresh_for if rule else 0.0
    strict = any(name in cc for name in STRICT_DIRECTIVES)
    if "no-cache" in cc:
        lifetime = 0.0  # RFC 9111 5.2.2.4; with field names it is treated as plain no-cache
    sie = seconds(cc.get("stale-if-error"))
    swr = seconds(cc.get("stale-while-revalidate"))
    if sie is None:
        sie = rule.stale_if_error if rule else 0.0
    if swr is None:
        swr = rule.stale_while_revalidate if rule else 0.0
    return {
        "fresh_for": lifetime,
        "stale_if_error": 0.0 if strict else sie,
        "stale_while_revalidate": 0.0 if strict else swr,
        "strict": strict,
    }


def _unstorable(
    status: int,
    cc: Mapping[str, str | None],
    headers: Sequence[tuple[str, str]],
    req: RequestControl,
    names: tuple[str, ...] | None,
    whole: bool,
    size: int,
    max_size: int,
) -> NotStorable | None:
    if req.no_store:
        return NotStorable("request_no_store", "request no-store")  # RFC 9111 5.2.1.5
    if status < 200 or status in (206, 304):  # RFC 9111 3, 3.3
        return NotStorable("not_final", f"status {status} is not a final, complete response")
    if "no-store" in cc:
        return NotStorable("no_store", "response no-store")  # RFC 9111 5.2.2.5
    if values_of(headers, "Set-Cookie"):
        # one caller's cookie must never reach another caller
        return NotStorable("set_cookie", "Set-Cookie")
    if names is None:
        return NotStorable("vary_star", "Vary: *")  # RFC 9111 4.1: never matches
    coding = coding_of(headers)
    if coding not in (IDENTITY, GZIP):  # passed through only
        return NotStorable("unknown_coding", f"content coding {coding} is not one the proxy checks")
    if not whole:  # RFC 9111 3.3: incomplete responses
        return NotStorable("truncated", "body did not arrive whole")
    if size > max_size:
        return NotStorable("too_large", f"body larger than {max_size} bytes")
    return None


def freshness_lifetime(
    cc: Mapping[str, str | None], headers: Sequence[tuple[str, str]], response_time: float
) -> float | None:
    """RFC 9111 4.2.1 for a private cache: max-age, else Expires - Date; None: not given."""
    if "max-age" in cc:
        value = seconds(cc["max-age"])
        return value if value is not None else 0.0  # invalid max-age: stale (5.2.2.1)
    expires = values_of(headers, "Expires")
    if expires:
        at = http_date(expires[0])
        if at is None:
            return 0.0  # RFC 9111 5.3: an invalid Expires means "already expired"
        date = http_date(next(iter(values_of(headers, "Date")), None))
        return max(0.0, at - (date if date is not None else response_time))
    return None


def initial_age(headers: Sequence[tuple[str, str]], request_time: float, now: float) -> float:
    """RFC 9111 4.2.3 corrected_initial_age."""
    date = http_date(next(iter(values_of(headers, "Date")), None))
    apparent = max(0.0, now - date) if date is not None else 0.0
    age = age_value(values_of(headers, "Age")) or 0.0
    return max(apparent, age + max(0.0, now - request_time))
