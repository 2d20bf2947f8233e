"""A 304's merge into the stored entry, its header work remembered (proxy.cache.validation
merge_304): the same entries as merging from scratch every time, whatever the headers, the
rules and the response time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from proxy.cache import validation
from proxy.cache.entry import Entry
from proxy.cache.fields import directives
from proxy.cache.storable import initial_age, reuse_windows, rule_for, storable_headers
from proxy.cache.validation import NOT_UPDATED_BY_304, merge_304, weak_match
from proxy.settings import CacheRule
from tests.unit.test_cache_policy import entry

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
    return entry(headers=tuple(headers), request_time=NOW - 100, response_time=NOW - 100)


def merged_from_scratch(
    old: Entry,
    headers: Sequence[tuple[str, str]],
    request_time: float,
    response_time: float,
    rules: Sequence[CacheRule],
) -> Entry | None:
    """RFC 9111 4.3.4 from scratch: what merge_304 gave before it remembered anything."""
    tags = [v for k, v in headers if k.lower() == "etag"]
    if tags and old.etag is not None and not weak_match(tags[0], old.etag):
        return None
    fresh = [
        pair for pair in storable_headers(headers) if pair[0].lower() not in NOT_UPDATED_BY_304
    ]
    names = {name.lower() for name, _ in fresh}
    fields = (*[pair for pair in old.headers if pair[0].lower() not in names], *fresh)
    lines = [v for k, v in fields if k.lower() == "cache-control"]
    rule = rule_for(old.path, rules)
    return replace(
        old,
        headers=fields,
        request_time=request_time,
        response_time=response_time,
        initial_age=initial_age(headers, request_time, response_time),
        **reuse_windows(directives(lines), fields, response_time, rule),
    )


@given(kept=FIELDS, sent=FIELDS, rules=RULES, later=st.sampled_from([0.0, 7.0, 86_400.0]))
def test_remembered_and_fresh_merges_agree(
    kept: list[tuple[str, str]],
    sent: list[tuple[str, str]],
    rules: tuple[CacheRule, ...],
    later: float,
) -> None:
    kept_entry = stored(kept)
    # The same 304 twice (the second from the memo), then later: an Expires without a Date
    # counts from the response time, which the memo must not keep.
    for at in (NOW, NOW, NOW + later):
        expected = merged_from_scratch(kept_entry, sent, at - 1, at, rules)
        assert merge_304(kept_entry, tuple(sent), at - 1, at, rules) == expected
        assert merge_304(kept_entry, list(sent), at - 1, at, list(rules)) == expected


def test_the_same_304_again_is_merged_from_the_memo() -> None:
    kept = stored((("ETag", '"a"'), ("Content-Type", "application/json")))
    sent = (("ETag", '"a"'), ("Date", DATE), ("Cache-Control", "max-age=0"))
    first = merge_304(kept, sent, NOW, NOW, ())
    hits = validation._merged_304.cache_info().hits
    again = merge_304(kept, sent, NOW + 1, NOW + 2, ())
    assert validation._merged_304.cache_info().hits == hits + 1
    assert first is not None and again is not None
    assert again.headers == first.headers and again.response_time == NOW + 2
    assert again.initial_age == 2.0  # its own age, from its Date and its response time


def test_an_expires_without_date_counts_from_each_response_time() -> None:
    expires = "Tue, 14 Nov 2023 22:14:20 GMT"  # NOW + 60
    kept = stored((("ETag", '"a"'),))
    sent = (("Expires", expires),)
    first = merge_304(kept, sent, NOW, NOW, ())
    later = merge_304(kept, sent, NOW + 10, NOW + 10, ())
    assert first is not None and later is not None
    assert (first.fresh_for, later.fresh_for) == (60.0, 50.0)
