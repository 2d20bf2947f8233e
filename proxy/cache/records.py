"""The shared tier's record format: one cache entry and its body as Redis holds them.

Records are this module's own format, not the disk's pickles: unpickling what a network
store hands back would run whatever someone able to write to Redis put there (OWASP:
deserialisation of untrusted data). A record (:func:`encode`) is JSON (the cache key it
belongs to, the :class:`~proxy.cache.entry.Entry` fields, the body's CRC32) and then the
body, sealed by the backend with an HMAC-SHA256 (:mod:`proxy.shared.records`). Every field
is checked as an upstream answer would be (a status in 100-599, header names that are
tokens, values without CR, LF or NUL, finite non-negative times, no JSON constants, a
bounded nesting depth and size): a record that fails, is for another key, or whose size or
CRC32 does not match raises :class:`BadRecord` (:func:`decode`), and
:class:`~proxy.cache.redis_records.RedisRecords` makes it a miss. Pure: no I/O.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import zlib
from typing import Any

from proxy.cache.entry import Entry
from proxy.cache.memory import Stored

MAGIC = b"KPC1\n"


@functools.lru_cache(maxsize=4096)
def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def encode(key: str, stored: Stored) -> bytes:
    """One record: magic, 4-byte header length, JSON header, body (must be in memory)."""
    assert stored.body is not None
    entry = stored.entry
    header = {
        "key": key,
        "crc": zlib.crc32(stored.body),
        "entry": {
            "status": entry.status,
            "headers": [list(h) for h in entry.headers],
            "account": entry.account,
            "path": entry.path,
            "request_time": entry.request_time,
            "response_time": entry.response_time,
            "initial_age": entry.initial_age,
            "fresh_for": entry.fresh_for,
            "stale_if_error": entry.stale_if_error,
            "stale_while_revalidate": entry.stale_while_revalidate,
            "strict": entry.strict,
            "vary": [list(v) for v in entry.vary],
            "size": entry.size,
        },
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + len(raw).to_bytes(4, "big") + raw + stored.body


class BadRecord(ValueError):
    """A shared record that is not an intact entry for the key asked for."""


def decode(key: str, data: bytes | memoryview, tag: bytes = b"") -> Stored:
    """The entry and body of a record for ``key`` (its body copied once from a view);
    raises :class:`BadRecord`. ``tag``: the record's MAC tag as the backend verified it
    (:meth:`~proxy.shared.records.RecordKeys.opened`; empty: none). A verified tag names its
    record's bytes (HMAC-SHA256 over the Redis key and the record), so a record read again
    under a tag that verified and decoded whole before is that record: its header and its
    body's CRC32 are not checked again (its key and size are)."""
    known = _verified.get(tag) if tag else None
    if known is not None and known[0] == key and len(data) - known[3] == known[1].size:
        return Stored(known[1], bytes(data[known[3] :]), None, known[2])
    entry, crc, end = envelope(key, data)
    body = bytes(data[end:])
    if len(body) != entry.size or zlib.crc32(body) != crc:
        raise BadRecord("a body of the wrong size or CRC32")
    if tag and end <= len(MAGIC) + 4 + MEMO_HEADER:  # remembered as the headers are
        if len(_verified) >= MEMO_SIZE:
            del _verified[next(iter(_verified))]  # the oldest
        _verified[tag] = (key, entry, crc, end)
    return Stored(entry, body, None, crc)


