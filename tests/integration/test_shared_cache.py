"""Cache invalidations between replicas over a real Redis: a write through replica A removes
the entry from replica B within a second of A's answer; a replica that lost its subscription
purges its store when it resubscribes."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from proxy.cache.broadcast import BadMessage, decode, encode
from proxy.cache.invalidation import Invalidation, Purge
from proxy.edge.services import SERVICES
from proxy.ops.admin import create_admin_app
from proxy.shared.records import RecordKeys
from tests.conftest import Proxy, Sandbox, serve
from tests.integration.test_cache import LIST, ONE, get
from tests.redis_server import TOKEN_KEY
from tests.replicas import RedisSpace, Replicas


async def first_id(client: aiohttp.ClientSession, proxy: Proxy) -> int:
    return int(json.loads((await get(client, proxy.url + LIST))[2])[0]["id"])


async def test_a_write_through_one_replica_reaches_the_others_within_a_second(
    replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    a, b = await replicas.caching(sandbox.url)
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
    own_replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    a, b = await own_replicas.caching(sandbox.url)
    redis = own_replicas.space.server
    one = ONE.format(await first_id(client, a))
    await get(client, b.url + one)
    assert (await get(client, b.url + one))[1]["X-Cache"] == "HIT"
    redis.stop()
    # Redis away: replicas keep answering from their own stores.
    assert (await get(client, b.url + one))[1]["X-Cache"] == "HIT"
    async with client.put(a.url + one, json={"first_name": "Yann"}) as r:
        assert r.status == 200  # B cannot hear of this one
    redis.start()
    deadline = time.monotonic() + 5
    while b"Yann" not in (await get(client, b.url + one))[2]:
        assert time.monotonic() < deadline, "B never dropped what it may have missed"
        await asyncio.sleep(0.1)


async def test_a_purge_on_one_replica_purges_the_others(
    replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    a, b = await replicas.caching(sandbox.url)
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


def test_foreign_damaged_or_hostile_messages_are_refused() -> None:
    for data in (b"", b"[]", b"null", b'{"account": 1, "paths": [], "lists_of": []}',
                 b'{"account": "a", "paths": [1], "lists_of": []}', b"\xff",
                 b"[" * 100_000 + b"]" * 100_000, b'{"a": ' * 50 + b"1" + b"}" * 50,
                 b'{"v": 1, "account": "a", "paths": ["x"], "lists_of": []}',
                 b'{"v": 1, "account": "a", "paths": [], "lists_of": [], "more": 1}',
                 b'{"v": 2, "account": "a", "paths": [], "lists_of": []}',
                 b'{"v": true, "account": "a", "paths": [], "lists_of": []}',
                 b'{"v": 1, "purge": "v1", "account": null}',
                 b'{"v": 1, "account": "a", "paths": ["/' + b"x" * 300_000 + b'"], "lists_of": []}',
                 b'{"account": "a", "paths": ' + b'["/x"],' * 0 + b'"/x", "lists_of": []}'):  # fmt: skip
        with pytest.raises(BadMessage):
            decode(data)
    inv = Invalidation("main", frozenset({"/v1/x"}), frozenset({"orders"}))
    assert decode(encode(inv)) == inv
    assert decode(encode(Purge("/v1", None))) == Purge("/v1", None)
    assert decode(encode(Purge("", "main"))) == Purge("", "main")
    mid = Invalidation("main", frozenset(), frozenset(), frozenset({"/v1/c/5/sites/*/x*"}))
    assert decode(encode(mid)) == mid
    # The previous release's messages (no format version) are read as they were.
    old = b'{"account":"main","paths":["/v1/x"],"lists_of":["orders"]}'
    assert decode(old) == inv
    assert decode(b'{"purge":"/v1","account":null}') == Purge("/v1", None)


async def test_a_hostile_message_is_dropped_and_counted_and_invalidation_goes_on(
    replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Deep nesting (RecursionError in json), a huge message, a wrong schema and an unknown
    format version on the channel: each dropped and counted, and B still hears A's write."""
    a, b = await replicas.caching(sandbox.url)
    one = ONE.format(await first_id(client, a))
    await get(client, b.url + one)
    assert (await get(client, b.url + one))[1]["X-Cache"] == "HIT"
    hostile = (
        b"[" * 200_000 + b"]" * 200_000,
        b'{"v": 1, "account": "main", "paths": ["' + b"x" * 2_000_000 + b'"], "lists_of": []}',
        b'{"v": 1, "account": "main", "paths": "/v1/x", "lists_of": []}',
        b'{"v": 99, "account": "main", "paths": [], "lists_of": []}',
    )
    evil = aioredis.Redis.from_url(replicas.space.url)
    channel = f"{replicas.space.prefix}:events:cache"
    # Signed with the key (a replica's bug, or a key holder): past the MAC, the decoder's turn.
    keys = RecordKeys.derive(TOKEN_KEY)
    try:
        for data in hostile:
            await evil.publish(channel, keys.seal(channel.encode(), b"attacker|" + data))
    finally:
        await evil.aclose()
    async with client.put(a.url + one, json={"first_name": "Zed"}) as r:
        assert r.status == 200
    answered = time.monotonic()
    while b"Zed" not in (await get(client, b.url + one))[2]:
        assert time.monotonic() - answered < 1.0, "replica B no longer hears invalidations"
        await asyncio.sleep(0.01)
    assert rejected(b) == len(hostile)


def rejected(proxy: Proxy) -> float:
    value = proxy.registry.get_sample_value(  # type: ignore[attr-defined]
        "kounta_proxy_cache_broadcasts_total", {"result": "rejected"}
    )
    return float(value or 0.0)


async def test_a_listener_that_dies_is_restarted_counted_and_reports_a_gap(
    redis_space: RedisSpace,
) -> None:
    """Whatever kills the listener (here its callback raising), it subscribes again, logs,
    counts, and reports a gap (the replica purges as after a lost subscription)."""
    registry = CollectorRegistry()
    got: list[bytes] = []
    gaps: list[float] = []

    def on_message(data: bytes) -> None:
        got.append(data)
        if data == b"boom":
            raise RecursionError("maximum recursion depth exceeded")

    async with redis_space.backend(registry) as listener, redis_space.backend() as sender:
        listener.listen("t", on_message, lambda: gaps.append(time.monotonic()))
        await redis_space.listening(1, topic="t")
        await sender.publish("t", b"boom")
        deadline = time.monotonic() + 3
        while not gaps:
            assert time.monotonic() < deadline, "no gap reported after the listener died"
            await asyncio.sleep(0.02)
        await sender.publish("t", b"after")
        while b"after" not in got:
            assert time.monotonic() < deadline, "the listener was not restarted"
            await asyncio.sleep(0.02)
            await sender.publish("t", b"after")
    restarts = registry.get_sample_value(
        "kounta_proxy_shared_listener_restarts_total", {"topic": "t"}
    )
    assert restarts == 1
