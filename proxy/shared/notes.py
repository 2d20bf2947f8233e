"""Notes of finished fetches, heard by the replicas that waited on them.

A replica whose flight finds another replica's fetch lock on a key names itself among the
lock's waiters in the same script (``P:cache:ACCOUNT:lock:D:waiting``, a set of replica ids
with the lock's TTL) and listens on a channel of its own, ``P:cache:notes:REPLICA``. The
owner, letting go of the lock, publishes a *note* of what its fetch got to each waiting
replica's channel, in the same script (no round trip more): so a waiter learns at once that
the fetch is over, and, when it was a 304, with what headers (``proxy.cache.notes``'s
:class:`~proxy.cache.notes.Note`), instead of polling for an entry a 304 that does
not make it fresh would never store.

Messages are ``HOLDER|SEALED``: the owner token of the lock the note is for, then the note
sealed with the record MAC over ``P:cache:ACCOUNT:note:D`` (opened by the backend for the key
the waiter waits on, so a note for another key or account, or a forged one, does not verify).
Pub/sub is at most once: a note that is lost (no subscription at that moment, a blip) costs
its waiter the poll it falls back on (``RedisRecords.wait``), never a wrong answer.

The channel is read on a connection of its own, taken from the backend's data pool (so it
connected as every connection of that pool does: password, TLS, Unix socket, the epoch check)
and then read by a protocol of this module's (:class:`_Heard`), as the pipelined calls are
(:mod:`proxy.shared.wire`): a message is parsed and handed to its waiter as its bytes arrive,
with no task woken per message and no redis-py parser (redis-py's ``PubSub.get_message`` cost a
task step and its parse per note, a loop turn before the waiter heard it). What comes is
untrusted (anyone who may ``PUBLISH`` can write there): a message larger than
:data:`MAX_NOTE` is skipped as it streams by (never held), a frame that is not a pub/sub
message of this channel is ignored, and bytes that are not RESP close the connection, which
the listener then opens and subscribes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any

import redis.exceptions as rexc

from proxy.compat.redispy import response_error, taken_transport
from proxy.logs import event
from proxy.shared.wire import bulk, replies

# Notes heard before their waiter asked (the listener may run first), kept by holder.
RECENT = 256
# The largest message read (a note holds a 304's headers: a few KiB).
MAX_NOTE = 64 * 1024
# How long the listener waits before subscribing again after a break.
LISTEN_SECONDS = 1.0
# The longest line a pub/sub frame has (an item's head; an error reply's text).
LINE = 1024


class Notes:
    """This replica's notes channel: one subscription, the waiters by holder."""

    def __init__(self, pool: Any, channel: str, timeout: float) -> None:
        """``pool``: the backend's data pool (a redis-py ``ConnectionPool``)."""
        self.pool = pool
        self.channel = channel
        self.timeout = timeout
        self.subscribed = False  # waiters name this replica only while it listens
        self._waiting: dict[str, list[asyncio.Future[bytes]]] = {}
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="shared-notes")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, holder: str, seconds: float) -> bytes | None:
        """The sealed note for the lock ``holder`` held, heard within ``seconds`` (or just
        before), else None."""
        heard = self._recent.pop(holder, None)
        if heard is not None or seconds <= 0:
            return heard
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(holder, []).append(future)
        try:
            async with asyncio.timeout(seconds):
                return await future
        except TimeoutError:
            return None
        finally:
            waiting = self._waiting.get(holder)
            if waiting is not None:
                with contextlib.suppress(ValueError):
                    waiting.remove(future)
                if not waiting:
                    del self._waiting[holder]

    def deliver(self, message: bytes) -> None:
        """A message heard: to its holder's waiters, or kept a moment for one about to ask."""
        holder_bytes, bar, sealed = message.partition(b"|")
        if not bar or len(holder_bytes) > 64 or len(message) > MAX_NOTE:
            return
        holder = holder_bytes.decode("ascii", "replace")
        waiting = self._waiting.pop(holder, None)
        if waiting:
            for future in waiting:
                if not future.done():
                    future.set_result(sealed)
            return
        self._recent[holder] = sealed
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    async def _listen(self) -> None:
        """Subscribe, and after any break subscribe again (nothing to replay: a waiter that
        missed its note polls). Messages are delivered by the connection's protocol."""
        while not self._closed:
            heard: _Heard | None = None
            try:
                heard = await self._subscribe()
                self.subscribed = True
                raise await heard.lost
            except asyncio.CancelledError:
                raise
            except Exception as e:  # supervised: whatever it was, listen again
                if self.subscribed:
                    event("shared_notes_lost", logging.INFO, reason=type(e).__name__)
            finally:
                self.subscribed = False
                if heard is not None:
                    await heard.close()
            await asyncio.sleep(LISTEN_SECONDS / 2)

    async def _subscribe(self) -> _Heard:
        """A connection of the pool taken over, subscribed to the channel once Redis confirms
        it (a refusal, NOPERM, raises here)."""
        async with asyncio.timeout(self.timeout):
            connection = await self.pool.get_connection()
            transport = taken_transport(connection)
            if transport is None:
                await self.pool.release(connection)
                raise rexc.ConnectionError("the shared store's connection is closed")
            heard = _Heard(self, connection, transport)
            try:
                transport.write(b"*2\r\n" + bulk(b"SUBSCRIBE") + bulk(self.channel))
                await heard.confirmed
            except BaseException:
                await heard.close()
                raise
            return heard


