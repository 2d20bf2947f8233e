"""One resource, one key, one invalidation, whatever its spelling (RFC 3986 6.2.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.cache.invalidation import invalidation
from proxy.cache.keys import cache_key

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
SEGMENT = st.text(alphabet=ALNUM + "-_~", min_size=1, max_size=8)
PATHS = st.lists(SEGMENT, min_size=1, max_size=4).map(lambda s: "/v1/" + "/".join(s))
QUERIES = st.lists(st.tuples(SEGMENT, SEGMENT), max_size=3).map(
    lambda pairs: "&".join(f"{k}={v}" for k, v in pairs)
)


def respell(text: str, data: st.DataObject) -> str:
    """Escape some unreserved characters (either hex case): the same URI (RFC 3986 6.2.2.2)."""
    out = []
    for char in text:
        if char in ALNUM + "-_~" and data.draw(st.booleans()):
            escape = f"%{ord(char):02x}"
            out.append(escape.upper() if data.draw(st.booleans()) else escape)
        else:
            out.append(char)
    return "".join(out)


@pytest.mark.no_cover  # generated spellings: coverage's tracing would double their time
@given(PATHS, QUERIES, st.data())
def test_every_spelling_has_one_key(path: str, query: str, data: st.DataObject) -> None:
    other_path, other_query = respell(path, data), respell(query, data)
    headers = {"Accept": "application/json"}
    assert cache_key("a", other_path, other_query, headers) == cache_key("a", path, query, headers)


@pytest.mark.no_cover  # generated spellings: coverage's tracing would double their time
@given(PATHS, st.data())
def test_a_write_in_one_spelling_covers_every_other(path: str, data: st.DataObject) -> None:
    written = respell(path, data)
    inv = invalidation("a", "PUT", written, 200, (), "https://api.kounta.com")
    assert inv is not None
    assert inv.covers("a", respell(path, data))
    assert inv.covers("a", respell(path, data) + ".json")
    assert not inv.covers("b", path)


def test_escapes_of_reserved_characters_stay_distinct() -> None:
    # "%2F" is not "/" and "%3D" is not "=": only their hex case is normalised.
    assert cache_key("a", "/v1/x", "q=a%2fb", {}) == cache_key("a", "/v1/x", "q=a%2Fb", {})
    assert cache_key("a", "/v1/x", "q=a%2Fb", {}) != cache_key("a", "/v1/x", "q=a/b", {})
    assert cache_key("a", "/v1/x", "q%3D1", {}) != cache_key("a", "/v1/x", "q=1", {})
