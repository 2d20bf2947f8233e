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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

import redis.asyncio as aioredis

from proxy.logs import event
from proxy.shared.log import subscribed

# Notes heard before their waiter asked (the listener may run first), kept by holder.
RECENT = 256
# The largest message read (a note holds a 304's headers: a few KiB).
MAX_NOTE = 64 * 1024
# How long the listener waits for a message before looking whether it should stop.
LISTEN_SECONDS = 1.0


class Notes:
    """This replica's notes channel: one subscription, the waiters by holder."""

    def __init__(self, client: aioredis.Redis, channel: str, timeout: float) -> None:
        self.client = client
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
        """Subscribe, deliver, and after any break subscribe again (nothing to replay: a
        waiter that missed its note polls)."""
        while not self._closed:
            pubsub = self.client.pubsub()
            try:
                async with asyncio.timeout(self.timeout):
                    await subscribed(pubsub, self.channel)
                self.subscribed = True
                while not self._closed:
                    message = await pubsub.get_message(timeout=LISTEN_SECONDS)
                    data = message.get("data") if message else None
                    if message and message.get("type") == "message" and isinstance(data, bytes):
                        self.deliver(data)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # supervised: whatever it was, listen again
                if self.subscribed:
                    event("shared_notes_lost", logging.INFO, reason=type(e).__name__)
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(LISTEN_SECONDS / 2)