class _Heard(asyncio.Protocol):
    """The notes channel's protocol on a connection taken over from redis-py's stream
    protocol: pub/sub frames parsed as they arrive, each message of the channel delivered
    then. Its closing is still told to the stream protocol (redis-py's own disconnect)."""

    def __init__(self, notes: Notes, connection: Any, transport: Any) -> None:
        self.notes, self.connection, self.transport = notes, connection, transport
        self.channel = notes.channel.encode()
        self.stream: asyncio.BaseProtocol = transport.get_protocol()
        loop = asyncio.get_running_loop()
        self.confirmed: asyncio.Future[None] = loop.create_future()
        # Why the connection ended (set once, with the error: never raised by itself).
        self.lost: asyncio.Future[Exception] = loop.create_future()
        self.rest = b""  # what came of a frame not whole yet
        self.skip = 0  # bytes still to come of a message too large to read
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._read(data)
        except (IndexError, ValueError, rexc.RedisError) as e:
            self._end(rexc.ConnectionError(f"a pub/sub frame that is not RESP ({e})"))

    def _read(self, data: bytes) -> None:
        if self.skip:
            cut = min(self.skip, len(data))
            self.skip -= cut
            data = data[cut:]
        if self.rest:
            data, self.rest = self.rest + data, b""
        at = 0
        while at < len(data):
            parsed = frame(data, at, MAX_NOTE)
            if parsed is None:
                break
            items, at, self.skip = parsed
            if items is not None:
                self._heard(items)
        self.rest = data[at:]

    def _heard(self, items: list[Any]) -> None:
        kind = items[0]
        if isinstance(kind, rexc.RedisError):  # the SUBSCRIBE refused
            self._end(kind)
        elif len(items) != 3 or items[1] != self.channel:
            return  # not this channel's: nothing of ours
        elif kind == b"message" and isinstance(items[2], bytes):
            self.notes.deliver(items[2])
        elif kind == b"subscribe" and not self.confirmed.done():
            self.confirmed.set_result(None)

    def _end(self, error: Exception) -> None:
        if not self.confirmed.done():
            self.confirmed.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(error)
        self.transport.close()

    def eof_received(self) -> bool:
        return False  # closed: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        why = rexc.ConnectionError(f"the notes connection closed ({exc!r})")
        if not self.confirmed.done():
            self.confirmed.set_exception(why)
        if not self.lost.done():
            self.notes.subscribed = False  # at once: waiters stop naming this replica
            self.lost.set_result(why)
        self.stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self.stream.pause_writing()

    def resume_writing(self) -> None:
        self.stream.resume_writing()

    async def close(self) -> None:
        """Close the connection and give it back to the pool (it connects again there)."""
        self.transport.close()
        with contextlib.suppress(Exception):
            await self.connection.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await self.notes.pool.release(self.connection)


def frame(data: bytes, at: int, cap: int) -> tuple[list[Any] | None, int, int] | None:
    """One pub/sub frame (a RESP3 push or a RESP2 array; or an error reply) from
    ``data[at:]``: its items, where it ends, and how many bytes past ``data`` it still runs.
    Items None: a frame whose last item is larger than ``cap`` (dropped, its bytes skipped as
    they come). None: not all here yet."""
    line = _line(data, at)
    if line is None:
        return None
    head, at = line
    if head[:1] == b"-":
        return [response_error(head[1:].decode(errors="replace"))], at, 0
    if head[:1] not in (b">", b"*") or not 1 <= int(head[1:]) <= 4:
        raise ValueError("not a pub/sub frame")
    first = replies(data, at, int(head[1:]) - 1, cap)
    if first is None:
        return None
    items, at = first
    line = _line(data, at)  # the last item: a message's data, maybe too large to read
    if line is None:
        return None
    head, start = line
    if head[:1] == b"$" and int(head[1:]) > cap:
        end = start + int(head[1:]) + 2
        return None, min(end, len(data)), max(0, end - len(data))
    last = replies(data, at, 1, cap)
    if last is None:
        return None
    return [*items, *last[0]], last[1], 0


def _line(data: bytes, at: int) -> tuple[bytes, int] | None:
    end = data.find(b"\r\n", at, at + LINE + 2)
    if end < 0:
        if len(data) - at > LINE:
            raise ValueError("a line longer than any pub/sub frame's")
        return None
    return data[at:end], end + 2
