"""The fast path's one pass over a GET's headers: plain or not, and the selecting values."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.keys import SELECTING
from proxy.edge.fast import _plain_headers


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
