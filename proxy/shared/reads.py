"""Cache records read on one pipelined connection: the Redis tier's hot path.

A memory-tier miss answered from Redis costs one round trip; through redis-py's client (its
pool, retry wrapper, command packing, per-call timeouts and parser) that round trip cost more
CPU than a whole memory hit. Records are read here instead, on one connection taken from the
backend's data pool (so it connected as every connection of that pool does: password, TLS,
database, and the epoch check of :meth:`~proxy.shared.epochs.Epochs.check_connection`),
whose transport is then taken over by a protocol of this module's own (:class:`_Replies`;
redis-py's stream protocol is still told when it closes): the commands of one event-loop
turn are written together, and the replies parsed as they arrive, in order (no reader
task, no connection taken or given back per read).

Each read is one round trip of three plain commands (no script): ``STRLEN key``,
``GETRANGE key 0 HEAD-1`` and ``EXISTS key``. A record of at most :data:`HEAD` bytes (the
common case) is then read whole; a larger one is left to the caller (its atomic script reads
it, size checked first), so a value far over the limit never leaves Redis (at most
:data:`HEAD` bytes of it do); ``EXISTS`` tells a missing key (a miss) from an empty value (a
bad record); a value of another type answers ``WRONGTYPE`` (a bad record).

When the connection fails (Redis closed it, the backend dropped its pool after a break, a
reply that is not RESP), every read waiting on it fails with
:class:`redis.exceptions.ConnectionError` and the next read connects again. One timer (not
one per read) watches the oldest read: once its reply is ``shared.timeout`` late, every
read waiting fails with :class:`redis.exceptions.TimeoutError` and the connection is closed
(the replies after it would come later still). A read its caller gave up (cancelled) keeps
its place in the queue: its reply is read and dropped, so the others stay in order. The
backend counts each read as one ``cache_get`` round trip and turns these errors into
"shared store away" (degraded), as for any other call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections import deque
from collections.abc import Awaitable
from typing import Any

import redis.exceptions as rexc

# The most of a value read at once; a longer one is left to the caller.
HEAD = 64 * 1024
# What a read found: the value, None (no such key), or that the key holds a value of another
# type or one longer than the limit (WRONG: never read), or a value longer than HEAD that is
# within the limit (LARGER: the caller reads it).
WRONG = -1
LARGER = -2
# A value is read as a view of the reply it came in (no copy: the reader copies what it keeps).
Found = bytes | memoryview | int | None
Reply = bytes | memoryview | int | rexc.ResponseError


class Reads:
    """Reads of one string value at a time, pipelined on one connection of ``pool``."""

    def __init__(self, pool: Any, timeout: float) -> None:
        """``pool``: the backend's data pool (a redis-py ``ConnectionPool``); ``timeout``:
        the longest a read waits for its reply (``shared.timeout``)."""
        self.pool = pool
        self.timeout = timeout
        self._replies: _Replies | None = None
        # One future per read written and not yet answered, in the order written, with the
        # time its reply is due by and the read's limit.
        self._waiting: deque[tuple[asyncio.Future[Found], float, int]] = deque()
        # Commands of this turn of the event loop, written together at its end.
        self._unsent: list[bytes] = []
        # Due when the oldest read's reply is (armed while reads wait).
        self._watch: asyncio.TimerHandle | None = None
        self._connecting = asyncio.Lock()
        # Connections being closed and given back to the pool.
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, key: bytes, limit: int) -> Awaitable[Found]:
        """The string under ``key`` (None: no such key; :data:`WRONG`: longer than ``limit``
        or not a string; :data:`LARGER`: longer than :data:`HEAD`, within ``limit``). Raises
        ``redis.exceptions.ConnectionError`` when the connection fails,
        ``redis.exceptions.TimeoutError`` when no reply came within the timeout,
        ``redis.exceptions.ResponseError`` for any other error reply. (A future, answered
        as its replies are parsed, once connected: no coroutine of its own per read.)"""
        if self._replies is None:
            return self._connected(key, limit)
        return self._ask(key, limit)

    async def _connected(self, key: bytes, limit: int) -> Found:
        await self._connect()
        return await self._ask(key, limit)

    def _ask(self, key: bytes, limit: int) -> asyncio.Future[Found]:
        loop = asyncio.get_running_loop()
        found: asyncio.Future[Found] = loop.create_future()
        due = loop.time() + self.timeout
        self._waiting.append((found, due, limit))
        if not self._unsent:
            loop.call_soon(self._send)  # with the others of this turn
        self._unsent.append(_command(key))
        if self._watch is None:
            self._watch = loop.call_at(due, self._overdue)
        return found

    def _send(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self._replies is not None:
            self._replies.transport.write(b"".join(unsent))
        # else: the connection failed meanwhile, and its reads with it

    def _overdue(self) -> None:
        """The oldest read's reply is due: when it has not come (even for a read its caller
        gave up), the connection is stuck, and every reply after it would come later still:
        every read fails, and the connection is closed."""
        self._watch = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        due = self._waiting[0][1]
        if due > loop.time():
            self._watch = loop.call_at(due, self._overdue)
            return
        self._fail(rexc.TimeoutError("no reply from the shared store in time"))

    async def _connect(self) -> None:
        async with self._connecting:
            if self._replies is None:
                connection = await self.pool.get_connection()
                # The connection's own transport (redis-py 8: its ``_writer``), taken over.
                writer = connection._writer
                if writer is None or writer.transport.is_closing():
                    await self.pool.release(connection)
                    raise rexc.ConnectionError("the shared store's connection is closed")
                self._replies = _Replies(self, connection, writer.transport)

    def _received(self, replies: _Replies, data: bytes) -> None:
        """Replies arrived: each read whose three are whole is answered."""
        if replies is not self._replies:
            return  # a connection given up
        try:
            at = 0
            if replies.rest:
                first = _first(replies.rest, data) if self._waiting else None
                if first is None:
                    data = replies.rest + data
                else:  # the read cut short, completed from the head of data
                    answer, at = first
                    found, _, limit = self._waiting.popleft()
                    if not found.done():
                        _answer(found, answer, limit)
            view = memoryview(data)
            while self._waiting:
                parsed = _read(data, at, view)
                if parsed is None:
                    break
                answer, at = parsed
                found, _, limit = self._waiting.popleft()
                if not found.done():  # else given up by its caller
                    _answer(found, answer, limit)
            replies.rest = data[at:]
            if replies.rest and not self._waiting:
                raise rexc.ConnectionError("a reply no read asked for")
        except (IndexError, ValueError) as e:
            self._fail(rexc.ConnectionError(f"a reply that is not RESP ({type(e).__name__})"))
        except rexc.ConnectionError as e:
            self._fail(e)

    def _lost(self, replies: _Replies, error: Exception | None) -> None:
        if replies is self._replies:  # else failed, closed and given back already
            why = f" ({error!r})" if error is not None else ""
            self._fail(rexc.ConnectionError(f"the shared store's connection closed{why}"))

    def _fail(self, error: Exception) -> None:
        """Every waiting read fails, and the connection is closed; the next read connects
        again."""
        replies, self._replies = self._replies, None
        self._unsent = []
        while self._waiting:
            found = self._waiting.popleft()[0]
            if not found.done():
                found.set_exception(error)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if replies is not None:
            replies.transport.close()
            task = asyncio.get_running_loop().create_task(self._let_go(replies.connection))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _let_go(self, connection: Any) -> None:
        """Close ``connection`` and give it back to the pool (it connects again there)."""
        with contextlib.suppress(Exception):
            await connection.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await self.pool.release(connection)

    async def close(self) -> None:
        self._fail(rexc.ConnectionError("the shared store's reads closed"))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _Replies(asyncio.Protocol):
    """The reads' protocol on a connection taken over from redis-py's stream protocol:
    replies are parsed as they arrive (no reader task). Its closing is still told to the
    stream protocol, so redis-py's own disconnect goes on as usual."""

    def __init__(self, reads: Reads, connection: Any, transport: Any) -> None:
        self.reads, self.connection, self.transport = reads, connection, transport
        self.stream: asyncio.BaseProtocol = transport.get_protocol()
        self.rest = b""  # what came of replies not whole yet
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.reads._received(self, data)

    def eof_received(self) -> bool:
        return False  # closed: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.reads._lost(self, exc)
        self.stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self.stream.pause_writing()

    def resume_writing(self) -> None:
        self.stream.resume_writing()


