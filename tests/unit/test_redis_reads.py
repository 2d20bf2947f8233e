"""The pure parts of the Redis tier's read path: the record MAC, the reply parser of
:mod:`proxy.shared.reads` (replies cut anywhere by the network) and the remembered parse of a
record's header in :func:`proxy.cache.records.decode` (what is remembered never lets a
record through that the full checks refuse)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools

import pytest
import redis.exceptions as rexc
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st

from proxy.cache.entry import Entry
from proxy.cache.memory import Stored
from proxy.cache.records import MEMO_SIZE, BadRecord, _parsed, _verified, decode, encode
from proxy.shared.reads import HEAD, LARGER, WRONG, _command, _read, _replies
from proxy.shared.reads import READ as READ_KIND
from proxy.shared.records import BadRecord as SharedBadRecord
from proxy.shared.records import RecordKeys, mac_key
from proxy.shared.wire import Wire

REPLIES = b"$5\r\nhello\r\n:1\r\n$0\r\n\r\n-WRONGTYPE no\r\n$-1\r\n:42\r\n"


def test_replies_of_every_kind_are_read() -> None:
    first, at = _replies(REPLIES, 0, 3) or ([], 0)
    assert first == [b"hello", 1, b""]
    second, end = _replies(REPLIES, at, 3) or ([], 0)
    assert isinstance(second[0], rexc.ResponseError) and str(second[0]) == "WRONGTYPE no"
    assert second[1:] == [None, 42] and end == len(REPLIES)


@given(st.integers(min_value=0, max_value=len(REPLIES) - 1))
def test_replies_cut_anywhere_are_not_whole_until_they_are(cut: int) -> None:
    whole = _replies(REPLIES, 0, 6)
    assert whole is not None and whole[1] == len(REPLIES)
    part = _replies(REPLIES[:cut], 0, 6)
    assert part is None


def test_a_reply_of_another_kind_fails_the_connection() -> None:
    with pytest.raises(rexc.ConnectionError):
        _replies(b"%1\r\n:1\r\n:2\r\n", 0, 1)  # a map: no call gets one


def test_the_command_is_three_plain_commands() -> None:
    assert _command(b"k:1").split(b"\r\n")[:6] == [b"*2", b"$6", b"STRLEN", b"$3", b"k:1", b"*4"]
    assert b"GETRANGE" in _command(b"k") and _command(b"k").endswith(b"EXISTS\r\n$1\r\nk\r\n")


ENTRY = Entry(200, (("ETag", '"1"'),), "main", "/v1/x", 1.0, 2.0, 0.0, 60.0, 0.0, 0.0,
              False, (), 3)  # fmt: skip


def test_a_remembered_header_still_checks_key_size_and_crc() -> None:
    record = encode("k1", Stored(ENTRY, b"abc"))
    assert decode("k1", record).body == b"abc"
    assert decode("k1", record).entry == ENTRY  # the second time remembered
    with pytest.raises(BadRecord, match="another key"):
        decode("k2", record)
    with pytest.raises(BadRecord, match="CRC32"):
        decode("k1", record[:-1] + b"X")
    with pytest.raises(BadRecord, match="size"):
        decode("k1", record + b"d")


def test_the_headers_of_thousands_of_keys_read_in_turn_are_each_parsed_once() -> None:
    """Each record's header names its key: a replica reading 3,000 keys from Redis in turn
    (the memory tier holding none) parses each header once, not on every read."""
    records = [(f"key-{n}", encode(f"key-{n}", Stored(ENTRY, b"abc"))) for n in range(3000)]
    for key, record in records:
        decode(key, record)
    parsed = _parsed.cache_info().misses
    for key, record in records:
        assert decode(key, record).body == b"abc"
    assert _parsed.cache_info().misses == parsed


def test_a_remembered_tag_answers_only_its_key_and_size_and_is_bounded() -> None:
    """A record remembered by its verified tag (:func:`decode`) is that record for its own
    key and length only; the memo keeps the last ``MEMO_SIZE`` tags."""
    record = encode("k1", Stored(ENTRY, b"abc"))
    tag = b"t" * 32
    assert decode("k1", record, tag).body == b"abc"
    assert _verified[tag][0] == "k1"
    with pytest.raises(BadRecord, match="another key"):
        decode("k2", record, tag)
    with pytest.raises(BadRecord, match="wrong size"):
        decode("k1", record + b"d", tag)
    for n in range(MEMO_SIZE):
        decode("k1", record, n.to_bytes(32, "big"))
    assert tag not in _verified and len(_verified) == MEMO_SIZE


def test_a_bad_header_is_refused_every_time() -> None:
    record = encode("k1", Stored(ENTRY, b"abc"))
    bad = record.replace(b'"status":200', b'"status":999')
    for _ in range(2):
        with pytest.raises(BadRecord, match="damaged"):
            decode("k1", bad)


def test_the_record_mac_is_hmac_sha256_of_context_nul_payload_under_either_key() -> None:
    """The HMAC state set up once per key gives the envelope's documented tag, for the
    current key and (reading only) the previous one, and never mixes the two."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    context, payload = b"p:cache:main:e:d1", b"KPC1\n" + b"x" * 9000
    sealed = RecordKeys.derive(old).seal(context, payload)
    tag = hmac.new(mac_key(old), context + b"\0" + payload, hashlib.sha256).digest()
    assert sealed == b"KPR2" + tag + payload
    rotated = RecordKeys.derive(new, old)
    assert rotated.open(context, sealed) == payload  # the previous key still reads
    assert rotated.open(context, rotated.seal(context, payload)) == payload
    with pytest.raises(SharedBadRecord):
        RecordKeys.derive(new).open(context, sealed)
    with pytest.raises(SharedBadRecord):
        rotated.open(b"p:cache:main:e:d2", sealed)  # copied to another key
    with pytest.raises(SharedBadRecord):
        rotated.open(context, sealed[:-1] + b"y")


