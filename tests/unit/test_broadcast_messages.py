"""Messages read from the invalidation channel are untrusted: whatever arrives, the decoder
gives a change or raises BadMessage, nothing else (hypothesis)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache.broadcast import BadMessage, decode, encode
from proxy.cache.invalidation import Invalidation, Purge

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=30,
)
FIELDS = st.sampled_from(["v", "account", "paths", "lists_of", "patterns", "purge", "x"])


def outcome(data: bytes) -> object:
    try:
        return decode(data)
    except BadMessage:
        return None


@given(st.binary(max_size=2000))
def test_any_bytes_are_a_change_or_refused(data: bytes) -> None:
    assert outcome(data) is None or isinstance(outcome(data), Invalidation | Purge)


@pytest.mark.no_cover  # generated objects: coverage's tracing would double the time
@settings(max_examples=300)
@given(st.dictionaries(FIELDS, JSON, max_size=6))
def test_any_object_with_the_right_names_is_a_change_or_refused(body: dict[str, Any]) -> None:
    change = outcome(json.dumps(body).encode())
    if change is not None:
        assert isinstance(change, Invalidation | Purge)
        assert decode(encode(change)) == change  # what is read can be written back


@given(st.integers(min_value=5, max_value=50_000), st.sampled_from(["[", '{"a":']))
def test_nesting_past_the_limit_is_refused_without_parsing(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    data = (opener * depth + "1" + closer * depth).encode()
    assert outcome(data) is None
