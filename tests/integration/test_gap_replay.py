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
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from proxy.settings import CacheRule, CacheSettings, RetrySettings, Settings, SharedSettings
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings
from tests.integration.test_cache import LIST, ONE, get
from tests.redis_server import RedisServer

WRITER = "writer"


def settings_for(sandbox: Sandbox, tmp_path: Any, name: str, url: str, prefix: str) -> Settings:
    return proxy_settings(
        sandbox.url,
        tmp_path / name,
        cache=CacheSettings(rules=(CacheRule("/v1/*", fresh_for=600),)),
        retry=RetrySettings(attempts=1),
        shared=SharedSettings(backend="redis", url=url, key_prefix=prefix, timeout=0.3),
    )


@pytest.fixture
async def redis(redis_proc: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_proc.url)
    await client.execute_command("ACL", "SETUSER", WRITER, "on", ">pw", "~*", "&*", "+@all")
    yield client
    await client.aclose()


async def pair(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, server: RedisServer, prefix: str
) -> tuple[Proxy, Proxy]:
    """A writes as its own user; B as the default one."""
    a_url = server.url.replace("redis://", f"redis://{WRITER}:pw@")
    a = await make_proxy(
        settings_for(sandbox, tmp_path, "a", a_url, prefix), registry=CollectorRegistry()
    )
    b = await make_proxy(
        settings_for(sandbox, tmp_path, "b", server.url, prefix), registry=CollectorRegistry()
    )
    await asyncio.sleep(0.3)  # both subscribed
    return a, b


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
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    redis_proc: RedisServer,
    redis: aioredis.Redis,
    redis_prefix: str,
) -> Gap:
    a, b = await pair(make_proxy, sandbox, tmp_path, redis_proc, redis_prefix)
    one, other = await two_ids(client, a)
    await cached_on_b(client, b, one, other)
    await cut(redis)
    old = await write_missed_by_b(client, a, b, one)
    return Gap(client, redis, redis_prefix, b, one, other, old)


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
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    redis_proc: RedisServer,
    redis_prefix: str,
) -> None:
    """The snapshot holds the whole log (nothing missed as far as the log can tell), but a
    restart is a new epoch: what Redis held may be older than what replicas saw."""
    a = await make_proxy(
        settings_for(sandbox, tmp_path, "a", redis_proc.url, redis_prefix),
        registry=CollectorRegistry(),
    )
    b = await make_proxy(
        settings_for(sandbox, tmp_path, "b", redis_proc.url, redis_prefix),
        registry=CollectorRegistry(),
    )
    await asyncio.sleep(0.3)
    one, other = await two_ids(client, a)
    await cached_on_b(client, b, one, other)
    async with client.put(a.url + one, json={"first_name": "Zed"}) as r:
        assert r.status == 200
    redis = aioredis.Redis.from_url(redis_proc.url)
    try:
        assert await redis.xlen(f"{redis_prefix}:events:cache:log") == 1
        await redis.save()
    finally:
        await redis.aclose()
    redis_proc.stop()
    redis_proc.start()
    deadline = time.monotonic() + 5
    while recoveries(b, "purged") < 1:
        assert time.monotonic() < deadline, "B did not see the new epoch"
        await asyncio.sleep(0.05)
    redis = aioredis.Redis.from_url(redis_proc.url)
    try:
        await only_local(redis, redis_prefix)
    finally:
        await redis.aclose()
    assert (await get(client, b.url + other))[1]["X-Cache"] == "MISS", "B kept an old epoch's"
    assert recoveries(b, "replayed") == 0
