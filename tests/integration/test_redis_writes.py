"""How the shared backend's commands are written (:mod:`proxy.compat.redispy`), on a real
redis-server: a command goes to the socket at once, with no task of its own (redis-py's own
send wraps every write in ``asyncio.wait_for``: a task per command); a command the socket
cannot take at once is still written whole; one that cannot be written within the timeout
(Redis stopped) fails as redis-py fails it, and the connection is not used again."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.compat.redispy import fast_writes
from tests.redis_server import RedisServer
from tests.replicas import RedisSpace


def counting_tasks() -> list[Coroutine[Any, Any, Any]]:
    """The coroutines of every task the running loop starts from now on."""
    loop = asyncio.get_running_loop()
    started: list[Coroutine[Any, Any, Any]] = []

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        started.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    return started


async def test_the_backends_commands_start_no_task_of_their_own(redis_space: RedisSpace) -> None:
    """Twenty fetch-lock claims and releases (scripts, as a flight runs them) start no task:
    redis-py's send started one per command (forty here)."""
    async with redis_space.backend() as backend:
        claim = await backend.cache_claim("main", "warm", "o", 5.0, 1000)
        await backend.cache_release("main", "warm", "o")
        assert claim.owner == "o"
        started = counting_tasks()
        try:
            for i in range(20):
                claim = await backend.cache_claim("main", f"d{i}", f"owner{i}", 5.0, 1000)
                assert claim.owner == f"owner{i}"
                await backend.cache_release("main", f"d{i}", f"owner{i}")
        finally:
            asyncio.get_running_loop().set_task_factory(None)
        names = [getattr(c, "__qualname__", repr(c)) for c in started]
        assert names == [], f"tasks started by 40 commands: {names[:4]}"
        again = await backend.cache_claim("main", "d0", "other", 5.0, 1000)
        assert again.owner == "other"  # each release let go: the commands all arrived


async def test_a_command_larger_than_the_socket_takes_at_once_is_written_whole(
    redis_space: RedisSpace,
) -> None:
    """A 24 MB value (more than a loopback socket takes in one write): the rest is drained
    under the timeout, and Redis gets every byte, then the next command on that connection."""
    client = aioredis.Redis.from_url(redis_space.url, socket_timeout=5.0)
    fast_writes(client.connection_pool)
    key = f"{redis_space.prefix}:large"
    value = os.urandom(1 << 16) * 384
    try:
        assert await client.set(key, value, px=60_000)
        assert await client.strlen(key) == len(value)
        assert await client.get(key) == value
    finally:
        await client.delete(key)
        await client.aclose()


async def test_a_write_redis_does_not_read_fails_within_the_timeout(
    redis_proc: RedisServer,
) -> None:
    """Redis stopped (SIGSTOP) while a 64 MB command is written: the write fails with
    redis-py's TimeoutError within about the timeout (never a hang), the connection is
    dropped, and once Redis runs again the next command works on a new connection."""
    client = aioredis.Redis.from_url(
        redis_proc.url,
        socket_timeout=0.5,
        retry=Retry(NoBackoff(), 0),  # as the backend's
    )
    fast_writes(client.connection_pool)
    assert redis_proc.proc is not None
    try:
        assert await client.ping()
        os.kill(redis_proc.proc.pid, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises((rexc.TimeoutError, rexc.ConnectionError)):
                await asyncio.wait_for(client.set("big", b"x" * (64 << 20)), 10.0)
            assert loop.time() - began < 5.0
        finally:
            os.kill(redis_proc.proc.pid, signal.SIGCONT)
        assert await client.ping()
        assert await client.set("small", b"y") and await client.get("small") == b"y"
    finally:
        await client.aclose()


def test_a_pool_gets_the_fast_writes_once_whatever_its_connection_class() -> None:
    """Plain, TLS and Unix-socket pools keep their own class, with the fast send over it;
    asked twice, a pool is not wrapped twice."""
    for url in ("redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/none.sock"):
        pool = aioredis.Redis.from_url(url).connection_pool
        base = pool.connection_class
        fast_writes(pool)
        made = pool.connection_class
        assert issubclass(made, base) and made is not base
        fast_writes(pool)
        assert pool.connection_class is made
