"""A gap in the invalidations a replica hears, over a real Redis: what it missed is replayed
from the invalidation log (it drops exactly that and keeps the rest); it purges everything
only when the log does not reach back to what it last heard, or Redis's epoch changed.

B's subscription is cut without touching A's: A talks to Redis as a user of its own, and the
default user (B's) loses its channels (Redis 7 then drops its subscriber, and each new
subscription is refused) until the test gives them back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from proxy.settings import (
    Secret,
    SharedSettings,
)
from proxy.shared import RedisBackend
from proxy.shared.log import Cursor, Delivered, split
from proxy.shared.metrics import SharedMetrics
from tests.conftest import Proxy, Sandbox
from tests.integration.test_cache import LIST, ONE, get
from tests.redis_server import TOKEN_KEY, RedisServer
from tests.replicas import RedisSpace, Replicas, caching

WRITER = "writer"


@pytest.fixture
async def redis(own_redis_space: RedisSpace) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis_space.url)
    await client.execute_command("ACL", "SETUSER", WRITER, "on", ">pw", "~*", "&*", "+@all")
    yield client
    await client.aclose()


async def pair(replicas: Replicas, sandbox: Sandbox) -> list[Proxy]:
    """A writes as its own user; B as the default one."""
    shared = replicas.space.settings(timeout=0.3)
    writer = replace(shared, url=shared.url.replace("redis://", f"redis://{WRITER}:pw@"))
    return await replicas.start(
        caching(sandbox.url, replicas.tmp_path / "a", writer),
        caching(sandbox.url, replicas.tmp_path / "b", shared),
    )


async def two_ids(client: aiohttp.ClientSession, proxy: Proxy) -> tuple[str, str]:
    found = json.loads((await get(client, proxy.url + LIST))[2])
    return ONE.format(found[0]["id"]), ONE.format(found[1]["id"])


def recoveries(proxy: Proxy, how: str) -> float:
    value = proxy.registry.get_sample_value(  # type: ignore[attr-defined]
        "kounta_proxy_cache_gap_recoveries_total", {"how": how}
    )
    return float(value or 0.0)


async def cut(redis: aioredis.Redis) -> None:
    """B's subscription goes, and no new one is allowed."""
    await redis.execute_command("ACL", "SETUSER", "default", "resetchannels")
    await redis.execute_command("CLIENT", "KILL", "USER", "default", "SKIPME", "yes")
    await asyncio.sleep(0.2)


async def mend(redis: aioredis.Redis) -> None:
    await redis.execute_command("ACL", "SETUSER", "default", "allchannels")


async def cached_on_b(client: aiohttp.ClientSession, b: Proxy, *paths: str) -> None:
    for path in paths:
        await get(client, b.url + path)
        assert (await get(client, b.url + path))[1]["X-Cache"] == "HIT"


async def write_missed_by_b(client: aiohttp.ClientSession, a: Proxy, b: Proxy, one: str) -> bytes:
    """A changes ``one`` while B hears nothing: B still answers its old copy."""
    old = (await get(client, b.url + one))[2]
    async with client.put(a.url + one, json={"first_name": "Zed"}) as r:
        assert r.status == 200
    await asyncio.sleep(0.3)
    _, headers, body = await get(client, b.url + one)
    assert (headers["X-Cache"], body) == ("HIT", old), "B heard the write: no gap"
    return old


async def only_local(redis: aioredis.Redis, prefix: str) -> None:
    """The entries in Redis go, so a HIT on B can only come from B's own store."""
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:cache:*:e:*")]
    if keys:
        await redis.delete(*keys)


async def until_fresh(client: aiohttp.ClientSession, b: Proxy, one: str, old: bytes) -> None:
    deadline = time.monotonic() + 5
    while (await get(client, b.url + one))[2] == old:
        assert time.monotonic() < deadline, "B never dropped the write it missed"
        await asyncio.sleep(0.05)


@dataclass
class Gap:
    """B has ``one`` and ``other`` in its store; A changed ``one`` while B heard nothing."""

    client: aiohttp.ClientSession
    redis: aioredis.Redis
    prefix: str
    b: Proxy
    one: str
    other: str
    old: bytes

    async def mend(self) -> None:
        """B may subscribe again; it has its answer for ``one`` right (either way)."""
        await mend(self.redis)
        await until_fresh(self.client, self.b, self.one, self.old)
        await only_local(self.redis, self.prefix)

    async def kept_other(self) -> bool:
        return (await get(self.client, self.b.url + self.other))[1]["X-Cache"] == "HIT"


