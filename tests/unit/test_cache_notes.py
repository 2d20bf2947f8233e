"""A fetch lock owner's note (proxy.cache.notes) is read like a record: only its own shape,
for the key and lock asked for, with checked header lines and times."""

from __future__ import annotations

import json

import pytest

from proxy.cache.notes import MAX_NOTE, Note, decode, encode
from proxy.cache.records import BadRecord

NOTE = Note("holder", "key", "304", (("If-None-Match", '"v1"'),), (("ETag", '"v1"'),), 1.5, 2.5)


def fields() -> dict[str, object]:
    data = encode(NOTE)
    assert data is not None
    parsed: dict[str, object] = json.loads(data)
    return parsed


def test_a_note_reads_back_as_written() -> None:
    data = encode(NOTE)
    assert data is not None
    assert decode(data, "key", "holder") == NOTE


@pytest.mark.parametrize(("key", "holder"), [("another key", "holder"), ("key", "another holder")])
def test_a_note_for_another_key_or_lock_is_refused(key: str, holder: str) -> None:
    data = encode(NOTE)
    assert data is not None
    with pytest.raises(BadRecord):
        decode(data, key, holder)


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"got": "200"},
        {"headers": [["Bad Name", "x"]]},
        {"headers": [["ETag", "a\r\nSet-Cookie: x"]]},
        {"headers": [["ETag"]]},
        {"sent": "If-None-Match"},
        {"response_time": -1},
        {"request_time": "1"},
        {"owner": 7},
        {"headers": [["X", "y"]] * 201},
    ],
)
def test_a_damaged_note_is_refused(change: dict[str, object]) -> None:
    data = json.dumps({**fields(), **change}).encode()
    with pytest.raises(BadRecord):
        decode(data, "key", "holder")


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100 + b"]" * 100,
        b'{"v": 1, "response_time": NaN}',
        b'{"v": 1, "response_time": 1e999}',
        b"not json",
        b"x" * (MAX_NOTE + 1),
    ],
)
def test_hostile_bytes_are_refused_without_a_traceback(data: bytes) -> None:
    with pytest.raises(BadRecord):
        decode(data, "key", "holder")


def test_a_note_too_large_to_send_is_not_sent() -> None:
    huge = Note("holder", "key", "304", (), (("X-Pad", "x" * MAX_NOTE),), 1.0, 1.0)
    assert encode(huge) is None
