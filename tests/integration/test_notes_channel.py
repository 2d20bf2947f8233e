"""The notes channel (proxy.shared.notes) on a real redis-server: read by a protocol of its own
on a connection taken from the data pool, a note reaches its waiter as its bytes are read
(no task woken per message); what anyone may publish there (a message too large, one without
a holder, another channel's) never stops it; a subscription lost is made again."""

from __future__ import annotations

import asyncio
import time

import redis

from tests.replicas import RedisSpace, until


async def test_a_note_read_reaches_its_waiter_without_a_loop_turn_of_its_own(
    redis_space: RedisSpace,
) -> None:
    async with redis_space.backend() as backend:
        notes = backend.notes
        await until(lambda: notes.subscribed, what="notes heard")
        waiter = asyncio.create_task(notes.wait("holder", 5.0))
        await asyncio.sleep(0)  # the waiter waits
        publisher = redis.Redis.from_url(redis_space.url)
        try:
            assert publisher.publish(notes.channel, b"holder|the note") == 1
        finally:
            publisher.close()
        time.sleep(0.05)  # noqa: ASYNC251 (the loop held: the note is in the socket before it reads on)
        turns = 0

        def turn() -> None:
            nonlocal turns
            turns += 1
            if not waiter.done():
                asyncio.get_running_loop().call_soon(turn)

        asyncio.get_running_loop().call_soon(turn)
        assert await waiter == b"the note"
        # Turn 1 reads the note and hands it to the waiter, turn 2 runs the waiter, turn 3 finds
        # it done (was 4: redis-py's listener task woke in turn 2 to parse and hand it on).
        assert turns <= 3


async def test_what_anyone_may_publish_does_not_stop_the_notes(redis_space: RedisSpace) -> None:
    async with redis_space.backend() as backend, redis_space.client() as client:
        notes = backend.notes
        await until(lambda: notes.subscribed, what="notes heard")
        heard = asyncio.create_task(notes.wait("holder", 5.0))
        for message in (
            b"holder|" + b"x" * (4 << 20),  # too large: skipped as it streams by
            b"no holder here",
            b"h" * 100 + b"|a holder too long",
            b"",
        ):
            await client.publish(notes.channel, message)
        await client.publish(notes.channel + "x", b"holder|another channel's")
        await client.publish(notes.channel, b"holder|the note")
        assert await heard == b"the note"
        assert notes.subscribed
        assert notes._recent == {}  # nothing else kept


async def test_a_lost_subscription_is_made_again(redis_space: RedisSpace) -> None:
    async with redis_space.backend() as backend, redis_space.client() as client:
        notes = backend.notes
        await until(lambda: notes.subscribed, what="notes heard")
        killed = await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 1
        await until(lambda: not notes.subscribed, what="the subscription lost")
        await until(lambda: notes.subscribed, what="subscribed again")
        heard = asyncio.create_task(notes.wait("holder", 5.0))
        await asyncio.sleep(0)
        assert await client.publish(notes.channel, b"holder|after") == 1
        assert await heard == b"after"
