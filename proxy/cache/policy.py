"""Pure cache decisions: RFC 9111 semantics for a cache private to one Kounta account.

No I/O, no aiohttp, no clock of its own: every function takes ``now``. The driver
(:mod:`proxy.cache.layer`) matches on the small frozen decisions returned here::

    lookup(...)  -> FreshHit | ServeStale | Revalidate | Miss | OnlyIfCachedMiss
    stale_while_busy(...) -> BusyStale | NotBusyStale
    bypass(...)  -> Bypass | None
    to_entry(...) -> Entry | NotStorable
    merge_304(...) -> Entry | None
    invalidation(...) -> Invalidation | None

The cache is *private* (RFC 9111 1, 3.5): each account has its own entries, so
``private`` responses may be stored and ``s-maxage`` is ignored.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urljoin, urlsplit

from proxy.cache.invalidation import Invalidation, is_id, normalise_path
from proxy.coding import GZIP, IDENTITY, coding_of
from proxy.dates import http_date
from proxy.headers import HOP_BY_HOP, RESPONSE_DROPPED, connection_named
from proxy.settings import CacheRule
from proxy.target import normal_escapes

KEY_VERSION = 1
# Request headers that always select a representation (Kounta: format, indentation, page).
SELECTING = ("Accept", "X-Pretty-Print", "X-Page")
# Statuses a cache may store without explicit freshness (RFC 9110 15.1 "heuristically cacheable").
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Upstream answers for which a stored response may be served instead (RFC 5861 4).
ERROR_STATUSES = frozenset({429, 500, 502, 503, 504})
# Never stored with an entry (RFC 9111 3.1: hop-by-hop; the rest is recomputed per answer).
# Content-Encoding is kept: the stored body is the representation as sent (gzip stays gzip).
UNSTORED_HEADERS = (HOP_BY_HOP | RESPONSE_DROPPED | {"age", "x-request-id"}) - {"content-encoding"}
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
# Caller headers the cache does not evaluate: such requests go through untouched.
UNHANDLED_CONDITIONALS = ("If-Match", "If-Unmodified-Since", "If-Range", "Range")

Headers = Mapping[str, str]
HeaderItems = tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------- directives


def split_list(value: str) -> list[str]:
    """The members of a comma-separated list (RFC 9110 5.6.1), commas inside quotes kept."""
    parts: list[str] = []
    start, quoted, escaped = 0, False, False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append(value[start:i].strip())
            start = i + 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


def directives(values: Iterable[str]) -> dict[str, str | None]:
    """Cache-Control directives (RFC 9111 5.2): lower-case names, unquoted arguments.

    Commas inside a quoted argument do not split (``ext="a, max-age=9"`` must not give a
    max-age); of a repeated directive the first counts (RFC 9111 4.2.1 allows this).
    """
    out: dict[str, str | None] = {}
    for value in values:
        for part in split_list(value):
            name, sep, arg = part.partition("=")
            name = name.strip().lower()
            if name and name not in out:
                out[name] = _unquote(arg.strip()) if sep else None
    return out


def _unquote(arg: str) -> str:
    if len(arg) >= 2 and arg[0] == arg[-1] == '"':
        return re.sub(r"\\(.)", r"\1", arg[1:-1])
    return arg


# RFC 9111 1.2.2: delta-seconds are ASCII digits only (str.isdigit() also takes "²" and
# other scripts' digits, and float("²") raises).
DELTA_SECONDS = re.compile(r"[0-9]+")
# RFC 9111 1.2.2: a delta-seconds too large to hold is taken as 2^31.
DELTA_SECONDS_MAX = 2.0**31


def seconds(value: str | None) -> float | None:
    """A delta-seconds argument (RFC 9111 1.2.2); invalid ones count as absent.

    "If a cache receives a delta-seconds value greater than the greatest integer it can
    represent, or if any of its subsequent calculations overflows, the cache MUST consider
    the value to be 2147483648 (2^31)": so huge values are clamped, never an overflow.
    """
    if value is None:
        return None
    value = value.strip()
    if not DELTA_SECONDS.fullmatch(value):
        return None
    return min(float(value), DELTA_SECONDS_MAX)


def age_value(values: Sequence[str]) -> float | None:
    """The ``Age`` field (RFC 9111 5.1), or None when absent or invalid.

    RFC 9111 5.1: "Although it is defined as a singleton header field, a cache encountering
    a message with a list-based Age field value SHOULD use the first member of the field
    value, discarding subsequent ones. If the field value (after discarding additional
    members, as per above) is invalid (e.g., it contains something other than a
    non-negative integer), a cache SHOULD ignore the field." So ``Age: 10, 20`` is 10, and
    ``Age: 10s``, ``Age: -5``, ``Age: 1.5`` or ``Age: 10 junk`` are ignored, never read as
    their numeric prefix.
    """
    members = split_list(", ".join(values))
    return seconds(members[0]) if members else None


@dataclass(frozen=True, slots=True)
class RequestControl:
    """The caller's Cache-Control (RFC 9111 5.2.1) and Pragma (5.4)."""

    no_store: bool = False
    no_cache: bool = False
    max_age: float | None = None
    max_stale: float | None = None  # math.inf for a bare max-stale
    min_fresh: float | None = None
    only_if_cached: bool = False


