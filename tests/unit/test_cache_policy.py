"""Table tests of the pure cache decisions (RFC 9111), one branch a row."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.cache.entry import Entry
from proxy.cache.fields import (
    NO_CONTROL,
    RequestControl,
    age_value,
    directives,
    request_control,
    seconds,
)
from proxy.cache.invalidation import Invalidation, invalidation
from proxy.cache.keys import cache_key, parse_key, vary_names
from proxy.cache.lookup import (
    Bypass,
    FreshHit,
    Miss,
    OnlyIfCachedMiss,
    Revalidate,
    ServeStale,
    bypass,
    fresh_age,
    lookup,
    stale_on_error,
)
from proxy.cache.storable import NotStorable, freshness_lifetime, initial_age, rule_for, to_entry
from proxy.cache.validation import (
    Freshened,
    Refetch,
    TakeBody,
    UpstreamFailed,
    answered,
    merge_304,
    not_modified,
    not_modified_headers,
    validators,
)
from proxy.settings import CacheRule

NOW = 1_700_000_000.0
DATE = "Tue, 14 Nov 2023 22:13:20 GMT"  # == NOW
LATER = "Tue, 14 Nov 2023 22:14:20 GMT"  # NOW + 60
EARLIER = "Tue, 14 Nov 2023 22:12:20 GMT"  # NOW - 60


def entry(**kw: Any) -> Entry:
    base = Entry(
        status=200,
        headers=(("ETag", '"a"'), ("Content-Type", "application/json")),
        account="main",
        path="/v1/companies/5/customers.json",
        request_time=NOW,
        response_time=NOW,
        initial_age=0.0,
        fresh_for=0.0,
        stale_if_error=0.0,
        stale_while_revalidate=0.0,
        strict=False,
        vary=(),
        size=2,
    )
    return replace(base, **kw)


def store(headers: list[tuple[str, str]], status: int = 200, **kw: Any) -> Entry | NotStorable:
    args: dict[str, Any] = {
        "account": "main",
        "path": "/v1/companies/5/sites.json",
        "request_headers": {},
        "request_control": RequestControl(),
        "status": status,
        "headers": headers,
        "size": 10,
        "whole": True,
        "max_size": 100,
        "request_time": NOW,
        "response_time": NOW,
        "rules": (),
    }
    args.update(kw)
    return to_entry(**args)


# --------------------------------------------------------------------------- directives


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], {}),
        (["max-age=60"], {"max-age": "60"}),
        (["No-Cache, max-age=0"], {"no-cache": None, "max-age": "0"}),
        (['private="x", max-age="5"'], {"private": "x", "max-age": "5"}),
        (["max-age=1", "max-age=2"], {"max-age": "1"}),  # first wins
        ([" , ,"], {}),
        # a comma inside quotes does not end the argument: no max-age smuggled in
        (['ext="a, max-age=3600", max-age=1'], {"ext": "a, max-age=3600", "max-age": "1"}),
        (['no-cache="Set-Cookie, X-A"'], {"no-cache": "Set-Cookie, X-A"}),
        (['ext="x\\"y", Max-Age = 7'], {"ext": 'x"y', "max-age": "7"}),
        (["max-age='60'"], {"max-age": "'60'"}),  # single quotes are not quotes
    ],
)
def test_directives(values: list[str], expected: dict[str, str | None]) -> None:
    assert directives(values) == expected


@pytest.mark.parametrize(
    ("cc", "pragma", "expected"),
    [
        ([], [], RequestControl()),
        (["no-store"], [], RequestControl(no_store=True)),
        (["no-cache"], [], RequestControl(no_cache=True)),
        (["max-age=0"], [], RequestControl(no_cache=True, max_age=0)),
        (["max-age=30"], [], RequestControl(max_age=30)),
        (["max-age=abc"], [], RequestControl()),
        (["max-stale"], [], RequestControl(max_stale=math.inf)),
        (["max-stale=10"], [], RequestControl(max_stale=10)),
        (["min-fresh=5"], [], RequestControl(min_fresh=5)),
        (["only-if-cached"], [], RequestControl(only_if_cached=True)),
        ([], ["no-cache"], RequestControl(no_cache=True)),
        (["max-age=30"], ["no-cache"], RequestControl(max_age=30)),  # RFC 9111 5.4
    ],
)
def test_request_control(cc: list[str], pragma: list[str], expected: RequestControl) -> None:
    assert request_control(cc, pragma) == expected


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("main", "/v1/x", "", {}), ("other", "/v1/x", "", {})),
        (("main", "/v1/x", "", {}), ("main", "/v1/x.json", "", {})),
        (("main", "/v1/x", "a=1", {}), ("main", "/v1/x", "a=2", {})),
        (("main", "/v1/x", "", {"Accept": "application/json"}), ("main", "/v1/x", "", {})),
        (("main", "/v1/x", "", {"X-Page": "1"}), ("main", "/v1/x", "", {"X-Page": "2"})),
        (("main", "/v1/x", "", {"X-Pretty-Print": "1"}), ("main", "/v1/x", "", {})),
    ],
)
def test_keys_that_differ(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert cache_key(*a) != cache_key(*b)


def test_key_ignores_headers_that_select_nothing() -> None:
    assert cache_key("main", "/v1/x", "", {"X-Request-ID": "1"}) == cache_key(
        "main", "/v1/x", "", {"X-Request-ID": "2"}
    )


text = st.text(max_size=20)
headers_st = st.dictionaries(st.sampled_from(["Accept", "X-Page", "X-Pretty-Print"]), text)


@given(text, text, text, headers_st, text, text, text, headers_st)
def test_keys_are_injective_and_parse_back(
    a1: str, p1: str, q1: str, h1: dict[str, str], a2: str, p2: str, q2: str, h2: dict[str, str]
) -> None:
    k1, k2 = cache_key(a1, p1, q1, h1), cache_key(a2, p2, q2, h2)
    same = (a1, p1, q1, [h1.get(n) for n in ("Accept", "X-Pretty-Print", "X-Page")]) == (
        a2,
        p2,
        q2,
        [h2.get(n) for n in ("Accept", "X-Pretty-Print", "X-Page")],
    )
    assert (k1 == k2) == same
    parts = parse_key(k1)
    assert parts is not None
    assert (parts.account, parts.path, parts.query, parts.method) == (a1, p1, q1, "GET")


@pytest.mark.parametrize("key", ["", "nope", "[1]", '[2,"a","GET","/p","",[]]', "{}"])
def test_parse_key_refuses_other_strings(key: str) -> None:
    assert parse_key(key) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], ()),
        ([("Vary", "Accept, X-Page")], ()),
        ([("Vary", "Accept-Encoding")], ()),
        ([("Vary", "X-Custom, x-custom"), ("Vary", "Y")], ("x-custom", "y")),
        ([("Vary", "Accept, *")], None),
    ],
)
def test_vary_names(headers: list[tuple[str, str]], expected: tuple[str, ...] | None) -> None:
    assert vary_names(headers) == expected


# --------------------------------------------------------------------------- storing


@pytest.mark.parametrize(
    ("headers", "status", "kw", "reason"),
    [
        ([("ETag", '"a"')], 200, {"request_control": RequestControl(no_store=True)}, "request"),
        ([("ETag", '"a"')], 206, {}, "final"),
        ([("ETag", '"a"')], 304, {}, "final"),
        ([("ETag", '"a"')], 101, {}, "final"),
        ([("ETag", '"a"'), ("Cache-Control", "no-store")], 200, {}, "no-store"),
        ([("ETag", '"a"'), ("Set-Cookie", "a=b")], 200, {}, "Set-Cookie"),
        ([("ETag", '"a"'), ("Vary", "*")], 200, {}, "Vary"),
        ([("ETag", '"a"')], 200, {"whole": False}, "whole"),
        ([("ETag", '"a"')], 200, {"size": 101}, "larger"),
        ([("ETag", '"a"')], 302, {}, "explicit freshness"),
        ([("Content-Type", "x")], 200, {}, "nothing to reuse"),
        ([("X-A", "1")], 404, {"rules": (CacheRule("/v1/*", 10),)}, "without validator"),
    ],
)
def test_not_storable(
    headers: list[tuple[str, str]], status: int, kw: dict[str, Any], reason: str
) -> None:
    result = store(headers, status, **kw)
    assert isinstance(result, NotStorable)
    assert reason in result.reason


@pytest.mark.parametrize(
    ("headers", "status", "rules", "fresh_for", "sie", "swr", "strict"),
    [
        ([("ETag", '"a"')], 200, (), 0.0, 0.0, 0.0, False),
        ([("Last-Modified", DATE)], 200, (), 0.0, 0.0, 0.0, False),
        ([("Cache-Control", "max-age=30")], 200, (), 30.0, 0.0, 0.0, False),
        ([("Cache-Control", "max-age=30, s-maxage=5")], 200, (), 30.0, 0.0, 0.0, True),
        ([("Cache-Control", "private, max-age=9")], 200, (), 9.0, 0.0, 0.0, False),
        ([("Cache-Control", "max-age=x"), ("ETag", '"a"')], 200, (), 0.0, 0.0, 0.0, False),
        ([("Expires", LATER), ("Date", DATE)], 200, (), 60.0, 0.0, 0.0, False),
        ([("Expires", LATER)], 200, (), 60.0, 0.0, 0.0, False),  # no Date: response time
        ([("Expires", "0"), ("ETag", '"a"')], 200, (), 0.0, 0.0, 0.0, False),
        (
            [("ETag", '"a"')],
            200,
            (CacheRule("/v1/companies/*/sites", 10, 20, 30),),
            10.0,
            20.0,
            30.0,
            False,
        ),
        (
            [("Cache-Control", "max-age=5, stale-if-error=7, stale-while-revalidate=8")],
            200,
            (CacheRule("/v1/*", 10, 20, 30),),
            5.0,
            7.0,
            8.0,
            False,
        ),
        (
            [("ETag", '"a"'), ("Cache-Control", "no-cache, max-age=60")],
            200,
            (CacheRule("/v1/*", 10, 20, 30),),
            0.0,
            0.0,
            0.0,
            True,
        ),
        (
            [("ETag", '"a"'), ("Cache-Control", "must-revalidate, max-age=60")],
            200,
            (),
            60.0,
            0.0,
            0.0,
            True,
        ),
        ([("ETag", '"a"')], 404, (), 0.0, 0.0, 0.0, False),
        ([("Cache-Control", "max-age=5")], 302, (), 5.0, 0.0, 0.0, False),
        ([("Cache-Control", "max-age=5")], 203, (), 5.0, 0.0, 0.0, False),
    ],
)
def test_storable(
    headers: list[tuple[str, str]],
    status: int,
    rules: tuple[CacheRule, ...],
    fresh_for: float,
    sie: float,
    swr: float,
    strict: bool,
) -> None:
    result = store(headers, status, rules=rules)
    assert isinstance(result, Entry), result
    assert (result.fresh_for, result.stale_if_error, result.stale_while_revalidate) == (
        fresh_for,
        sie,
        swr,
    )
    assert result.strict is strict


def test_stored_headers_drop_framing_and_per_answer_fields() -> None:
    result = store(
        [("ETag", '"a"'), ("Content-Length", "10"), ("Age", "3"), ("Connection", "close")]
    )
    assert isinstance(result, Entry)
    assert result.headers == (("ETag", '"a"'),)
    assert result.initial_age == 3.0


def test_fields_named_by_connection_are_not_stored() -> None:
    # RFC 9110 7.6.1: they are hop-by-hop; once Connection itself is dropped from the
    # stored copy, nothing would stop them reaching every caller of a hit.
    result = store(
        [
            ("ETag", '"a"'),
            ("Connection", "X-Internal, keep-alive"),
            ("Connection", "x-node"),
            ("X-Internal", "secret-ish"),
            ("X-Node", "n1"),
            ("Keep-Alive", "timeout=5"),
            ("X-Kept", "1"),
        ]
    )
    assert isinstance(result, Entry)
    assert result.headers == (("ETag", '"a"'), ("X-Kept", "1"))


def test_fields_named_by_connection_in_a_304_are_not_merged() -> None:
    stored = entry(headers=(("ETag", '"a"'), ("X-Kept", "1")))
    merged = merge_304(
        stored, [("Connection", "X-Hop"), ("X-Hop", "h"), ("X-New", "n")], NOW, NOW, ()
    )
    assert merged is not None
    assert merged.headers == (("ETag", '"a"'), ("X-Kept", "1"), ("X-New", "n"))


def test_stored_vary_values_select() -> None:
    asked = CIMultiDict({"X-Tenant": "a"})
    result = store([("ETag", '"a"'), ("Vary", "X-Tenant")], request_headers=asked)
    assert isinstance(result, Entry)
    assert result.vary == (("x-tenant", "a"),)
    assert result.selects(CIMultiDict({"X-TENANT": "a"}))
    assert not result.selects(CIMultiDict({"x-tenant": "b"}))
    assert not result.selects(CIMultiDict())


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/companies/5/sites.json", 1),
        ("/v1/companies/5/sites", 1),
        ("/v1/companies/5/products/9.json", 2),
        ("/v1/companies/me.json", None),
    ],
)
def test_rule_for(path: str, expected: int | None) -> None:
    rules = (CacheRule("/v1/companies/*/sites", 1), CacheRule("/v1/companies/*/products/*", 2))
    found = rule_for(path, rules)
    assert (found.fresh_for if found else None) == expected


def test_freshness_lifetime_absent_and_initial_age() -> None:
    assert freshness_lifetime({}, [], NOW) is None
    # apparent age from Date, plus the Age header and the response delay.
    assert initial_age([("Date", EARLIER)], NOW, NOW) == 60.0
    assert initial_age([("Age", "5")], NOW - 2, NOW) == 7.0
    assert initial_age([("Date", "garbage")], NOW, NOW) == 0.0


# A time 60 s after NOW written in forms that only look like an HTTP-date (RFC 9110 5.6.7):
# were any of them read as a date, the response would be fresh for a minute.
INVALID_EXPIRES = [
    "Tue, 14 Nov 2023 22:14:20 UTC",  # a zone other than GMT
    "Tue, 14 Nov 2023 22:14:20 AEST",
    "Tue, 14 Nov 2023 22:14:20 +0000",
    "Tue, 14 Nov 2023 22:14:20",  # no zone
    "Tue, 14 Nov 23 22:14:20 GMT",  # a two-digit year in the IMF form
    "Tue 14 Nov 2023 22:14:20 GMT",  # missing comma
    "Tue,  14 Nov 2023 22:14:20 GMT",  # extra spaces
    "Tue, 14 Nov 2023  22:14:20 GMT",
    "Tue, 14 Nov  2023 22:14:20 GMT",
    "Tue, 14-Nov-2023 22:14:20 GMT",  # dashes in the IMF form
    "Tue, 14 Nov 2023 22.14.20 GMT",  # dots in the time
    "Wed, 15 Nov 2023 1:14:20 GMT",  # a one-digit hour
    "Tue, 14 Nov 2023\r\n 22:14:20 GMT",  # folded over lines (unfolded as read)
    "Tue, 14 Nov 2023\t22:14:20 GMT",  # folded with a tab: what aiohttp hands on
    "tue, 14 nov 2023 22:14:20 gmt",  # day and month names are case-sensitive
    "Tuesday, 14 Nov 2023 22:14:20 GMT",  # a long day name in the IMF form
    "Tue, 14 November 2023 22:14:20 GMT",
    "Tue, 14 Nov 2023 22:14:20 GMT junk",
    "Tue, 31 Nov 2023 22:14:20 GMT",  # no such day
    "Tue, 14 Nov 2023 24:14:20 GMT",  # no such hour
    "2023-11-14T22:14:20Z",
    "1700000060",
    "-1",
    "",
]


@pytest.mark.parametrize("expires", INVALID_EXPIRES)
def test_an_invalid_expires_is_already_expired(expires: str) -> None:
    # RFC 9111 5.3: "A cache recipient MUST interpret invalid date formats, especially the
    # value "0", as representing a time in the past (i.e., "already expired")."
    headers = [("Expires", expires), ("Date", DATE), ("ETag", '"a"')]
    assert freshness_lifetime({}, headers, NOW) == 0.0
    # Present but invalid is not absent: no rule's heuristic freshness replaces it.
    result = store(headers, rules=(CacheRule("/v1/*", fresh_for=600, stale_if_error=5),))
    assert isinstance(result, Entry)
    assert result.fresh_for == 0.0
    assert lookup(result, {}, NO_CONTROL, NOW) == Revalidate(result)


@pytest.mark.parametrize(
    "expires",
    [LATER, "Tuesday, 14-Nov-23 22:14:20 GMT", "Tue Nov 14 22:14:20 2023"],
    ids=["imf-fixdate", "rfc850", "asctime"],
)
def test_the_three_http_date_forms_give_freshness(expires: str) -> None:
    headers = [("Expires", expires), ("Date", DATE)]
    assert freshness_lifetime({}, headers, NOW) == 60.0


def test_max_age_wins_over_an_invalid_expires() -> None:
    headers = [("Cache-Control", "max-age=30"), ("Expires", "Tue, 14 Nov 2023 22:14:20 UTC")]
    assert freshness_lifetime({"max-age": "30"}, headers, NOW) == 30.0


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["5"], 5.0),
        ([" 5 "], 5.0),
        (["0"], 0.0),
        (["10, 20"], 10.0),  # a list: the first member counts
        (["10", "20"], 10.0),  # two field lines are a list too
        (["10s"], None),  # a suffix: invalid, ignored (not read as 10)
        (["10 s"], None),
        (["1.5"], None),
        (["-5"], None),
        (["+5"], None),
        (["0x10"], None),
        (["1e3"], None),
        (["\u00b2"], None),  # a superscript two: str.isdigit() says yes, float() raises
        (["\u0661\u0662"], None),  # Arabic-Indic digits
        (["junk"], None),
        ([""], None),
        ([], None),
        (["99999999999999999999999"], 2.0**31),  # RFC 9111 1.2.2: too large is 2^31
    ],
)
def test_age_value(values: list[str], expected: float | None) -> None:
    assert age_value(values) == expected


@pytest.mark.parametrize("age", ["3600s", "3600 junk", "-3600", "3600.0"])
def test_an_invalid_age_is_ignored_not_read_as_its_prefix(age: str) -> None:
    headers = [("ETag", '"a"'), ("Cache-Control", "max-age=60"), ("Age", age), ("Date", DATE)]
    result = store(headers)
    assert isinstance(result, Entry)
    assert result.initial_age == 0.0
    assert isinstance(lookup(result, {}, NO_CONTROL, NOW), FreshHit)


def test_a_list_age_uses_its_first_member() -> None:
    result = store([("ETag", '"a"'), ("Cache-Control", "max-age=60"), ("Age", "30, 90")])
    assert isinstance(result, Entry)
    assert result.initial_age == 30.0


@pytest.mark.parametrize("value", ["\u00b2", "\u0661", "1\u00b2", " \u0662 "])
def test_non_ascii_digits_are_not_delta_seconds(value: str) -> None:
    assert seconds(value) is None
    assert request_control([f"max-age={value}"]).max_age is None
    assert freshness_lifetime({"max-age": value}, [], NOW) == 0.0  # invalid max-age: stale


# --------------------------------------------------------------------------- lookup


@pytest.mark.parametrize(
    ("method", "headers", "cc", "expected"),
    [
        ("GET", {}, [], None),
        ("HEAD", {}, [], None),
        ("OPTIONS", {}, [], "method"),
        ("GET", {}, ["no-store"], "no_store"),
        ("GET", {"If-Match": '"a"'}, [], "conditional"),
        ("GET", {"Range": "bytes=0-1"}, [], "conditional"),
        ("GET", {"If-None-Match": '"a"'}, [], None),  # answered by the cache itself
    ],
)
def test_bypass(method: str, headers: dict[str, str], cc: list[str], expected: str | None) -> None:
    result = bypass(method, headers, request_control(cc))
    if expected is None:
        assert result is None
    else:
        assert isinstance(result, Bypass)
        assert result.code == expected  # the lookup metric's reason label


FRESH = entry(fresh_for=60)
STALE_ETAG = entry(response_time=NOW - 100, fresh_for=60)
STALE_NO_VALIDATOR = entry(headers=(), response_time=NOW - 100, fresh_for=60)
SWR = entry(response_time=NOW - 100, fresh_for=60, stale_while_revalidate=50)
STRICT = entry(response_time=NOW - 100, fresh_for=60, strict=True, stale_while_revalidate=50)
VARIED = entry(fresh_for=60, vary=(("x-tenant", "a"),))


@pytest.mark.parametrize(
    ("stored", "headers", "cc", "expected"),
    [
        (None, {}, [], Miss()),
        (None, {}, ["only-if-cached"], OnlyIfCachedMiss()),
        (VARIED, {"x-tenant": "b"}, [], Miss()),
        (VARIED, {"x-tenant": "a"}, [], FreshHit(VARIED, 0.0)),
        (FRESH, {}, [], FreshHit(FRESH, 0.0)),
        (FRESH, {}, ["no-cache"], Revalidate(FRESH)),
        (FRESH, {}, ["max-age=0"], Revalidate(FRESH)),
        (FRESH, {}, ["min-fresh=61"], Revalidate(FRESH)),
        (FRESH, {}, ["min-fresh=30"], FreshHit(FRESH, 0.0)),
        (STALE_ETAG, {}, [], Revalidate(STALE_ETAG)),
        (STALE_ETAG, {}, ["max-age=200"], Revalidate(STALE_ETAG)),
        (entry(fresh_for=60, initial_age=30), {}, ["max-age=10"], None),
        (STALE_ETAG, {}, ["max-stale"], ServeStale(STALE_ETAG, 100.0, refresh=False)),
        (STALE_ETAG, {}, ["max-stale=50"], ServeStale(STALE_ETAG, 100.0, refresh=False)),
        (STALE_ETAG, {}, ["max-stale=10"], Revalidate(STALE_ETAG)),
        (STALE_ETAG, {}, ["only-if-cached"], OnlyIfCachedMiss()),
        (STALE_NO_VALIDATOR, {}, [], Miss(stale=STALE_NO_VALIDATOR)),
        (SWR, {}, [], ServeStale(SWR, 100.0, refresh=True)),
        (SWR, {}, ["no-cache"], Revalidate(SWR)),
        (STRICT, {}, [], Revalidate(STRICT)),
        (STRICT, {}, ["max-stale"], Revalidate(STRICT)),
    ],
)
def test_lookup(
    stored: Entry | None, headers: dict[str, str], cc: list[str], expected: object
) -> None:
    result = lookup(stored, headers, request_control(cc), NOW)
    if expected is None:  # max-age below the entry's age: revalidate
        assert isinstance(result, Revalidate)
    else:
        assert result == expected


seconds_st = st.floats(min_value=0, max_value=10**6, allow_nan=False)


@given(seconds_st, seconds_st, seconds_st, st.floats(-1000, 10**6), st.booleans())
def test_fresh_age_is_lookups_fresh_hit_without_cache_control(
    fresh_for: float, initial: float, swr: float, elapsed: float, strict: bool
) -> None:
    stored = entry(
        fresh_for=fresh_for, initial_age=initial, stale_while_revalidate=swr, strict=strict
    )
    decision = lookup(stored, {}, NO_CONTROL, NOW + elapsed)
    age = fresh_age(stored, NOW + elapsed)
    if isinstance(decision, FreshHit):
        assert age == decision.age
    else:
        assert age is None


@pytest.mark.parametrize(
    ("stored", "ok"),
    [
        (None, False),
        (entry(fresh_for=60), True),  # still fresh (the caller forced revalidation)
        (entry(response_time=NOW - 100, fresh_for=60, stale_if_error=50), True),
        (entry(response_time=NOW - 100, fresh_for=60, stale_if_error=30), False),
        (entry(response_time=NOW - 100, fresh_for=60, stale_if_error=50, strict=True), False),
    ],
)
def test_stale_on_error(stored: Entry | None, ok: bool) -> None:
    assert stale_on_error(stored, NOW) is ok


STALE_100 = {"response_time": NOW - 100, "fresh_for": 60}  # 40 s past freshness


@pytest.mark.parametrize(
    ("stored", "unreachable", "default", "ok"),
    [
        # cache.stale_if_error covers an unreachable origin for entries naming no window...
        (entry(**STALE_100), True, 300.0, True),
        (entry(**STALE_100), True, 30.0, False),  # ...for that long only
        (entry(**STALE_100), True, 0.0, False),  # 0 disables it
        # ...but not a 5xx or 429 answer: those need an explicit window.
        (entry(**STALE_100), False, 300.0, False),
        (entry(**STALE_100, stale_if_error=50), False, 0.0, True),
        # An explicit window wins where set, smaller or larger than the default.
        (entry(**STALE_100, stale_if_error=30), True, 300.0, False),
        (entry(**STALE_100, stale_if_error=50), True, 10.0, True),
        (
            entry(**STALE_100, headers=(("Cache-Control", "max-age=60, stale-if-error=0"),)),
            True,
            300.0,
            False,
        ),
        # Never once the response must be revalidated.
        (entry(**STALE_100, strict=True), True, 300.0, False),
        (entry(**STALE_100, strict=True, stale_if_error=50), False, 300.0, False),
    ],
)
def test_stale_on_error_windows(stored: Entry, unreachable: bool, default: float, ok: bool) -> None:
    assert stale_on_error(stored, NOW, unreachable=unreachable, default=default) is ok


@pytest.mark.parametrize(
    "cache_control",
    ["must-revalidate", "proxy-revalidate", "no-cache", "s-maxage=600", "max-age=60, s-maxage=9"],
)
def test_no_stale_on_error_when_the_response_forbids_stale(cache_control: str) -> None:
    stored = store([("ETag", '"a"'), ("Cache-Control", f"max-age=60, {cache_control}")])
    assert isinstance(stored, Entry)
    later = NOW + 61
    assert not stale_on_error(stored, later, unreachable=True, default=300.0)
    ok = store([("ETag", '"a"'), ("Cache-Control", "max-age=60, private")])
    assert isinstance(ok, Entry) and stale_on_error(ok, later, unreachable=True, default=300.0)


def test_validators() -> None:
    assert validators(entry()) == {"If-None-Match": '"a"'}
    both = entry(headers=(("ETag", 'W/"b"'), ("Last-Modified", DATE)))
    assert validators(both) == {"If-None-Match": 'W/"b"', "If-Modified-Since": DATE}
    assert validators(entry(headers=())) == {}


# --------------------------------------------------------------------------- 304 merge


def test_merge_304_freshens_headers_including_content_type_but_not_framing() -> None:
    stored = entry(headers=(("ETag", '"a"'), ("Content-Type", "application/json"), ("X-A", "1")))
    merged = merge_304(
        stored,
        [
            ("ETag", '"a"'),
            ("X-A", "2"),
            ("Cache-Control", "max-age=30"),
            ("Content-Length", "0"),
            ("Content-Type", "text/plain"),
        ],
        NOW + 5,
        NOW + 6,
        (),
    )
    assert merged is not None
    got = dict(merged.headers)
    assert got["X-A"] == "2"
    assert got["Content-Type"] == "text/plain"  # RFC 9111 3.2: only framing is kept
    assert "Content-Length" not in got
    assert merged.fresh_for == 30
    assert merged.response_time == NOW + 6
    assert merged.initial_age == 1.0


@pytest.mark.parametrize(
    ("headers", "rules", "fresh_for"),
    [
        ([], (CacheRule("/v1/*", 12),), 12.0),
        ([("ETag", 'W/"a"')], (), 0.0),  # weak match still selects
        ([("Cache-Control", "no-cache, max-age=9")], (), 0.0),
    ],
)
def test_merge_304_freshness(
    headers: list[tuple[str, str]], rules: tuple[CacheRule, ...], fresh_for: float
) -> None:
    merged = merge_304(entry(), headers, NOW, NOW, rules)
    assert merged is not None
    assert merged.fresh_for == fresh_for


def test_merge_304_ages_from_the_304_not_the_stored_date() -> None:
    old = "Tue, 14 Nov 2023 21:56:40 GMT"  # NOW - 1000
    stored = entry(headers=(("ETag", '"a"'), ("Date", old)), initial_age=0.0)
    # A 304 without Date: the stored Date must not make the fresh answer 1000 s old.
    merged = merge_304(stored, [("Cache-Control", "max-age=60")], NOW, NOW, ())
    assert merged is not None
    assert merged.initial_age == 0.0
    assert isinstance(lookup(merged, {}, RequestControl(), NOW + 1), FreshHit)
    # The 304's own Age counts (RFC 9111 4.2.3).
    merged = merge_304(stored, [("Age", "50"), ("Date", DATE)], NOW, NOW, ())
    assert merged is not None
    assert merged.initial_age == 50.0


def test_merge_304_takes_the_new_revalidation_rules() -> None:
    stored = entry(stale_if_error=100.0, stale_while_revalidate=100.0)
    merged = merge_304(stored, [("Cache-Control", "max-age=60, must-revalidate")], NOW, NOW, ())
    assert merged is not None
    assert (merged.strict, merged.stale_if_error, merged.stale_while_revalidate) == (
        True,
        0.0,
        0.0,
    )


def test_proxy_revalidate_forbids_stale() -> None:
    got = store(
        [("ETag", '"a"'), ("Cache-Control", "max-age=9, proxy-revalidate, stale-if-error=60")]
    )
    assert isinstance(got, Entry)
    assert (got.strict, got.fresh_for, got.stale_if_error) == (True, 9.0, 0.0)


def test_vary_values_are_normalised() -> None:
    varied = entry(fresh_for=60, vary=(("x-tenant", "a, b"),))
    lines = CIMultiDict([("X-Tenant", "a"), ("X-Tenant", " b ")])
    assert isinstance(lookup(varied, lines, RequestControl(), NOW), FreshHit)
    assert isinstance(lookup(varied, {"X-Tenant": "a,b"}, RequestControl(), NOW), FreshHit)
    assert isinstance(lookup(varied, {"X-Tenant": "a, c"}, RequestControl(), NOW), Miss)


def test_merge_304_with_another_etag_selects_nothing() -> None:
    assert merge_304(entry(), [("ETag", '"b"')], NOW, NOW, ()) is None


# --------------------------------------------------------------------------- caller conditionals

STORED = (("ETag", 'W/"x"'), ("Last-Modified", DATE), ("X-Next-Page", "u"), ("X-Other", "1"))


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, {}, False),
        (200, {"If-None-Match": '"x"'}, True),  # weak comparison
        (200, {"If-None-Match": 'W/"x"'}, True),
        (200, {"If-None-Match": '"y", W/"x"'}, True),
        (200, {"If-None-Match": '"y"'}, False),
        (200, {"If-None-Match": "*"}, True),
        (404, {"If-None-Match": "*"}, False),
        (204, {"If-None-Match": "*"}, True),  # any 2xx (RFC 9110 13.2.1)
        (200, CIMultiDict([("If-None-Match", '"y"'), ("If-None-Match", 'W/"x"')]), True),
        (200, {"if-none-match": '"x"'}, True),  # a plain mapping, other case
        (200, {"If-Modified-Since": DATE}, True),
        (200, {"If-Modified-Since": LATER}, True),
        (200, {"If-Modified-Since": EARLIER}, False),
        (200, {"If-Modified-Since": "garbage"}, False),
        (200, {"If-None-Match": '"y"', "If-Modified-Since": LATER}, False),  # INM wins
    ],
)
def test_not_modified(status: int, headers: dict[str, str], expected: bool) -> None:
    assert not_modified(status, STORED, headers) is expected


def test_not_modified_entity_tags_may_hold_commas() -> None:
    stored = (("ETag", '"a,b"'),)
    assert not_modified(200, stored, {"If-None-Match": '"z", "a,b"'})
    assert not not_modified(200, stored, {"If-None-Match": '"a", "b"'})


def test_if_modified_since_falls_back_to_the_stored_date() -> None:
    # RFC 9111 4.3.2: no Last-Modified, so the stored Date stands in.
    assert not_modified(200, (("Date", EARLIER),), {"If-Modified-Since": DATE})
    assert not not_modified(200, (("Date", LATER),), {"If-Modified-Since": DATE})


def test_not_modified_without_an_etag_or_date() -> None:
    assert not not_modified(200, (), {"If-None-Match": '"x"'})
    assert not not_modified(200, (), {"If-Modified-Since": DATE})


def test_not_modified_headers() -> None:
    assert not_modified_headers(STORED) == STORED[:3]


# --------------------------------------------------------------------------- invalidation

ORIGIN = "https://api.kounta.com"


@pytest.mark.parametrize(
    ("method", "path", "status", "headers", "covered", "kept"),
    [
        (
            "PUT",
            "/v1/companies/5/customers/9.json",
            200,
            [],
            [
                "/v1/companies/5/customers/9",
                "/v1/companies/5/customers/9.json",
                "/v1/companies/5/customers.json",
                "/v1/companies/5/customers",
            ],
            ["/v1/companies/5/customers/10.json", "/v1/companies/5/products.json"],
        ),
        (
            "POST",
            "/v1/companies/5/orders.json",
            201,
            [("Location", f"{ORIGIN}/v1/companies/5/orders/77.json")],
            [
                "/v1/companies/5/orders.json",
                "/v1/companies/5/orders/77.json",
                "/v1/companies/5/orders/complete.json",
                "/v1/companies/5/orders/pending/accounts",
                "/v1/companies/5/sites/3/orders.json",
            ],
            ["/v1/companies/5/orders/78.json", "/v1/companies/5/sites/3.json"],
        ),
        (
            "DELETE",
            "/v1/companies/5/products/9",
            None,  # outcome unknown: invalidate anyway
            [("Content-Location", "/v1/companies/5/products/9.json")],
            ["/v1/companies/5/products/9.json", "/v1/companies/5/categories/2/products"],
            ["/v1/companies/5/customers.json"],
        ),
        (
            "POST",
            "/v1/companies/5/orders.json",
            201,
            [("Location", "orders/78.json"), ("Content-Location", "//api.kounta.com/v1/x/1")],
            ["/v1/companies/5/orders/78.json", "/v1/x/1"],  # relative references resolved
            ["/v1/companies/5/orders/79.json"],
        ),
        (
            "PATCH",
            "/v1/companies/5/customers/9.json",
            204,
            [("Location", "https://elsewhere.example/v1/companies/5/x/1")],
            ["/v1/companies/5/customers/9"],
            ["/v1/companies/5/x/1"],
        ),
    ],
)
def test_invalidation(
    method: str,
    path: str,
    status: int | None,
    headers: list[tuple[str, str]],
    covered: list[str],
    kept: list[str],
) -> None:
    inv = invalidation("main", method, path, status, headers, ORIGIN)
    assert isinstance(inv, Invalidation)
    for p in covered:
        assert inv.covers("main", p), p
        assert not inv.covers("other", p), p
    for p in kept:
        assert not inv.covers("main", p), p


@pytest.mark.parametrize(
    ("method", "status"), [("GET", 200), ("HEAD", 200), ("OPTIONS", 204), ("PUT", 404)]
)
def test_no_invalidation(method: str, status: int) -> None:
    assert invalidation("main", method, "/v1/companies/5/x", status, [], ORIGIN) is None


# --------------------------------------------------------------------------- upstream answers


@pytest.mark.parametrize(
    ("stored", "status", "headers", "expected"),
    [
        (True, 304, [("ETag", '"a"')], Freshened),
        (True, 304, [], Freshened),  # a 304 without ETag freshens what was asked about
        (True, 304, [("ETag", '"b"')], Refetch),  # another representation
        (False, 304, [], TakeBody),  # nothing was asked about: passed on as it is
        (True, 429, [], UpstreamFailed),
        (False, 503, [], UpstreamFailed),
        (True, 200, [("ETag", '"b"')], TakeBody),
    ],
)
def test_answered(
    stored: bool, status: int, headers: list[tuple[str, str]], expected: type
) -> None:
    decision = answered(entry() if stored else None, status, headers, NOW, NOW + 1, ())
    assert type(decision) is expected
    if isinstance(decision, Freshened):
        assert decision.entry.response_time == NOW + 1


@pytest.mark.parametrize(("status", "forget"), [(404, True), (410, True), (200, False)])
def test_a_gone_resource_forgets_what_was_stored(status: int, forget: bool) -> None:
    assert answered(entry(), status, [], NOW, NOW, ()) == TakeBody(forget=forget)
    assert answered(None, status, [], NOW, NOW, ()) == TakeBody(forget=False)


def test_no_stale_while_revalidate_at_the_instant_freshness_ends() -> None:
    """Without stale-while-revalidate, a response whose age equals its lifetime is stale
    and must be revalidated; it was once served stale at exactly that instant."""
    stored = entry(fresh_for=0.0)
    assert isinstance(lookup(stored, {}, NO_CONTROL, NOW), Revalidate)
    assert isinstance(
        lookup(entry(fresh_for=0.0, stale_while_revalidate=5.0), {}, NO_CONTROL, NOW), ServeStale
    )