def envelope(key: str, data: bytes | memoryview) -> tuple[Entry, int, int]:
    """A record's entry for ``key``, its body's CRC32 and where its body starts (the whole
    record or only its head); raises :class:`BadRecord`."""
    if data[: len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + 4:
        raise BadRecord("not a cache record")
    start = len(MAGIC) + 4
    end = start + int.from_bytes(data[len(MAGIC) : start], "big")
    if end > len(data):
        raise BadRecord("a record cut short")
    raw = bytes(data[start:end])
    entry, crc, owner = _parsed(raw) if len(raw) <= MEMO_HEADER else _parse(raw)
    if owner != key:
        raise BadRecord("a record of another key")
    return entry, crc, end


def _parse(raw: bytes) -> tuple[Entry, int, str]:
    """A record's header: its entry, its body's CRC32 and the key it belongs to."""
    try:
        header = _header(raw)
        fields = header["entry"]
        entry = Entry(
            status=_status(fields["status"]),
            headers=tuple((_name(n), _value(v)) for n, v in _pairs(fields["headers"])),
            account=_str(fields["account"]),
            path=_str(fields["path"]),
            request_time=_seconds(fields["request_time"], math.inf),
            response_time=_seconds(fields["response_time"], math.inf),
            initial_age=_seconds(fields["initial_age"]),
            fresh_for=_seconds(fields["fresh_for"]),
            stale_if_error=_seconds(fields["stale_if_error"]),
            stale_while_revalidate=_seconds(fields["stale_while_revalidate"]),
            strict=_typed(fields["strict"], bool),
            vary=tuple(
                (_name(n), None if v is None else _value(v)) for n, v in _pairs(fields["vary"])
            ),
            size=_typed(fields["size"], int),
        )
        return entry, _typed(header["crc"], int), _str(header["key"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise BadRecord(f"a damaged record ({type(e).__name__})") from None


# A header read again (the same entry from Redis, on every replica's memory-tier miss) is
# parsed and checked once: the result of the same bytes is the same (a header that fails
# raises, and is not remembered). Headers up to MEMO_HEADER bytes, the last MEMO_SIZE of
# them: each header names its key, so as many as the keys a replica reads from Redis in turn
# (1,024 made a Redis hit over 2,000 keys cost 1.2x as much: docs/performance.md); ~2 KB
# each with its entry for a typical Kounta answer (an estimate), at most ~32 MiB.
MEMO_HEADER = 4096
MEMO_SIZE = 4096
_parsed = functools.lru_cache(maxsize=MEMO_SIZE)(_parse)
# Records that verified (by their MAC tag) and decoded whole: key, entry, CRC32 and where the
# body starts, the last MEMO_SIZE of them (:func:`decode`; never a body).
_verified: dict[bytes, tuple[str, Entry, int, int]] = {}


# RFC 9110 5.1: a field name is a token.
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 5.5: a field value holds no CR, LF, NUL (nor other controls but HTAB).
BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The longest freshness or stale window a record may carry (RFC 9111 1.2.2: 2**31 s).
LONGEST = float(2**31)
# A record's header is a few KiB; no legitimate one nests deeper than this.
MAX_HEADER = 1024 * 1024
MAX_DEPTH = 8


def _no_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name}")


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise ValueError("integer too large")
    return int(text)


def _small_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("number too large")
    return number


# One decoder for every record (json.loads with hooks builds a new one per call).
_DECODER = json.JSONDecoder(
    parse_constant=_no_constant, parse_int=_small_int, parse_float=_small_float
)
# A JSON string (escapes included; one left open runs to the end), and a bracket.
STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
BRACKET = re.compile(rb"[\[\]{}]")


def _depth(text: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings (checked before parsing, so a
    hostile record cannot make the parser recurse). The strings are cut out and the
    brackets found by regular expressions: a Python loop visits the brackets only."""
    depth = deepest = 0
    for bracket in BRACKET.findall(STRING.sub(b"", text)):
        if bracket in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _header(raw: bytes) -> Any:
    if len(raw) > MAX_HEADER or _depth(raw) > MAX_DEPTH:
        raise ValueError("header too large or too deep")
    return _DECODER.decode(raw.decode())  # UTF-8, as json.loads reads bytes written by encode


def _status(value: Any) -> int:
    status = int(_typed(value, int))
    if not 100 <= status <= 599:
        raise ValueError("status outside 100-599")
    return status


def _name(value: Any) -> str:
    name = _str(value)
    if not TOKEN.fullmatch(name):
        raise ValueError("a header name that is not a token")
    return name


def _value(value: Any) -> str:
    text = _str(value)
    if BAD_VALUE.search(text):
        raise ValueError("a header value with a control character")
    return text


def _pairs(value: Any) -> list[tuple[Any, Any]]:
    if type(value) is not list or not all(type(p) is list and len(p) == 2 for p in value):
        raise TypeError("a list of pairs expected")
    return [(n, v) for n, v in value]


def _seconds(value: Any, longest: float = LONGEST) -> float:
    number = _number(value)
    if not 0.0 <= number <= longest:
        raise ValueError("a time out of range")
    return number


def _typed(value: Any, kind: type[Any]) -> Any:
    if type(value) is not kind:
        raise TypeError(f"{kind.__name__} expected")
    return value


def _str(value: Any) -> str:
    return str(_typed(value, str))


def _number(value: Any) -> float:
    if type(value) not in (int, float):
        raise TypeError("number expected")
    return float(value)
