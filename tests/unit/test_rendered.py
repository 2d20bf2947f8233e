"""An answer's head rendered once per shape (proxy.edge.rendered): filled in, byte for byte
what the long way's functions render for the same answer (caller_view, answer_headers,
render_response), for every shape; a shape whose stored headers hold a slot's text has no
template."""

from __future__ import annotations

import gzip
import tracemalloc
from dataclasses import dataclass
from typing import Any

import pytest
from yarl import URL

from proxy.cache.validation import not_modified_headers
from proxy.compat.aiohttp import render_response
from proxy.edge.answer import HeaderItems, _view, answer_headers, header_view
from proxy.edge.rendered import SLOTS, Place, fill, template
from proxy.headers import SERVER_NAME
from proxy.messages import CacheStatus

UPSTREAM = URL("https://api.kounta.com")
PLACES: dict[str, Place] = {}
DATE = "Sun, 06 Dec 2026 02:00:00 GMT"
BODY = b'{"id": 1, "name": "50% off"}'
STORED: HeaderItems = (
    ("Content-Type", "application/json"),
    ("ETag", '"v1"'),
    ("Cache-Control", "max-age=60"),
    ("Link", '<https://api.kounta.com/v1/companies/5/products.json?page=2>; rel="next"'),
)
GZIPPED: HeaderItems = (
    ("Content-Type", "application/json"),
    ("Content-Encoding", "gzip"),
    ("ETag", '"v2"'),
)


@dataclass(frozen=True)
class Answer:
    status: int
    items: HeaderItems
    public: str  # the configured public URL ("": the caller's Host)
    host: str
    accepts: bool  # the caller takes gzip
    cache_status: CacheStatus
    member: str  # Cache-Status ("": the X-Cache value's)
    caller: str  # X-Proxy-Caller
    body: bytes

    def where(self) -> tuple[str, str]:
        return ("", "") if self.public else ("http", self.host)


def long_way(a: Answer, rid: str, age: int) -> bytes:
    """What FastPath._respond renders without a template."""
    shown, _ = header_view(a.items, UPSTREAM, a.public, *a.where(), a.accepts)
    headers = answer_headers(shown, rid, a.cache_status, age, caller=a.caller, cache=a.member)
    headers["Server"] = SERVER_NAME
    return render_response(a.status, headers, a.body, date=DATE)


def templated(a: Answer, rid: str, age: int) -> bytes | None:
    place = PLACES.setdefault(a.public, Place(UPSTREAM, a.public))
    shape = template(
        a.status, a.items, place, *a.where(), a.accepts, a.cache_status, a.member, a.caller,
        len(a.body),
    )  # fmt: skip
    return None if shape is None else fill(shape, rid, age, DATE.encode(), a.body)


SHAPES = [
    # status, stored headers, public URL, Host, takes gzip, X-Cache, Cache-Status, caller, body
    (200, STORED, "", "proxy:8080", False, "HIT", "", "app; account=5", BODY),
    (200, STORED, "https://proxy.example", "", False, "HIT", "", "", BODY),
    (200, STORED, "", "other:1", True, "REVALIDATED", "kounta-proxy; fwd=stale", "", b""),
    (200, GZIPPED, "", "proxy", True, "HIT", "", "app", gzip.compress(BODY)),
    (200, GZIPPED, "", "proxy", False, "HIT", "", "app", BODY),
    (304, not_modified_headers(STORED), "", "proxy", False, "HIT", "", "app", b""),
    (304, not_modified_headers(GZIPPED), "", "proxy", False, "REVALIDATED", "", "", b""),
    # A stored Date, Age, Cache-Status, X-Request-ID and a "%" in a value: kept in place.
    (
        200,
        (
            *STORED,
            ("Date", "Sat, 05 Dec 2026 01:00:00 GMT"),
            ("Cache-Status", "upstream; hit"),
            ("X-Request-ID", "theirs"),
            ("X-Discount", "100%d %(rid)s %%"),
        ),
        "",
        "proxy",
        False,
        "HIT",
        "",
        "app",
        BODY,
    ),
    (200, (("Content-Length", "28"), *STORED), "", "proxy", False, "HIT", "", "", BODY),
    (204, STORED, "", "proxy", False, "HIT", "", "", b""),
    (200, STORED, "", "proxy", False, "HIT", "", "", b"%" * 70_000),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("rid", "age"), [("abc-1", 0), ("0f" * 16, 12345)])
def test_a_filled_template_is_what_the_long_way_renders(
    shape: tuple[Any, ...], rid: str, age: int
) -> None:
    answer = Answer(*shape)
    assert templated(answer, rid, age) == long_way(answer, rid, age)


@pytest.mark.parametrize("name", [slot for _, _, slot in SLOTS])
def test_stored_headers_holding_a_slot_give_no_template(name: str) -> None:
    items = (*STORED, ("X-Note", f"see {name}"))
    answer = Answer(200, items, "", "proxy", False, "HIT", "", "", BODY)
    assert templated(answer, "rid-1", 3) is None
    assert b"see " + name.encode() in long_way(answer, "rid-1", 3)


def test_a_shapes_first_render_makes_no_body() -> None:
    """A shape's head was learnt by rendering a body of its length (zeros) and cutting the
    head off: 8 KB made and copied at each key's first fresh hit, a megabyte for a megabyte's
    answer. Now only the head is made."""
    place = PLACES.setdefault("", Place(UPSTREAM, ""))
    template.cache_clear()
    tracemalloc.start()
    try:
        shape = template(200, STORED, place, "http", "p", False, "HIT", "", "", 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert shape is not None and shape[1] and b"Content-Length: 1048576\r\n" in shape[0]
    assert peak < 64 * 1024


def test_a_shapes_first_render_leaves_the_long_ways_view_memo_alone() -> None:
    """Each key's first fresh hit makes its shape once (the template's own memo keeps it):
    through ``_view``'s memo of 1,024 views it only missed, and with more keys than that
    pushed out the views the long way asks again."""
    place = PLACES.setdefault("", Place(UPSTREAM, ""))
    before = _view.cache_info()
    for i in range(3):
        items = (*STORED, ("Content-Length", str(i)))
        assert template(200, items, place, "http", "p", False, "HIT", "", "", i) is not None
    assert _view.cache_info() == before
