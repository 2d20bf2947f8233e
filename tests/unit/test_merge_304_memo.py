"""A 304's merge into the stored entry, its header work remembered (proxy.cache.policy
merge_304): the same entries as merging from scratch every time, whatever the headers, the
rules and the response time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.cache import policy
from proxy.cache.policy import (
    NOT_UPDATED_BY_304,
    Entry,
    directives,
    initial_age,
    merge_304,
    rule_for,
    storable_headers,
    weak_match,
)
from proxy.settings import CacheRule

NOW = 1_700_000_000.0
DATE = "Tue, 14 Nov 2023 22:13:20 GMT"  # == NOW
NAMES = ["ETag", "etag", "Date", "Expires", "Cache-Control", "Age", "Content-Type"]
NAMES += ["Connection", "X-Next-Page", "Content-Length"]
VALUES = ['"a"', 'W/"a"', '"b"', DATE, "Tue, 14 Nov 2023 22:14:20 GMT", "nonsense"]
VALUES += ["max-age=60", "no-cache", "stale-while-revalidate=5, stale-if-error=9"]
VALUES += ["must-revalidate", "30", "X-Next-Page", "text/plain"]
FIELDS = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=6)
RULES = st.sampled_from([(), (CacheRule("/v1/*", 12, stale_if_error=3),)])


def stored(headers: Sequence[tuple[str, str]]) -> Entry:
    return Entry(
        status=200,
        headers=tuple(headers),
        account="main",
        path="/v1/companies/5/customers.json",
        request_time=NOW - 100,
        response_time=NOW - 100,
        initial_age=0.0,
        fresh_for=0.0,
        stale_if_error=0.0,
        stale_while_revalidate=0.0,
        strict=False,
        vary=(),
        size=2,
    )


def merged_from_scratch(
    entry: Entry,
    headers: Sequence[tuple[str, str]],
    request_time: float,
    response_time: float,
    rules: Sequence[CacheRule],
) -> Entry | None:
    """RFC 9111 4.3.4 as merge_304 did it before it remembered anything."""
    new_tag = next((v for k, v in headers if k.lower() == "etag"), None)
    if new_tag is not None and entry.etag is not None and not weak_match(new_tag, entry.etag):
        return None
    updates = [(k, v) for k, v in storable_headers(headers) if k.lower() not in NOT_UPDATED_BY_304]
    replaced = {k.lower() for k, _ in updates}
    merged = tuple((k, v) for k, v in entry.headers if k.lower() not in replaced) + tuple(updates)
    cc = directives([v for k, v in merged if k.lower() == "cache-control"])
    reuse: dict[str, Any] = policy._reuse(cc, merged, response_time, rule_for(entry.path, rules))
    return replace(
        entry,
        headers=merged,
        request_time=request_time,
        response_time=response_time,
        initial_age=initial_age(headers, request_time, response_time),
        **reuse,
    )


@given(kept=FIELDS, sent=FIELDS, rules=RULES, later=st.sampled_from([0.0, 7.0, 86_400.0]))
def test_remembered_and_fresh_merges_agree(
    kept: list[tuple[str, str]],
    sent: list[tuple[str, str]],
    rules: tuple[CacheRule, ...],
    later: float,
) -> None:
    entry = stored(kept)
    # The same 304 twice (the second from the memo), then later: an Expires without a Date
    # counts from the response time, which the memo must not keep.
    for at in (NOW, NOW, NOW + later):
        expected = merged_from_scratch(entry, sent, at - 1, at, rules)
        assert merge_304(entry, tuple(sent), at - 1, at, rules) == expected
        assert merge_304(entry, list(sent), at - 1, at, list(rules)) == expected


def test_the_same_304_again_is_merged_from_the_memo() -> None:
    entry = stored((("ETag", '"a"'), ("Content-Type", "application/json")))
    sent = (("ETag", '"a"'), ("Date", DATE), ("Cache-Control", "max-age=0"))
    first = merge_304(entry, sent, NOW, NOW, ())
    hits = policy._merged_304.cache_info().hits
    again = merge_304(entry, sent, NOW + 1, NOW + 2, ())
    assert policy._merged_304.cache_info().hits == hits + 1
    assert first is not None and again is not None
    assert again.headers == first.headers and again.response_time == NOW + 2
    assert again.initial_age == 2.0  # its own age, from its Date and its response time


def test_an_expires_without_date_counts_from_each_response_time() -> None:
    expires = "Tue, 14 Nov 2023 22:14:20 GMT"  # NOW + 60
    entry = stored((("ETag", '"a"'),))
    sent = (("Expires", expires),)
    first = merge_304(entry, sent, NOW, NOW, ())
    later = merge_304(entry, sent, NOW + 10, NOW + 10, ())
    assert first is not None and later is not None
    assert (first.fresh_for, later.fresh_for) == (60.0, 50.0)