NO_CONTROL = RequestControl()


def request_control(cache_control: Sequence[str], pragma: Sequence[str] = ()) -> RequestControl:
    if not cache_control and not pragma:
        return NO_CONTROL  # most requests: skip the parse (measured ~1.5 us of a fresh hit)
    d = directives(cache_control)
    max_age = seconds(d.get("max-age"))
    no_cache = "no-cache" in d or max_age == 0
    if not cache_control and any("no-cache" in p.lower() for p in pragma):
        no_cache = True  # RFC 9111 5.4: Pragma only counts without Cache-Control
    stale = d.get("max-stale", "")
    return RequestControl(
        no_store="no-store" in d,
        no_cache=no_cache,
        max_age=max_age,
        max_stale=(math.inf if stale is None else seconds(stale)) if "max-stale" in d else None,
        min_fresh=seconds(d.get("min-fresh")),
        only_if_cached="only-if-cached" in d,
    )


# --------------------------------------------------------------------------- keys


def cache_key(account: str, path: str, query: str, headers: Headers) -> str:
    """The primary key (RFC 9111 4.1, 2): account + GET + path + query + selecting headers.

    HEAD shares GET's key (RFC 9110 9.3.2: HEAD may be answered from a stored GET).
    Path and query are normalised as RFC 3986 6.2.2.1-2 says (escaped unreserved characters
    decoded, other escapes upper-case), so every spelling of a resource has one key and one
    invalidation reaches it. JSON keeps the parts apart, so distinct inputs never collide
    and keys can be parsed back.
    """
    selected = [headers.get(name) for name in SELECTING]
    parts = [KEY_VERSION, account, "GET", normal_escapes(path), normal_escapes(query), selected]
    return json.dumps(parts, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class KeyParts:
    account: str
    method: str
    path: str
    query: str
    selected: tuple[str | None, ...]


def parse_key(key: str) -> KeyParts | None:
    """The parts of a key made by :func:`cache_key`, or None for anything else."""
    try:
        version, account, method, path, query, selected = json.loads(key)
    except (ValueError, TypeError):
        return None
    if version != KEY_VERSION or not all(isinstance(v, str) for v in (account, path, query)):
        return None
    return KeyParts(account, method, path, query, tuple(selected))


def key_prefix(account: str, path: str = "") -> str:
    """What every key of ``account`` whose path begins with ``path`` begins with (JSON
    escapes each character on its own, so a prefix of a path is a prefix of its key)."""
    return json.dumps([KEY_VERSION, account, "GET", path], separators=(",", ":"))[:-2]


def vary_names(headers: Sequence[tuple[str, str]]) -> tuple[str, ...] | None:
    """Vary names beyond the always-selecting ones; None for ``Vary: *`` (RFC 9111 4.1)."""
    names: list[str] = []
    for name, value in headers:
        if name.lower() != "vary":
            continue
        for part in value.split(","):
            part = part.strip()
            if part == "*":
                return None
            # Accept-Encoding is the proxy's own business: it never forwards the caller's.
            known = [s.lower() for s in SELECTING] + ["accept-encoding"]
            if part and part.lower() not in known and part.lower() not in names:
                names.append(part.lower())
    return tuple(names)


def field_values(headers: Headers, name: str) -> list[str]:
    """Every line of a request field (a multidict's repeats, or a plain mapping's one)."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    lower = name.lower()
    return [v for k, v in headers.items() if k.lower() == lower]


def vary_value(headers: Headers, name: str) -> str | None:
    """A selecting field's value for comparison (RFC 9111 4.1): its lines combined, list
    members trimmed and inner whitespace collapsed, so ``a,b`` selects ``a, b``."""
    values = field_values(headers, name)
    if not values:
        return None
    return ", ".join(" ".join(m.split()) for v in values for m in split_list(v))


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored response's metadata (the body is stored beside it)."""

    status: int
    headers: HeaderItems  # the upstream's form, without UNSTORED_HEADERS
    account: str
    path: str
    request_time: float
    response_time: float
    initial_age: float  # RFC 9111 4.2.3 corrected_initial_age
    fresh_for: float  # freshness lifetime, RFC 9111 4.2.1
    stale_if_error: float
    stale_while_revalidate: float
    strict: bool  # no-cache / must-revalidate: never used unvalidated once stale
    vary: tuple[tuple[str, str | None], ...]  # extra Vary names and the values stored with
    size: int

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None

    @property
    def etag(self) -> str | None:
        return self.header("ETag")

    @property
    def last_modified(self) -> str | None:
        return self.header("Last-Modified")

    def age(self, now: float) -> float:
        """RFC 9111 4.2.3 current_age."""
        return self.initial_age + max(0.0, now - self.response_time)

    def staleness(self, now: float) -> float:
        return self.age(now) - self.fresh_for

    def selects(self, headers: Headers) -> bool:
        """RFC 9111 4.1: the request's values of the stored Vary names match (normalised)."""
        return all(vary_value(headers, name) == value for name, value in self.vary)


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


def _all(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    lower = name.lower()
    return [v for k, v in headers if k.lower() == lower]


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
    cc = directives(_all(headers, "Cache-Control"))
    names = vary_names(headers)
    refused = _unstorable(status, cc, headers, request_control, names, whole, size, max_size)
    if refused is not None:
        return refused
    assert names is not None
    explicit = freshness_lifetime(cc, headers, response_time) is not None
    has_validator = bool(_all(headers, "ETag") or _all(headers, "Last-Modified"))
    reuse = _reuse(cc, headers, response_time, rule_for(path, rules))
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


def _reuse(
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
    if _all(headers, "Set-Cookie"):
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
    expires = _all(headers, "Expires")
    if expires:
        at = http_date(expires[0])
        if at is None:
            return 0.0  # RFC 9111 5.3: an invalid Expires means "already expired"
        date = http_date(next(iter(_all(headers, "Date")), None))
        return max(0.0, at - (date if date is not None else response_time))
    return None


def initial_age(headers: Sequence[tuple[str, str]], request_time: float, now: float) -> float:
    """RFC 9111 4.2.3 corrected_initial_age."""
    date = http_date(next(iter(_all(headers, "Date")), None))
    apparent = max(0.0, now - date) if date is not None else 0.0
    age = age_value(_all(headers, "Age")) or 0.0
    return max(apparent, age + max(0.0, now - request_time))


# --------------------------------------------------------------------------- lookup


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
    ``must-revalidate``, ``proxy-revalidate``, ``s-maxage``: :data:`STRICT_DIRECTIVES`).
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
    ``proxy-revalidate``, ``s-maxage``: :data:`STRICT_DIRECTIVES`), nor for a caller who asks
    for validation (``no-cache``, ``max-age``: RFC 9111 5.2.1.1, 5.2.1.4) or for freshness
    (``min-fresh``, 5.2.1.3). A caller's ``max-stale=N`` bounds the staleness further
    (5.2.1.2; ``max-stale=0`` opts out); a bare ``max-stale`` leaves the window as it is
    (the proxy's bound holds: RFC 9111 4.2.4 lets a cache serve stale only where allowed).
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
    return "stale-if-error" in directives(_all(entry.headers, "Cache-Control"))


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
    r = reuse or _reuse(_cc(fields), fields, response_time, rule_for(entry.path, rules))
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
    new_tag = next(iter(_all(headers, "ETag")), None)
    old_tag = next(iter(_all(stored, "ETag")), None)
    if new_tag is not None and old_tag is not None and not weak_match(new_tag, old_tag):
        return None
    updates = [(k, v) for k, v in storable_headers(headers) if k.lower() not in NOT_UPDATED_BY_304]
    replaced = {k.lower() for k, _ in updates}
    merged = tuple((k, v) for k, v in stored if k.lower() not in replaced) + tuple(updates)
    cc = _cc(merged)
    dated = http_date(next(iter(_all(merged, "Date")), None)) is not None
    if "max-age" not in cc and _all(merged, "Expires") and not dated:
        return merged, None
    return merged, _reuse(cc, merged, 0.0, rule_for(path, rules))


_merged_304 = functools.lru_cache(maxsize=1024)(_merge_304)


def _cc(headers: HeaderItems) -> dict[str, str | None]:
    return directives(_all(headers, "Cache-Control"))


def _initial_age(headers: Sequence[tuple[str, str]], request_time: float, now: float) -> float:
    """:func:`initial_age` with the Date parsed once per value (a 304's Date changes once a
    second)."""
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
    modified = http_date(next(iter(_all(stored, "Last-Modified") or _all(stored, "Date")), None))
    return modified is not None and modified <= ims


def _first_etag(stored: Sequence[tuple[str, str]]) -> str | None:
    return next(iter(_all(stored, "ETag")), None)


_T = TypeVar("_T")


class _Last(Generic[_T]):
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
_etag = _Last(_etag_memo)


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


_last_not_modified = _Last(_not_modified_headers)


# --------------------------------------------------------------------------- invalidation


def invalidation(
    account: str,
    method: str,
    path: str,
    status: int | None,
    headers: Sequence[tuple[str, str]],
    upstream_origin: str,
) -> Invalidation | None:
    """What a request through the proxy invalidates (RFC 9111 4.4).

    After an unsafe method: the target (with and without ``.json``), the same-origin
    Location and Content-Location, and the lists of the target's collection. ``status``
    None means the outcome is unknown (timeout, broken connection): the upstream may have
    processed it, so the entries go too. Answers 400-499 changed nothing and keep them.
    """
    if method not in UNSAFE_METHODS:
        return None
    if status is not None and 400 <= status < 500:
        return None
    paths = {normalise_path(path)}
    for name in ("Location", "Content-Location"):
        for value in _all(headers, name):
            same = _same_origin_path(value, upstream_origin, path)
            if same is not None:
                paths.add(normalise_path(same))
    kinds = {_collection(p) for p in paths} - {None}
    return Invalidation(account, frozenset(paths), frozenset(k for k in kinds if k))


def _collection(path: str) -> str | None:
    """The collection a path is in: its last segment that is not an id."""
    for segment in reversed(path.strip("/").split("/")):
        if not is_id(segment) and segment != "v1":
            return segment
    return None


def _same_origin_path(value: str, origin: str, target: str) -> str | None:
    """The path of a Location / Content-Location on the upstream's origin (relative
    references resolved against the request's target, RFC 9110 10.2.2), else None."""
    try:
        url = urlsplit(urljoin(origin + target, value.strip()))
        base = urlsplit(origin)
    except ValueError:
        return None
    if (url.scheme, url.netloc) == (base.scheme, base.netloc):
        return url.path or None
    return None
