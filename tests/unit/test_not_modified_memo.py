"""The 304 decision and headers, remembered per stored header set and per If-None-Match line
(proxy.cache.validation): the same answers as parsing every time, whatever the input's shape."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.cache import validation
from proxy.cache.validation import MEMO_TAGS, not_modified, not_modified_headers

TAGS = ['"a"', 'W/"a"', '"b"', "*", '"a", "b"', 'W/"b", "a"', "x", ""]
STORED = st.lists(
    st.tuples(
        st.sampled_from(["ETag", "etag", "Content-Type", "Vary", "Date", "X-Next-Page"]),
        st.sampled_from(['"a"', 'W/"a"', '"b"', "text/plain", "Accept", "2"]),
    ),
    max_size=6,
)


@given(
    stored=STORED,
    lines=st.lists(st.sampled_from([*TAGS, '"a", ' + '"z", ' * MEMO_TAGS]), max_size=3),
)
def test_remembered_and_parsed_answers_agree(
    stored: list[tuple[str, str]], lines: list[str]
) -> None:
    headers = CIMultiDict([("If-None-Match", line) for line in lines])
    as_tuple, as_list = tuple(stored), list(stored)
    for _ in range(2):  # the second time from the memo
        assert not_modified(200, as_tuple, headers) == not_modified(200, as_list, headers)
        assert not_modified_headers(as_tuple) == not_modified_headers(as_list)
    assert not_modified(404, as_tuple, headers) is False


def test_a_long_if_none_match_line_still_matches() -> None:
    line = '"z", ' * MEMO_TAGS + '"a"'
    assert not_modified(200, (("ETag", '"a"'),), CIMultiDict({"If-None-Match": line}))
    assert not not_modified(200, (("ETag", '"b"'),), CIMultiDict({"If-None-Match": line}))


def test_the_last_entrys_answers_are_known_by_identity_and_never_mixed_up() -> None:
    # Two entries' header tuples, equal but for the ETag, asked about in turn: each its own.
    one = (("ETag", '"a"'), ("Content-Type", "application/json"), ("X-Other", "u"))
    other = (("ETag", '"b"'), ("Content-Type", "application/json"), ("X-Other", "u"))
    caller = CIMultiDict({"If-None-Match": '"a"'})
    for _ in range(2):
        assert not_modified(200, one, caller) is True
        assert validation._etag.last is not None and validation._etag.last[0] is one
        assert not_modified(200, other, caller) is False
        assert not_modified_headers(one) == (("ETag", '"a"'),)
        assert not_modified_headers(other) == (("ETag", '"b"'),)
    # A copy equal by value (another entry's tuple) is answered by value, as before.
    copy = tuple(pair for pair in one)
    assert not_modified(200, copy, caller) is True


@given(line=st.sampled_from([*TAGS, '"a" , W/"b"', 'W/"a", *']), etag=st.sampled_from(TAGS))
def test_a_remembered_line_matches_as_its_parsed_tags_do(line: str, etag: str) -> None:
    for exists in (True, False):
        parsed = validation._tags_match(validation._tags((line,)), etag or None, exists)
        assert validation._line_matches(line, etag or None, exists) is parsed