def _answer(found: asyncio.Future[Found], replies: list[Reply], limit: int) -> None:
    """A read's three replies (``STRLEN``, ``GETRANGE``, ``EXISTS``) told to its waiter."""
    size, head, exists = replies
    for reply in replies:
        if isinstance(reply, rexc.ResponseError):
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


def _read(data: bytes, at: int, view: memoryview | None = None) -> tuple[list[Reply], int] | None:
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


def _first(rest: bytes, data: bytes) -> tuple[list[Reply], int] | None:
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


def _replies(data: bytes, at: int, count: int) -> tuple[list[Reply], int] | None:
    """``count`` RESP2/RESP3 replies (of the kinds the three commands give: a bulk string,
    an integer, an error) from ``data[at:]`` and where they end; None: not all here yet.
    What no read could be answered (a bulk string past :data:`HEAD`, a line longer than
    that) fails at once rather than being kept until the timeout."""
    replies: list[Reply] = []
    for _ in range(count):
        end = data.find(b"\r\n", at)
        if end < 0:
            if len(data) - at > HEAD:  # no reply these commands get has such a line
                raise rexc.ConnectionError("a reply line longer than any real one")
            return None
        kind, line = data[at : at + 1], data[at + 1 : end]
        at = end + 2
        if kind == b"$":
            size = int(line)
            if size == -1:
                replies.append(b"")
                continue
            if not 0 <= size <= HEAD:  # GETRANGE answers HEAD bytes at most
                raise rexc.ConnectionError(f"a bulk reply of {size} bytes")
            if len(data) < at + size + 2:
                return None
            replies.append(data[at : at + size])
            at += size + 2
        elif kind == b":":
            replies.append(int(line))
        elif kind == b"-":
            replies.append(rexc.ResponseError(line.decode(errors="replace")))
        else:
            raise rexc.ConnectionError("a reply of an unexpected kind")
    return replies, at
