"""Lua scripts run on the backend's pipelined connection (:mod:`proxy.shared.wire`).

A flight runs three scripts in its path (the fetch lock's claim, the budget's slot, the
lock's release: :mod:`proxy.shared.scripts`); through redis-py each cost ~110 µs of the
client's CPU (its pool, retry wrapper, packing and parser). Here a call is one ``EVALSHA``
packed in plain RESP, written with the other calls of its loop turn and its reply parsed as
it arrives, as the Redis tier's reads are.

As redis-py's ``Script`` does, a script Redis does not know (``NOSCRIPT``: after ``SCRIPT
FLUSH``, or a Redis restarted empty) is sent again whole, as ``EVAL`` (which Redis then keeps,
so the next ``EVALSHA`` finds it): one more round trip for that call, whose reply is then due
within the timeout from the resend. Arguments are encoded as redis-py encodes them (bytes as
they are, str as UTF-8, int and float by ``repr``; anything else a ``DataError``); replies
come as redis-py gives them (bytes, int, None, lists of those), and an error reply as the
exception redis-py raises for it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Sequence
from typing import Any

import redis.exceptions as rexc

from proxy.shared.wire import Kind, Parsed, Wire, bulk, replies

# The longest bulk string a script's reply may hold, unless its call says otherwise.
REPLY_CAP = 64 * 1024


class Script:
    """One Lua script, called as redis-py's are: ``script(keys=[...], args=[...])``."""

    def __init__(self, wire: Wire, text: str) -> None:
        self.wire = wire
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text, usedforsecurity=False).hexdigest().encode()
        self.kind = Kind(_parse, self._answer)

    def __call__(
        self, keys: Sequence[Any], args: Sequence[Any], cap: int = REPLY_CAP
    ) -> Awaitable[Any]:
        """The script's reply (its bulk strings at most ``cap`` bytes each: a longer one
        fails the connection). Raises what redis-py's ``Script`` raises."""
        tail = b"".join([bulk(len(keys)), *map(bulk, keys), *map(bulk, args)])
        return self.packed(tail, 3 + len(keys) + len(args), cap)

    def packed(self, tail: bytes, count: int, cap: int = REPLY_CAP) -> Awaitable[Any]:
        """:meth:`__call__` with its keys and arguments packed already: ``tail``, the count
        of keys and then the keys and arguments as bulk strings; ``count``, 3 + how many
        keys and arguments (a caller that packs some of them once, for many calls)."""
        command = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (count, self.sha, tail)
        return self.wire.send(command, self.kind, (cap, count, tail))

    def _answer(self, found: asyncio.Future[Any], reply: Any, arg: Any) -> None:
        if isinstance(reply, rexc.NoScriptError) and arg[1]:
            cap, count, tail = arg
            whole = b"*%d\r\n$4\r\nEVAL\r\n%s%s" % (count, bulk(self.text), tail)
            self.wire.again(found, whole, self.kind, (cap, 0, tail))  # EVAL: not again
        elif isinstance(reply, Exception):
            found.set_exception(reply)
        else:
            found.set_result(reply)


def _parse(data: bytes, at: int, view: memoryview, arg: Any) -> Parsed:
    parsed = replies(data, at, 1, arg[0])
    return None if parsed is None else (parsed[0][0], parsed[1])
