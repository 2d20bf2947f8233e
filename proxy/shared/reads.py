"""Cache records read on the backend's pipelined connection: the Redis tier's hot path.

A memory-tier miss answered from Redis costs one round trip; through redis-py's client (its
pool, retry wrapper, command packing, per-call timeouts and parser) that round trip cost more
CPU than a whole memory hit. Records are read here instead, on the backend's one pipelined
connection of plain RESP (:mod:`proxy.shared.wire`: its connection, its timer and its
failures), beside the flight's scripts (:mod:`proxy.shared.piped`).

Each read is one round trip of three plain commands (no script): ``STRLEN key``,
``GETRANGE key 0 HEAD-1`` and ``EXISTS key``. A record of at most :data:`HEAD` bytes (the
common case) is then read whole; a larger one is left to the caller (its atomic script reads
it, size checked first), so a value far over the limit never leaves Redis (at most
:data:`HEAD` bytes of it do); ``EXISTS`` tells a missing key (a miss) from an empty value (a
bad record); a value of another type answers ``WRONGTYPE`` (a bad record). The backend counts
each read as one ``cache_get`` round trip and turns the wire's errors into "shared store
away" (degraded), as for any other call.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable
from typing import Any

import redis.exceptions as rexc

from proxy.shared.wire import Kind, Parsed, Wire, replies

# The most of a value read at once; a longer one is left to the caller.
HEAD = 64 * 1024
# What a read found: the value, None (no such key), or that the key holds a value of another
# type or one longer than the limit (WRONG: never read), or a value longer than HEAD that is
# within the limit (LARGER: the caller reads it).
WRONG = -1
LARGER = -2
# A value is read as a view of the reply it came in (no copy: the reader copies what it keeps).
Found = bytes | memoryview | int | None
Reply = bytes | memoryview | int | rexc.RedisError | None


class Reads:
    """Reads of one string value at a time, pipelined on the backend's ``wire``."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    def get(self, key: bytes, limit: int) -> Awaitable[Found]:
        """The string under ``key`` (None: no such key; :data:`WRONG`: longer than ``limit``
        or not a string; :data:`LARGER`: longer than :data:`HEAD`, within ``limit``). Raises
        ``redis.exceptions.ConnectionError`` when the connection fails,
        ``redis.exceptions.TimeoutError`` when no reply came within the timeout,
        ``redis.exceptions.ResponseError`` for any other error reply."""
        return self.wire.send(_command(key), READ, limit)


def _answer(found: asyncio.Future[Found], three: list[Reply], limit: int) -> None:
    """A read's three replies (``STRLEN``, ``GETRANGE``, ``EXISTS``) told to its waiter."""
    size, head, exists = three
    for reply in three:
        if isinstance(reply, Exception):
            if str(reply).startswith("WRONGTYPE"):
                found.set_result(WRONG)
            else:
                found.set_exception(reply)
            return
    if not exists:
        found.set_result(None)
    elif not isinstance(size, int) or not isinstance(head, bytes | memoryview):
        found.set_exception(rexc.ConnectionError("a reply of an unexpected kind"))
    elif size > limit:
        found.set_result(WRONG)
    else:  # not whole: longer than HEAD (or replaced between the commands): the caller reads
        found.set_result(head if size == len(head) else LARGER)


# A read's replies as a string value gives them: its length, its bytes (up to HEAD), "it
# exists" (the common case, read by one match; anything else by _replies).
_VALUE = re.compile(rb":(\d{1,18})\r\n\$(\d{1,18})\r\n")


def _read(data: bytes, at: int, view: memoryview | None = None, _: Any = None) -> Parsed:
    """One read's three replies from ``data[at:]`` and where they end (None: not all here
    yet), as :func:`_replies` reads them; a string value as a slice of ``view`` (``data``'s),
    when given."""
    value = _VALUE.match(data, at)
    if value is not None:
        size, start = int(value[2]), value.end()
        end = start + size
        if size <= HEAD and data[end : end + 6] == b"\r\n:1\r\n":
            head = data[start:end] if view is None else view[start:end]
            return [int(value[1]), head, 1], end + 6
    return _replies(data, at, 3)


def _first(rest: bytes, data: bytes) -> Parsed:
    """The read cut short in ``rest`` (what came of it before ``data``), when it is a string
    value's (:data:`_VALUE`) and whole in ``rest`` and the head of ``data``: its replies, and
    where they end in ``data``; None: ``rest + data`` is parsed as a whole. (Replies come in
    chunks of up to 256 KiB, nearly each cutting a read in two: joining only that read's own
    bytes saves copying the whole chunk.)"""
    value = _VALUE.match(rest)
    if value is None:
        return None
    end = value.end() + int(value[2]) + 6 - len(rest)  # the value, CRLF, ":1" CRLF
    if not 0 < end <= len(data):
        return None
    parsed = _read(rest + data[:end], 0)
    if parsed is None or parsed[1] != len(rest) + end:
        return None
    return parsed[0], end


@functools.lru_cache(maxsize=4096)
def _command(key: bytes) -> bytes:
    """``STRLEN key``, ``GETRANGE key 0 HEAD-1``, ``EXISTS key`` in RESP."""
    name = b"$%d\r\n%s\r\n" % (len(key), key)
    end = b"%d" % (HEAD - 1)
    return b"".join(
        (
            b"*2\r\n$6\r\nSTRLEN\r\n", name, b"*4\r\n$8\r\nGETRANGE\r\n", name,
            b"$1\r\n0\r\n$%d\r\n%s\r\n" % (len(end), end), b"*2\r\n$6\r\nEXISTS\r\n", name,
        )
    )  # fmt: skip


def _replies(data: bytes, at: int, count: int) -> Parsed:
    """``count`` replies of the kinds the three commands give (:func:`~proxy.shared.wire.
    replies`), none longer than :data:`HEAD` (GETRANGE answers HEAD bytes at most)."""
    return replies(data, at, count, HEAD)


# How the wire reads a read's replies and tells them.
READ = Kind(_read, _answer, _first)
