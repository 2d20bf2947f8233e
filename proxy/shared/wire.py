"""One pipelined connection of plain RESP commands: the shared backend's hot calls.

A command through redis-py's client (its pool, retry wrapper, command packing, per-call
timeouts and parser) costs ~110 µs of CPU, more than a whole memory hit. The backend's hot
calls go here instead: the Redis tier's reads (:mod:`proxy.shared.reads`) and the flight's
scripts (the fetch lock's claim and release, the budget's slot: :mod:`proxy.shared.piped`).

The connection is one taken from the backend's data pool (so it connected as every
connection of that pool does: password, TLS, Unix socket, database, and the epoch check of
:meth:`~proxy.shared.epochs.Epochs.check_connection`), whose transport is then taken over by
a protocol of this module's own (:class:`_Replies`; redis-py's stream protocol is still told
when it closes): the commands of one event-loop turn are written together, and the replies
parsed as they arrive, in order (no reader task, no connection taken or given back per
call). Each call names its :class:`Kind`: how its replies are parsed and told to its caller.

When the connection fails (Redis closed it, the backend dropped its pool after a break, a
reply that is not RESP), every call waiting on it fails with
:class:`redis.exceptions.ConnectionError` and the next call connects again. One timer (not
one per call) watches the oldest call: once its reply is ``shared.timeout`` late, every call
waiting fails with :class:`redis.exceptions.TimeoutError` and the connection is closed (the
replies after it would come later still). A call its caller gave up (cancelled) keeps its
place in the queue: its reply is read and dropped, so the others stay in order. An error
reply becomes the exception redis-py raises for it (:func:`proxy.compat.redispy.
response_error`), so the backend's handling (degraded, refused, counted) is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions as rexc

from proxy.compat.redispy import response_error, taken_transport

# The longest reply line (not a bulk string's value) any real reply has.
LINE = 64 * 1024
# Arrays in arrays: deeper than any script of ours answers.
DEPTH = 4
# What a reply's parse gives: the replies and where they end (None: not all here yet).
Parsed = tuple[Any, int] | None


class Kind:
    """How one call's replies are read (``parse(data, at, view, arg)``: the replies from
    ``data[at:]`` and where they end, None when not all here yet; ``view`` is ``data``'s,
    for values taken without a copy) and told to its waiter (``answer(future, replies,
    arg)``); ``first(rest, data)``, when given, completes a call cut short in ``rest`` from
    the head of ``data`` without joining the two whole (:func:`proxy.shared.reads._first`).
    ``arg``: the call's own (its limit, its command's arguments)."""

    __slots__ = ("answer", "first", "parse")

    def __init__(
        self,
        parse: Callable[[bytes, int, memoryview, Any], Parsed],
        answer: Callable[[asyncio.Future[Any], Any, Any], None],
        first: Callable[[bytes, bytes], Parsed] | None = None,
    ) -> None:
        self.parse, self.answer, self.first = parse, answer, first


class Wire:
    """Calls pipelined on one connection of ``pool`` (the module's docstring)."""

    def __init__(self, pool: Any, timeout: float) -> None:
        """``pool``: the backend's data pool (a redis-py ``ConnectionPool``); ``timeout``:
        the longest a call waits for its reply (``shared.timeout``)."""
        self.pool = pool
        self.timeout = timeout
        self._replies: _Replies | None = None
        # One entry per call written and not yet answered, in the order written: its
        # future, the time its reply is due by, its kind and its own argument.
        self._waiting: deque[tuple[asyncio.Future[Any], float, Kind, Any]] = deque()
        # Commands of this turn of the event loop, written together at its end.
        self._unsent: list[bytes] = []
        # Due when the oldest call's reply is (armed while calls wait).
        self._watch: asyncio.TimerHandle | None = None
        self._connecting = asyncio.Lock()
        # Connections being closed and given back to the pool.
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        """Connected: a call is written at once, and :meth:`send` answers a future."""
        return self._replies is not None

    def send(self, command: bytes, kind: Kind, arg: Any) -> Awaitable[Any]:
        """``command`` (whole RESP) written with the others of this loop turn; its replies
        told by ``kind``. Raises ``redis.exceptions.ConnectionError`` when the connection
        fails, ``redis.exceptions.TimeoutError`` when no reply came within the timeout.
        (A future, answered as its replies are parsed, once connected: no coroutine of
        its own per call.)"""
        if self._replies is None:
            return self._connected(command, kind, arg)
        return self._ask(command, kind, arg)

    async def _connected(self, command: bytes, kind: Kind, arg: Any) -> Any:
        await self._connect()
        return await self._ask(command, kind, arg)

    def _ask(self, command: bytes, kind: Kind, arg: Any) -> asyncio.Future[Any]:
        found: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.again(found, command, kind, arg)
        return found

    def again(self, found: asyncio.Future[Any], command: bytes, kind: Kind, arg: Any) -> None:
        """``command`` written for ``found`` (a call's future: new, or one whose reply asked
        for another command, as NOSCRIPT does), its reply due within the timeout from now."""
        loop = found.get_loop()
        due = loop.time() + self.timeout
        self._waiting.append((found, due, kind, arg))
        if not self._unsent:
            loop.call_soon(self._send)  # with the others of this turn
        self._unsent.append(command)
        if self._watch is None:
            self._watch = loop.call_at(due, self._overdue)

    def flush(self) -> None:
        """Write this turn's calls now, not at the turn's end: for a call that others wait
        on (the fetch lock's release and its note) when the rest of the turn is this
        replica's own work (answering a flight's joiners: a millisecond and more)."""
        if self._unsent:
            self._send()

    def _send(self) -> None:
        unsent, self._unsent = self._unsent, []
        if unsent and self._replies is not None:  # none: flushed already
            self._replies.transport.write(b"".join(unsent))
        # else: the connection failed meanwhile, and its calls with it

    def _overdue(self) -> None:
        """The oldest call's reply is due: when it has not come (even for a call its caller
        gave up), the connection is stuck, and every reply after it would come later still:
        every call fails, and the connection is closed."""
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
                transport = taken_transport(connection)
                if transport is None:
                    await self.pool.release(connection)
                    raise rexc.ConnectionError("the shared store's connection is closed")
                self._replies = _Replies(self, connection, transport)

    def _received(self, replies: _Replies, data: bytes) -> None:
        """Replies arrived: each call whose replies are whole is answered."""
        if replies is not self._replies:
            return  # a connection given up
        waiting = self._waiting
        try:
            at = 0
            if replies.rest:
                first = None
                if waiting and waiting[0][2].first is not None:
                    first = waiting[0][2].first(replies.rest, data)
                if first is None:
                    data = replies.rest + data
                else:  # the call cut short, completed from the head of data
                    answer, at = first
                    found, _, kind, arg = waiting.popleft()
                    if not found.done():
                        kind.answer(found, answer, arg)
            view = memoryview(data)
            while waiting:
                found, _, kind, arg = waiting[0]
                parsed = kind.parse(data, at, view, arg)
                if parsed is None:
                    break
                answer, at = parsed
                waiting.popleft()
                if not found.done():  # else given up by its caller
                    kind.answer(found, answer, arg)
            replies.rest = data[at:]
            if replies.rest and not waiting:
                raise rexc.ConnectionError("a reply no call asked for")
        except (IndexError, ValueError) as e:
            self._fail(rexc.ConnectionError(f"a reply that is not RESP ({type(e).__name__})"))
        except rexc.ConnectionError as e:
            self._fail(e)

    def _lost(self, replies: _Replies, error: Exception | None) -> None:
        if replies is self._replies:  # else failed, closed and given back already
            why = f" ({error!r})" if error is not None else ""
            self._fail(rexc.ConnectionError(f"the shared store's connection closed{why}"))

    def _fail(self, error: Exception) -> None:
        """Every waiting call fails, and the connection is closed; the next call connects
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
        self._fail(rexc.ConnectionError("the shared store's connection closed"))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _Replies(asyncio.Protocol):
    """The wire's protocol on a connection taken over from redis-py's stream protocol:
    replies are parsed as they arrive (no reader task). Its closing is still told to the
    stream protocol, so redis-py's own disconnect goes on as usual."""

    def __init__(self, wire: Wire, connection: Any, transport: Any) -> None:
        self.wire, self.connection, self.transport = wire, connection, transport
        self.stream: asyncio.BaseProtocol = transport.get_protocol()
        self.rest = b""  # what came of replies not whole yet
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.wire._received(self, data)

    def eof_received(self) -> bool:
        return False  # closed: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.wire._lost(self, exc)
        self.stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self.stream.pause_writing()

    def resume_writing(self) -> None:
        self.stream.resume_writing()


def replies(data: bytes, at: int, count: int, cap: int, depth: int = 0) -> Parsed:
    """``count`` RESP2/RESP3 replies (bulk strings, integers, nulls, simple strings, errors
    as the exceptions redis-py raises for them, arrays of those) from ``data[at:]`` and where
    they end; None: not all here yet. What no call could be answered (a bulk string past
    ``cap``, a line longer than :data:`LINE`, arrays deeper than :data:`DEPTH`, a kind of
    reply none of the calls gets) fails at once rather than being kept until the timeout."""
    found: list[Any] = []
    for _ in range(count):
        end = data.find(b"\r\n", at)
        if end < 0:
            if len(data) - at > LINE:  # no reply the calls get has such a line
                raise rexc.ConnectionError("a reply line longer than any real one")
            return None
        kind, line = data[at : at + 1], data[at + 1 : end]
        at = end + 2
        if kind == b"$":
            size = int(line)
            if size == -1:
                found.append(None)
                continue
            if not 0 <= size <= cap:
                raise rexc.ConnectionError(f"a bulk reply of {size} bytes")
            if len(data) < at + size + 2:
                return None
            found.append(data[at : at + size])
            at += size + 2
        elif kind == b":":
            found.append(int(line))
        elif kind == b"-":
            found.append(response_error(line.decode(errors="replace")))
        elif kind == b"*" and depth < DEPTH:
            items = int(line)
            if items == -1:
                found.append(None)
                continue
            if items < 0:
                raise rexc.ConnectionError(f"an array reply of {items} items")
            inner = replies(data, at, items, cap, depth + 1)
            if inner is None:
                return None
            found.append(inner[0])
            at = inner[1]
        elif kind == b"_":
            found.append(None)
        elif kind == b"+":
            found.append(line)
        else:
            raise rexc.ConnectionError("a reply of an unexpected kind")
    return found, at


def bulk(value: Any) -> bytes:
    """``value`` as a RESP bulk string, encoded as redis-py's ``Encoder`` encodes it. The
    exact types a flight's scripts pass (str, bytes, int, float: ~40 a flight) are told by
    their type at once; anything else goes through :func:`_encoded`'s checks."""
    kind = type(value)
    if kind is str:
        data = value.encode()
    elif kind is bytes:
        data = value
    elif kind is int or kind is float:
        data = repr(value).encode()
    else:
        data = _encoded(value)
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _encoded(value: Any) -> bytes:
    """A value of another type (a subclass, a memoryview), as redis-py encodes it."""
    if isinstance(value, bytes | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        raise rexc.DataError("a bool is not an argument Redis takes")
    if isinstance(value, int | float):
        return repr(value).encode()
    raise rexc.DataError(f"an argument of type {type(value).__name__}")