@pytest.fixture
async def gap(
    own_replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession, redis: aioredis.Redis
) -> Gap:
    a, b = await pair(own_replicas, sandbox)
    one, other = await two_ids(client, a)
    await cached_on_b(client, b, one, other)
    await cut(redis)
    old = await write_missed_by_b(client, a, b, one)
    return Gap(client, redis, own_replicas.space.prefix, b, one, other, old)


async def test_a_blip_replays_what_was_missed_and_keeps_the_rest(gap: Gap) -> None:
    await gap.mend()
    assert await gap.kept_other(), "B purged what it kept"
    assert b"Zed" in (await get(gap.client, gap.b.url + gap.one))[2]
    assert (recoveries(gap.b, "replayed"), recoveries(gap.b, "purged")) == (1, 0)


async def test_a_log_trimmed_past_what_the_replica_heard_purges_everything(gap: Gap) -> None:
    log = f"{gap.prefix}:events:cache:log"
    assert await gap.redis.xlen(log) >= 1
    await gap.redis.xtrim(log, maxlen=0, approximate=False)  # as a long gap under many writes
    await gap.mend()
    assert not await gap.kept_other(), "B kept what it could not know it missed"
    assert (recoveries(gap.b, "replayed"), recoveries(gap.b, "purged")) == (0, 1)


