"""The notes channel's reader (:mod:`proxy.shared.notes`): pub/sub frames (RESP3 pushes and
RESP2 arrays) parsed wherever the bytes are cut, a message too large skipped as it streams by
(never held), other channels' and other kinds' frames ignored, a refused SUBSCRIBE raised to
the listener, and bytes that are not RESP ending the connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.exceptions as rexc

from proxy.shared.notes import MAX_NOTE, Notes, _Heard

CHANNEL = b"p:cache:notes:r1"


class _Transport:
    """What the reader knows of its transport."""

    def __init__(self) -> None:
        self.closed = False
        self.protocol: Any = asyncio.Protocol()

    def get_protocol(self) -> Any:
        return self.protocol

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def close(self) -> None:
        self.closed = True


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _push(kind: bytes, channel: bytes, last: bytes, mark: bytes = b">") -> bytes:
    return mark + b"3\r\n" + _bulk(kind) + _bulk(channel) + last


def _message(data: bytes, channel: bytes = CHANNEL, mark: bytes = b">") -> bytes:
    return _push(b"message", channel, _bulk(data), mark)


def _reader() -> tuple[Notes, _Heard, _Transport, list[bytes]]:
    notes = Notes(None, CHANNEL.decode(), 1.0)
    heard: list[bytes] = []
    notes.deliver = heard.append  # type: ignore[method-assign]
    transport = _Transport()
    return notes, _Heard(notes, None, transport), transport, heard


STREAM = b"".join(
    (
        _push(b"subscribe", CHANNEL, b":1\r\n"),
        _message(b"a|one"),
        _message(b"b|other channel", channel=CHANNEL + b"x"),
        _message(b"c|two", mark=b"*"),  # RESP2's form
        _message(b""),
        _push(b"unsubscribe", CHANNEL, b":0\r\n"),
        _message(b"d|" + b"\r\n" * 20),
    )
)
HEARD = [b"a|one", b"c|two", b"", b"d|" + b"\r\n" * 20]


async def test_frames_are_read_wherever_they_are_cut() -> None:
    for cut in range(len(STREAM) + 1):
        _, reader, transport, heard = _reader()
        reader.data_received(STREAM[:cut])
        reader.data_received(STREAM[cut:])
        assert heard == HEARD, cut
        assert reader.confirmed.done() and not transport.closed
    _, reader, transport, heard = _reader()
    for at in range(len(STREAM)):
        reader.data_received(STREAM[at : at + 1])
    assert heard == HEARD
    assert reader.rest == b""


async def test_a_message_too_large_is_skipped_as_it_comes_never_held() -> None:
    large = _message(b"h|" + b"x" * (MAX_NOTE + 10))
    stream = _message(b"a|before") + large + _message(b"b|after")
    start = len(_message(b"a|before"))
    for cuts in ([], [start + 30], [start + 20, start + 40_000], [len(stream) - 30]):
        _, reader, transport, heard = _reader()
        at = 0
        for cut in [*cuts, len(stream)]:
            reader.data_received(stream[at:cut])
            assert len(reader.rest) < 100  # the large message's bytes are not kept
            at = cut
        assert heard == [b"a|before", b"b|after"], cuts
        assert not transport.closed
    _, reader, _, heard = _reader()
    for at in range(0, len(stream), 1000):  # arriving in many small reads
        reader.data_received(stream[at : at + 1000])
        assert len(reader.rest) < 1100
    assert heard == [b"a|before", b"b|after"]


async def test_a_refused_subscribe_is_raised_and_ends_the_connection() -> None:
    _, reader, transport, _ = _reader()
    reader.data_received(b"-NOPERM this user has no permissions to access one of the channels\r\n")
    with pytest.raises(rexc.NoPermissionError):
        await reader.confirmed
    assert transport.closed
    assert isinstance(reader.lost.result(), rexc.NoPermissionError)


@pytest.mark.parametrize(
    "data",
    [
        b"$5\r\nhello\r\n",  # not a frame of pub/sub
        b">9\r\n",  # more items than any
        b">3\r\n#t\r\n",  # an item of a kind no frame has
        b">3\r\n$99999999\r\n" + b"x" * 10,  # too large, and not the last item
        b">" + b"1" * 2000,  # a line longer than any
    ],
)
async def test_bytes_that_are_not_pub_sub_frames_end_the_connection(data: bytes) -> None:
    _, reader, transport, heard = _reader()
    reader.data_received(_push(b"subscribe", CHANNEL, b":1\r\n"))
    reader.data_received(data)
    assert transport.closed
    assert isinstance(reader.lost.result(), rexc.ConnectionError)
    assert heard == []