@pytest.mark.parametrize(
    "reply",
    [
        b"$65537\r\n",  # a bulk string longer than GETRANGE can answer: never waited for
        b"$99999999999\r\n",
        b":" + b"9" * 5000 + b"\r\n",  # past int()'s digit limit
        b"$-5\r\n",
    ],
)
def test_a_reply_no_read_could_get_fails_the_connection_at_once(reply: bytes) -> None:
    with pytest.raises((rexc.ConnectionError, ValueError)):
        _replies(reply, 0, 1)


def test_a_reply_line_that_never_ends_fails_the_connection_once_past_any_real_reply() -> None:
    # Nothing a read asks for has a line (or value) past HEAD: a store that sends one is not
    # answering, and what it sends is not kept while the timeout runs.
    assert _replies(b"$3\r\nab", 0, 1) is None  # a real reply cut short: wait for the rest
    with pytest.raises(rexc.ConnectionError):
        _replies(b":" + b"1" * (HEAD + 100), 0, 1)


# One read's three replies as Redis sends them: STRLEN, GETRANGE, EXISTS (any kind each).
REPLY = st.one_of(
    st.integers(min_value=0, max_value=2 * HEAD).map(lambda n: b":%d\r\n" % n),
    st.binary(max_size=64).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
    st.sampled_from([b"$-1\r\n", b":0\r\n", b":1\r\n", b"-WRONGTYPE no\r\n", b"-ERR x\r\n"]),
)


@given(
    st.lists(st.tuples(REPLY, REPLY, REPLY), min_size=1, max_size=3),
    st.binary(max_size=40),
    st.integers(min_value=0),
)
def test_the_common_reads_shortcut_reads_what_the_full_parser_reads(
    reads: list[tuple[bytes, bytes, bytes]], tail: bytes, cut: int
) -> None:
    """``_read`` (one match for a string value's replies) answers exactly as ``_replies``
    does: the same replies and end, None for a cut, the same failure, wherever the data is
    cut and whatever follows."""
    data = b"".join(b"".join(r) for r in reads) + tail
    for end in (len(data), cut % (len(data) + 1)):
        at = 0
        while True:
            try:
                expected = _replies(data[:end], at, 3)
            except (rexc.ConnectionError, ValueError) as e:
                with pytest.raises(type(e)):
                    _read(data[:end], at)
                break
            got = _read(data[:end], at)
            assert _same(got, expected)
            if expected is None:
                break
            at = expected[1]


def _same(got: object, expected: object) -> bool:
    if isinstance(got, tuple) and isinstance(expected, tuple):
        return _same(list(got[0]), list(expected[0])) and got[1] == expected[1]
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(map(_same, got, expected))
    if isinstance(got, rexc.ResponseError) and isinstance(expected, rexc.ResponseError):
        return str(got) == str(expected)
    return type(got) is type(expected) and got == expected


def test_the_common_reads_shortcut_takes_a_value_and_leaves_the_rest() -> None:
    value = b"KPR2" + b"x" * 9000
    data = b":%d\r\n$%d\r\n%s\r\n:1\r\n" % (len(value), len(value), value)
    assert _read(data + b":0\r\n", 0) == ([len(value), value, 1], len(data))
    assert _read(data[:-1], 0) is None


class _Connection:
    """What the reads know of a connection in these tests: what came of a reply so far."""

    rest = b""


# A read's replies as Redis sends them for a value, a missing key, another type.
READ = st.one_of(
    st.binary(max_size=300).map(lambda v: (b":%d\r\n$%d\r\n%s\r\n:1\r\n" % (len(v), len(v), v), v)),
    st.just((b":0\r\n$0\r\n\r\n:0\r\n", None)),
    st.just((b"-WRONGTYPE x\r\n-WRONGTYPE x\r\n:1\r\n", WRONG)),
    st.just((b":70000\r\n$3\r\nabc\r\n:1\r\n", LARGER)),
)


@given(st.lists(READ, min_size=1, max_size=8), st.lists(st.integers(min_value=0), max_size=6))
def test_replies_in_chunks_cut_anywhere_answer_every_read_as_one_chunk_does(
    reads: list[tuple[bytes, bytes | int | None]], cuts: list[int]
) -> None:
    """Replies arrive in chunks that cut reads anywhere (the read cut short is completed
    from the head of the next chunk, or parsed with the whole of it): each read gets its
    own answer, in order, and nothing is left over."""
    loop = asyncio.new_event_loop()
    try:
        pending = Wire(None, 1.0)
        connection = _Connection()
        pending._replies = connection  # type: ignore[assignment]
        futures = [loop.create_future() for _ in reads]
        pending._waiting.extend((f, 0.0, READ_KIND, 100_000) for f in futures)
        data = b"".join(r for r, _ in reads)
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        for start, end in itertools.pairwise(points):
            pending._received(connection, data[start:end])  # type: ignore[arg-type]
        assert [f.result() for f in futures] == [v for _, v in reads]
        assert connection.rest == b"" and not pending._waiting
    finally:
        loop.close()
