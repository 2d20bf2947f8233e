"""The fast path's one pass over a GET's headers: plain or not, and the selecting values."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.keys import SELECTING
from proxy.coding import GZIP, IDENTITY
from proxy.edge.fast import _coding, _plain_headers


def headers(*items: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


@pytest.mark.parametrize(
    "items",
    [
        (),
        (("Host", "x"),),
        (("accept", "application/json"), ("X-PAGE", "3")),
        (("Accept", "text/é, */*"), ("x-pretty-print", "1"), ("Host", "x")),
        (("X-Page", ""), ("Accept-Encoding", "gzip")),
    ],
)
def test_the_selecting_values_are_what_the_headers_give_each(
    items: tuple[tuple[str, str], ...],
) -> None:
    """The values the cache key is made of, as ``headers.get`` gives each (any case)."""
    found = headers(*items)
    assert _plain_headers(found) == tuple(map(found.get, SELECTING))


@pytest.mark.parametrize(
    "items",
    [
        (("Accept", "a"), ("accept", "b")),  # a selecting header on two lines
        (("Cache-Control", "no-cache"),),  # the long way's
        (("X-Page", "caf\udce9"),),  # not UTF-8 on the wire
    ],
)
def test_headers_the_long_way_takes_give_no_values(items: tuple[tuple[str, str], ...]) -> None:
    assert _plain_headers(headers(*items)) is None


class Hashed(tuple[tuple[str, str], ...]):
    """A stored header tuple that counts how often it is hashed."""

    hashed = 0

    def __hash__(self) -> int:
        Hashed.hashed += 1
        return super().__hash__()


def test_a_stored_entrys_coding_is_known_by_identity_and_never_mixed_up() -> None:
    """The coding the fast path reads of an entry's headers (every fresh hit and every joiner
    of a flight carries the entry's one tuple): never hashed (no memo by value: a held
    entry's fresh hits find it on the entry's record, proxy.cache.memory.Kept); another
    entry's tuple, equal but for its coding, gets its own."""
    gzipped = Hashed((("Content-Type", "application/json"), ("Content-Encoding", "gzip")))
    plain = Hashed((("Content-Type", "application/json"), ("Content-Encoding", "identity")))
    Hashed.hashed = 0
    assert _coding(gzipped) == GZIP
    assert [_coding(gzipped) for _ in range(3)] == [GZIP] * 3
    assert Hashed.hashed == 0  # known by identity, found by reading it
    assert _coding(plain) == IDENTITY and _coding(gzipped) == GZIP
    assert _coding(tuple(gzipped)) == GZIP  # an equal copy: by value, as before
