"""One resource, one key, one invalidation, whatever its spelling (RFC 3986 6.2.2)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.cache.invalidation import invalidation
from proxy.cache.keys import KEY_VERSION, SELECTING, cache_key, key_prefix, parse_key
from proxy.target import normal_escapes

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


# Any text: quotes, backslashes, control characters, DEL, non-ASCII, astral characters and
# lone surrogates (what a decoded header or an escaped target could hold); ASCII alone and
# the characters JSON escapes among plain ones, often, so that each escape is met alone.
ANY_TEXT = st.one_of(
    st.text(alphabet=st.sampled_from([chr(c) for c in range(0x80)]), max_size=12),
    st.text(
        alphabet=st.sampled_from('"\\\x00\x08\x1f\x7f\x80a/%~\u2028\ud800\udfff\U0001f600'),
        max_size=6,
    ),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=12),  # surrogates too
)


def old_key(account: str, path: str, query: str, selected: list[str | None]) -> str:
    """The key as json.dumps wrote it (the format every stored key has)."""
    parts = [KEY_VERSION, account, "GET", normal_escapes(path), normal_escapes(query), selected]
    return json.dumps(parts, separators=(",", ":"))


@given(
    ANY_TEXT, ANY_TEXT, ANY_TEXT, st.lists(st.one_of(st.none(), ANY_TEXT), min_size=3, max_size=3)
)
def test_a_key_is_json_dumps_byte_for_byte(
    account: str, path: str, query: str, selected: list[str | None]
) -> None:
    """Keys were written by json.dumps: stored entries and invalidations' prefixes must find
    the same text whatever the parts hold."""
    headers = {
        name: value for name, value in zip(SELECTING, selected, strict=True) if value is not None
    }
    key = cache_key(account, path, query, headers)
    assert key == old_key(account, path, query, selected)
    # Parsed back as json.loads reads it (a surrogate pair's two escapes read as one character)
    assert parse_key(key) == parse_key(old_key(account, path, query, selected)) is not None


@given(ANY_TEXT, ANY_TEXT, ANY_TEXT)
def test_a_key_prefix_is_json_dumps_and_begins_the_keys_it_covers(
    account: str, path: str, more: str
) -> None:
    old = json.dumps([KEY_VERSION, account, "GET", path], separators=(",", ":"))[:-2]
    assert key_prefix(account, path) == old
    key = cache_key(account, path + more, "", {})
    if normal_escapes(path + more) == path + more:  # no escape to normalise: its own path
        assert key.startswith(key_prefix(account, path))
