"""Cache invalidations between replicas over a real Redis: a write through replica A removes
the entry from replica B within a second of A's answer; a replica that lost its subscription
purges its store when it resubscribes."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from proxy.cache.broadcast import Purge, decode, encode
from proxy.cache.policy import Invalidation
from proxy.edge.services import SERVICES
from proxy.ops.admin import create_admin_app
from proxy.settings import CacheRule, CacheSettings, RetrySettings, Secret, Settings, SharedSettings
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings, serve
from tests.integration.test_cache import LIST, ONE, get
from tests.redis_server import TOKEN_KEY, RedisServer


def settings_for(sandbox: Sandbox, tmp_path: Any, name: str, url: str, prefix: str) -> Settings:
    return proxy_settings(
        sandbox.url,
        tmp_path / name,
        cache=CacheSettings(rules=(CacheRule("/v1/*", fresh_for=600),)),
        retry=RetrySettings(attempts=1),
        shared=SharedSettings(
            backend="redis", url=url, key_prefix=prefix, timeout=0.3, token_key=Secret(TOKEN_KEY)
        ),
    )


async def pair(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, url: str, prefix: str
) -> tuple[Proxy, Proxy]:
    a = await make_proxy(
        settings_for(sandbox, tmp_path, "a", url, prefix), registry=CollectorRegistry()
    )
    b = await make_proxy(
        settings_for(sandbox, tmp_path, "b", url, prefix), registry=CollectorRegistry()
    )
    await asyncio.sleep(0.2)  # both subscribed
    return a, b


async def first_id(client: aiohttp.ClientSession, proxy: Proxy) -> int:
    return int(json.loads((await get(client, proxy.url + LIST))[2])[0]["id"])


async def test_a_write_through_one_replica_reaches_the_others_within_a_second(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    a, b = await pair(make_proxy, sandbox, tmp_path, redis_server.url, redis_prefix)
    one = ONE.format(await first_id(client, a))
    for proxy in (a, b):
        await get(client, proxy.url + one)
        await get(client, proxy.url + LIST)
        assert (await get(client, proxy.url + one))[1]["X-Cache"] == "HIT"
    async with client.put(a.url + one, json={"first_name": "Zed"}) as r:
        assert r.status == 200
    answered = time.monotonic()
    while True:
        _, headers, body = await get(client, b.url + one)
        if b"Zed" in body:
            break
        assert time.monotonic() - answered < 1.0, "replica B still answers the old record"
        await asyncio.sleep(0.01)
    assert headers["X-Cache"] == "MISS"
    # The collection's lists went too.
    assert (await get(client, b.url + LIST))[1]["X-Cache"] == "MISS"


async def test_a_replica_that_lost_its_subscription_purges_when_it_resubscribes(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    redis_proc: RedisServer,
    redis_prefix: str,
) -> None:
    a, b = await pair(make_proxy, sandbox, tmp_path, redis_proc.url, redis_prefix)
    one = ONE.format(await first_id(client, a))
    await get(client, b.url + one)
    assert (await get(client, b.url + one))[1]["X-Cache"] == "HIT"
    redis_proc.stop()
    # Redis away: replicas keep answering from their own stores.
    assert (await get(client, b.url + one))[1]["X-Cache"] == "HIT"
    async with client.put(a.url + one, json={"first_name": "Yann"}) as r:
        assert r.status == 200  # B cannot hear of this one
    redis_proc.start()
    deadline = time.monotonic() + 5
    while b"Yann" not in (await get(client, b.url + one))[2]:
        assert time.monotonic() < deadline, "B never dropped what it may have missed"
        await asyncio.sleep(0.1)


async def test_a_purge_on_one_replica_purges_the_others(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    a, b = await pair(make_proxy, sandbox, tmp_path, redis_server.url, redis_prefix)
    one = ONE.format(await first_id(client, a))
    await get(client, b.url + one)
    assert (await get(client, b.url + one))[1]["X-Cache"] == "HIT"
    runner, port = await serve(create_admin_app(a.app[SERVICES]))
    try:
        async with client.post(f"http://127.0.0.1:{port}/cache/purge?prefix=/v1/companies") as r:
            assert r.status == 200
    finally:
        await runner.cleanup()
    deadline = time.monotonic() + 1.0
    while (await get(client, b.url + one))[1]["X-Cache"] == "HIT":
        assert time.monotonic() < deadline, "B kept the purged entry"
        await asyncio.sleep(0.02)


def test_foreign_or_damaged_messages_are_ignored() -> None:
    for data in (b"", b"[]", b"null", b'{"account": 1, "paths": [], "lists_of": []}',
                 b'{"account": "a", "paths": [1], "lists_of": []}', b"\xff"):  # fmt: skip
        assert decode(data) is None
    inv = Invalidation("main", frozenset({"/v1/x"}), frozenset({"orders"}))
    assert decode(encode(inv)) == inv
    assert decode(encode(Purge("/v1", None))) == Purge("/v1", None)
