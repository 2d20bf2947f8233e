"""Cache records read on one pipelined connection: the Redis tier's hot path.

A memory-tier miss answered from Redis costs one round trip; through redis-py's client (its
pool, retry wrapper, command packing, per-call timeouts and parser) that round trip cost more
CPU than a whole memory hit. Records are read here instead, on one connection taken from the
backend's data pool (so it connected as every connection of that pool does: password, TLS,
database, and the epoch check of :meth:`~proxy.shared.epochs.Epochs.check_connection`), with
the commands written as they come and the replies read in order by one reader task: no
connection is taken or given back per read, and replies that arrive together are read
together.

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
from collections import deque
from typing import Any

import redis.exceptions as rexc

# The most of a value read at once; a longer one is left to the caller.
HEAD = 64 * 1024
# The most read from the socket's buffer at once.
READ_SIZE = 256 * 1024
# What a read found: the value, None (no such key), or that the key holds a value of another
# type or one longer than the limit (WRONG: never read), or a value longer than HEAD that is
# within the limit (LARGER: the caller reads it).
WRONG = -1
LARGER = -2
Found = bytes | int | None
Reply = bytes | int | rexc.ResponseError


class Reads:
    """Reads of one string value at a time, pipelined on one connection of ``pool``."""

    def __init__(self, pool: Any, timeout: float) -> None:
        """``pool``: the backend's data pool (a redis-py ``ConnectionPool``); ``timeout``:
        the longest a read waits for its reply (``shared.timeout``)."""
        self.pool = pool
        self.timeout = timeout
        self._connection: Any = None
        self._writer: asyncio.StreamWriter | None = None
        # One future per read written and not yet answered, in the order written, with the
        # time its reply is due by.
        self._waiting: deque[tuple[asyncio.Future[list[Reply]], float]] = deque()
        # Commands of this turn of the event loop, written together at its end.
        self._unsent: list[bytes] = []
        self._reader: asyncio.Task[None] | None = None
        # Due when the oldest read's reply is (armed while reads wait).
        self._watch: asyncio.TimerHandle | None = None
        self._connecting = asyncio.Lock()

    async def get(self, key: bytes, limit: int) -> Found:
        """The string under ``key`` (None: no such key; :data:`WRONG`: longer than ``limit``
        or not a string; :data:`LARGER`: longer than :data:`HEAD`, within ``limit``). Raises
        ``redis.exceptions.ConnectionError`` when the connection fails,
        ``redis.exceptions.TimeoutError`` when no reply came within the timeout,
        ``redis.exceptions.ResponseError`` for any other error reply."""
        if self._writer is None:
            await self._connect()
        loop = asyncio.get_running_loop()
        found: asyncio.Future[list[Reply]] = loop.create_future()
        due = loop.time() + self.timeout
        self._waiting.append((found, due))
        if not self._unsent:
            loop.call_soon(self._send)  # with the others of this turn
        self._unsent.append(_command(key))
        if self._watch is None:
            self._watch = loop.call_at(due, self._overdue)
        size, head, exists = await found
        for reply in (size, head, exists):
            if isinstance(reply, rexc.ResponseError):
                if str(reply).startswith("WRONGTYPE"):
                    return WRONG
                raise reply
        if not exists:
            return None
        if not isinstance(size, int) or not isinstance(head, bytes):
            raise rexc.ConnectionError("a reply of an unexpected kind")
        if size > limit:
            return WRONG
        # Not whole: longer than HEAD (or replaced between the commands): the caller reads.
        return head if size == len(head) else LARGER

    def _send(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self._writer is not None:
            self._writer.write(b"".join(unsent))
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
        reader, self._reader = self._reader, None
        self._fail(rexc.TimeoutError("no reply from the shared store in time"))
        if reader is not None:
            reader.cancel()  # and it closes its connection

    async def _connect(self) -> None:
        async with self._connecting:
            if self._writer is None:
                connection = await self.pool.get_connection()
                # The connection's own streams (redis-py 8: ``_reader``, ``_writer``).
                reader, writer = connection._reader, connection._writer
                if reader is None or writer is None:
                    await self.pool.release(connection)
                    raise rexc.ConnectionError("the shared store's connection is closed")
                self._connection, self._writer = connection, writer
                self._reader = asyncio.get_running_loop().create_task(
                    self._read(connection, reader), name="shared-redis-reads"
                )

    async def _read(self, connection: Any, reader: asyncio.StreamReader) -> None:
        try:
            rest = b""  # what came of replies not whole yet
            while True:
                # Whatever came (one await for all the replies that arrived together).
                chunk = await reader.read(READ_SIZE)
                if not chunk:
                    raise EOFError("the shared store closed the connection")
                data, at = rest + chunk if rest else chunk, 0
                while self._waiting:
                    # Each ask here is get's three commands: one reply each.
                    parsed = _replies(data, at, 3)
                    if parsed is None:
                        break
                    replies, at = parsed
                    found = self._waiting.popleft()[0]
                    if not found.done():  # else given up by its caller
                        found.set_result(replies)
                rest = data[at:]
                if rest and not self._waiting:
                    raise rexc.ConnectionError("a reply no read asked for")
        except asyncio.CancelledError:
            self._fail(rexc.ConnectionError("the shared store's reads closed"), connection)
            raise
        except (OSError, EOFError, IndexError, ValueError) as e:
            why = rexc.ConnectionError(f"the shared store's connection failed ({e!r})")
            self._fail(why, connection)
        except rexc.ConnectionError as e:
            self._fail(e, connection)
        except Exception as e:  # a bug here must not leave reads waiting for the timer
            why = rexc.ConnectionError(f"the shared store's reads failed ({type(e).__name__})")
            self._fail(why, connection)
            raise
        finally:
            await self._let_go(connection)

    def _fail(self, error: Exception, connection: Any = None) -> None:
        """Every waiting read fails; the next one connects again. ``connection``: only if
        it is still the one in use (a reader closing an old one fails nothing)."""
        if connection is not None and connection is not self._connection:
            return
        self._writer = self._connection = None
        self._unsent = []
        while self._waiting:
            found = self._waiting.popleft()[0]
            if not found.done():
                found.set_exception(error)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def _let_go(self, connection: Any) -> None:
        """Close ``connection`` and give it back to the pool (it connects again there)."""
        if connection is None:
            return
        with contextlib.suppress(Exception):
            await connection.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await self.pool.release(connection)

    async def close(self) -> None:
        task, self._reader = self._reader, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        connection = self._connection
        self._fail(rexc.ConnectionError("the shared store's reads closed"))
        await self._let_go(connection)


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
    an integer, an error) from ``data[at:]`` and where they end; None: not all here yet."""
    replies: list[Reply] = []
    for _ in range(count):
        end = data.find(b"\r\n", at)
        if end < 0:
            return None
        kind, line = data[at : at + 1], data[at + 1 : end]
        at = end + 2
        if kind == b"$":
            size = int(line)
            if size < 0:
                replies.append(b"")
                continue
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