async def test_a_restarted_redis_purges_everything_though_its_log_reaches_back(
    own_replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """The snapshot holds the whole log (nothing missed as far as the log can tell), but a
    restart is a new epoch: what Redis held may be older than what replicas saw."""
    a, b = await own_replicas.caching(sandbox.url)
    space = own_replicas.space
    one, other = await two_ids(client, a)
    await cached_on_b(client, b, one, other)
    async with client.put(a.url + one, json={"first_name": "Zed"}) as r:
        assert r.status == 200
    async with space.client() as redis:
        assert await redis.xlen(f"{space.prefix}:events:cache:log") == 1
        await redis.save()
    space.server.stop()
    space.server.start()
    deadline = time.monotonic() + 5
    while recoveries(b, "purged") < 1:
        assert time.monotonic() < deadline, "B did not see the new epoch"
        await asyncio.sleep(0.05)
    async with space.client() as redis:
        await only_local(redis, space.prefix)
    assert (await get(client, b.url + other))[1]["X-Cache"] == "MISS", "B kept an old epoch's"
    assert recoveries(b, "replayed") == 0


class Listener:
    """A backend listening on topic ``t`` as the default user, and one sending as WRITER."""

    def __init__(
        self, server: RedisServer, prefix: str, length: int = 10000, compat: str = "off"
    ) -> None:
        self.registry = CollectorRegistry()
        settings = SharedSettings(
            backend="redis",
            url=server.url,
            key_prefix=prefix,
            invalidation_log=length,
            token_key=Secret(TOKEN_KEY),
            previous_format=compat,  # type: ignore[arg-type]
        )
        writer = server.url.replace("redis://", f"redis://{WRITER}:pw@")
        self.space = RedisSpace(server, prefix)
        self.listener = RedisBackend(settings, SharedMetrics(self.registry))
        self.sender = RedisBackend(
            replace(settings, url=writer), SharedMetrics(CollectorRegistry())
        )
        self.got: list[bytes] = []
        self.gaps = 0

    async def __aenter__(self) -> Listener:
        await self.listener.start()
        await self.sender.start()
        self.listener.listen("t", self.got.append, self._gap)
        await self.space.listening(1, topic="t")
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.sender.close()
        await self.listener.close()

    def _gap(self) -> None:
        self.gaps += 1

    async def resumed(self) -> None:
        deadline = time.monotonic() + 5
        while self.how("replayed") + self.how("purged") < 1:
            assert time.monotonic() < deadline, "the listener never came back"
            await asyncio.sleep(0.05)

    def how(self, how: str) -> float:
        value = self.registry.get_sample_value(
            "kounta_proxy_cache_gap_recoveries_total", {"how": how}
        )
        return float(value or 0.0)


async def test_log_entries_and_unlogged_messages_that_cannot_be_followed_purge(
    redis_proc: RedisServer, redis: aioredis.Redis, redis_prefix: str
) -> None:
    """A log entry of a shape this release does not write, a message without a log id (the
    previous release's, read while rolling), a log turned off, a sealed message replayed
    under a forged id: the gap purges. A message whose MAC fails is dropped and changes
    nothing: the gap still replays."""
    log = f"{redis_prefix}:events:t:log"
    async with Listener(redis_proc, redis_prefix) as one:
        await cut(redis)
        await one.sender.publish("t", b"missed")
        await redis.xadd(log, {"m": "x", "more": "y"}, id="0-2")
        await mend(redis)
        await one.resumed()
        assert (one.how("purged"), one.gaps, one.got) == (1, 1, [])
    async with Listener(redis_proc, f"{redis_prefix}-old", compat="read") as two:
        await redis.publish(f"{redis_prefix}-old:events:t", b"oldreplica|change")
        await asyncio.sleep(0.2)
        await cut(redis)
        await two.sender.publish("t", b"missed")
        await mend(redis)
        await two.resumed()
        assert (two.how("purged"), two.gaps, two.got) == (1, 1, [b"change"])
    async with Listener(redis_proc, f"{redis_prefix}-off", length=0) as off:
        await cut(redis)
        await off.sender.publish("t", b"missed")
        await mend(redis)
        await off.resumed()
        assert (off.how("purged"), off.gaps) == (1, 1)
        assert not await redis.exists(f"{redis_prefix}-off:events:t:log")
    # An entry deleted from the middle of what was missed (XDEL): a hole, so a purge.
    async with Listener(redis_proc, f"{redis_prefix}-hole") as hole:
        await cut(redis)
        for n in range(3):
            await hole.sender.publish("t", b"missed %d" % n)
        await redis.xdel(f"{redis_prefix}-hole:events:t:log", "0-2")
        await mend(redis)
        await hole.resumed()
        assert (hole.how("purged"), hole.gaps, hole.got) == (1, 1, [])
    # A sealed message heard before, sent again under an id ahead of the log: what the log
    # holds under that id is not what was heard, so the gap purges rather than skip entries.
    async with Listener(redis_proc, f"{redis_prefix}-forged") as forged:
        await forged.sender.publish("t", b"first")
        await asyncio.sleep(0.2)
        [(_, fields)] = await redis.xrange(f"{redis_prefix}-forged:events:t:log")
        await redis.publish(f"{redis_prefix}-forged:events:t", b"@0-5|" + fields[b"m"])
        await asyncio.sleep(0.2)
        await cut(redis)
        for n in range(6):
            await forged.sender.publish("t", b"missed %d" % n)
        await mend(redis)
        await forged.resumed()
        assert (forged.how("purged"), forged.gaps) == (1, 1)
    # A good log; a forged message (no MAC) dropped; hostile data in an entry: replayed to
    # the decoder, which judges it.
    async with Listener(redis_proc, f"{redis_prefix}-ok") as ok:
        await ok.sender.publish("t", b"heard")
        await redis.publish(f"{redis_prefix}-ok:events:t", b"@0-9|evil|change")
        await asyncio.sleep(0.2)
        await cut(redis)
        await ok.sender.publish("t", b"\xff not a change")
        await mend(redis)
        await ok.resumed()
        assert (ok.how("replayed"), ok.gaps) == (1, 0)
        assert ok.got == [b"heard", b"\xff not a change"]


def test_a_message_is_taken_apart_into_log_id_and_body() -> None:
    assert split(b"@0-7|sealed|x") == Delivered((0, 7), b"sealed|x")
    assert split(b"abc|{}") == Delivered(None, b"abc|{}")  # not logged
    for hostile in (b"@0-x|{}", b"@1-2-3|{}", b"@" + b"9" * 30 + b"-1|{}", b"@|"):
        assert split(hostile).id is None  # not a log id: the cursor is forgotten
    cursor = Cursor(last=(0, 3))
    cursor.heard(split(b"@0-2|a"))
    assert cursor.last == (0, 3)  # never backwards
    cursor.heard(split(b"@0-9|a"))
    assert cursor.last == (0, 9)
    cursor.heard(split(b"x|a"))
    assert cursor.last is None
