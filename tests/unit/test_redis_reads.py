"""The pure parts of the Redis tier's read path: the record MAC, the reply parser of
:mod:`proxy.shared.reads` (replies cut anywhere by the network) and the remembered parse of a
record's header in :func:`proxy.cache.redis_records.decode` (what is remembered never lets a
record through that the full checks refuse)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
import redis.exceptions as rexc
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st

from proxy.cache.memory import Stored
from proxy.cache.policy import Entry
from proxy.cache.redis_records import BadRecord, decode, encode
from proxy.shared.reads import HEAD, _command, _replies
from proxy.shared.records import BadRecord as SharedBadRecord
from proxy.shared.records import RecordKeys, mac_key

REPLIES = b"$5\r\nhello\r\n:1\r\n$0\r\n\r\n-WRONGTYPE no\r\n$-1\r\n:42\r\n"


def test_replies_of_every_kind_are_read() -> None:
    first, at = _replies(REPLIES, 0, 3) or ([], 0)
    assert first == [b"hello", 1, b""]
    second, end = _replies(REPLIES, at, 3) or ([], 0)
    assert isinstance(second[0], rexc.ResponseError) and str(second[0]) == "WRONGTYPE no"
    assert second[1:] == [b"", 42] and end == len(REPLIES)


@given(st.integers(min_value=0, max_value=len(REPLIES) - 1))
def test_replies_cut_anywhere_are_not_whole_until_they_are(cut: int) -> None:
    whole = _replies(REPLIES, 0, 6)
    assert whole is not None and whole[1] == len(REPLIES)
    part = _replies(REPLIES[:cut], 0, 6)
    assert part is None


def test_a_reply_of_another_kind_fails_the_connection() -> None:
    with pytest.raises(rexc.ConnectionError):
        _replies(b"*1\r\n:1\r\n", 0, 1)


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
