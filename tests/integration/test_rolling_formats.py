"""Formats that can roll (a rolling upgrade with mixed replicas): the previous release's record
writers against this release's readers, and the reverse, on a real Redis. The previous release's
code is kept as fixture code in :mod:`tests.integration.previous_release`."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.auth.shared_tokens import SharedTokenStore, TokenStoreError
from proxy.auth.token_file import StoredToken
from proxy.cache.entry import Entry
from proxy.cache.records import decode, digest, encode
from proxy.cache.store import Stored
from proxy.settings import Secret
from proxy.shared.records import BadRecord
from tests.integration import previous_release as previous
from tests.redis_server import TOKEN_KEY
from tests.replicas import RedisSpace

KEY = '[1,"main","GET","/v1/x","",["*/*",null,null]]'
ENTRY = Entry(200, (("ETag", '"1"'),), "main", "/v1/x", 1.0, 2.0, 0.0, 60.0, 0.0, 0.0,
              False, (), 3)  # fmt: skip
TOKEN = StoredToken("access-1", "refresh-1", 4102444800.0, obtained_at=1.0)


async def test_token_records_roll_both_ways(
    redis_space: RedisSpace, redis_client: aioredis.Redis
) -> None:
    key = f"{redis_space.prefix}:token:main"
    # The previous release writes (CAS from nothing, its encryption, no format field) ...
    cas = redis_client.register_script(previous.CAS_SCRIPT)
    assert await cas(keys=[key], args=[0, previous.encrypt_token(TOKEN_KEY, TOKEN)]) == 1
    async with redis_space.backend() as backend:
        store = SharedTokenStore("main", backend, backend.tokens, backend.settings)
        # ... and this release reads it.
        assert await store.fetch() == TOKEN
        # This release writes the next version ...
        newer = StoredToken("access-2", "refresh-2", 4102444800.0, obtained_at=2.0)
        assert await store.save(newer) == newer
    # ... and the previous release reads it (the extra fields are ignored).
    found = await redis_client.hmget(key, ["version", "data"])
    assert previous.token_version(found) == 2
    assert previous.decrypt_token(TOKEN_KEY, found[1]) == newer
    # And writes over it again with its own compare-and-set.
    assert await cas(keys=[key], args=[2, previous.encrypt_token(TOKEN_KEY, TOKEN)]) == 3


@pytest.mark.parametrize("step", ["write", "read"])
async def test_cache_records_of_the_previous_release_are_read_while_rolling(
    redis_space: RedisSpace, redis_client: aioredis.Redis, step: str
) -> None:
    name = f"{redis_space.prefix}:cache:main:e:{digest(KEY)}"
    async with redis_space.backend(previous_format=step) as backend:  # (its epoch first)
        await redis_client.set(name, previous.encode(KEY, Stored(ENTRY, b"abc")), px=60_000)
        data = await backend.cache_get("main", digest(KEY), 1000)
        assert data is not None and decode(KEY, data).body == b"abc"
    # Once every replica runs this release ("off"), an unsigned record is a bad one.
    async with redis_space.backend(previous_format="off") as backend:
        with pytest.raises(BadRecord):
            await backend.cache_get("main", digest(KEY), 1000)


async def test_cache_records_this_release_writes_while_rolling_are_read_by_the_previous(
    redis_space: RedisSpace, redis_client: aioredis.Redis
) -> None:
    name = f"{redis_space.prefix}:cache:main:e:{digest(KEY)}"
    for step, readable in [("write", True), ("read", False)]:
        async with redis_space.backend(previous_format=step) as backend:
            record = encode(KEY, Stored(ENTRY, b"abc"))
            assert await backend.cache_put("main", digest(KEY), "/v1/x", record, 60, "0")
        raw = await redis_client.get(name)
        if readable:  # "write": exactly what the previous release reads
            assert previous.decode(KEY, raw).body == b"abc"
        else:  # "read": sealed, which is why "write" comes first
            with pytest.raises(previous.BadRecord):
                previous.decode(KEY, raw)


async def test_invalidation_messages_roll_both_ways(
    redis_space: RedisSpace, redis_client: aioredis.Redis
) -> None:
    channel = f"{redis_space.prefix}:events:cache"
    body = previous.invalidation("main", ["/v1/x"], [])
    got: list[bytes] = []
    listener = redis_client.pubsub(ignore_subscribe_messages=True)
    await listener.subscribe(channel)
    async with redis_space.backend(previous_format="write") as new:
        new.listen("cache", got.append, lambda: None)
        await redis_space.listening(2)
        # The previous release publishes; this release (rolling) applies it.
        await redis_client.publish(channel, previous.message("old-replica", body))
        # This release publishes ("write" step); the previous release reads it.
        await new.publish("cache", body)
        seen: list[bytes] = []
        for _ in range(40):
            message: dict[str, Any] | None = await listener.get_message(timeout=0.05)
            if message is not None:
                payload = previous.received("old-replica", message["data"])
                if payload is not None and payload == body:
                    seen.append(payload)
            if seen and got:
                break
    await listener.aclose()  # type: ignore[no-untyped-call]
    assert got == [body]
    assert json.loads(seen[0])["paths"] == ["/v1/x"]


async def test_budget_records_roll_both_ways(
    redis_space: RedisSpace, redis_client: aioredis.Redis
) -> None:
    keys = [f"{redis_space.prefix}:budget:main", f"{redis_space.prefix}:budget:main:log"]
    old_pause = redis_client.register_script(previous.PAUSE)
    old_take = redis_client.register_script(previous.TAKE)
    # The previous release pauses; this release's take honours it (cut to its own cap).
    assert float(await old_pause(keys=keys[:1], args=[30.0, 60, 3, 61.0])) > 29
    async with redis_space.backend() as backend:
        assert 29 < await backend.take("main", 60, 3, 61.0) <= 30.5
        assert 9 < await backend.take("main", 60, 3, 61.0, longest=10.0) <= 10.5
        # This release pauses longer; the previous release's take honours it.
        assert await backend.pause("main", 50.0, 60, 3, 61.0) > 49
    taken, wait = await old_take(keys=keys, args=[60, 3, repr(61.0), "m1"])
    assert int(taken) == 0 and 49 < float(wait) <= 50.5


async def test_a_rotated_key_reads_what_the_previous_key_wrote_and_only_then(
    redis_space: RedisSpace,
) -> None:
    """shared.token_key_previous: tokens and cache records of the old key are read while the
    replicas move; without it they are refused (a store error, a bad record)."""
    old_key = TOKEN_KEY
    new_key = "q0J1kO2m0bdM4m0dDUQtPqYz1jzXx0eG9bNaV2eQ1YE="

    async with redis_space.backend(token_key=Secret(old_key)) as old:
        await SharedTokenStore("main", old, old, old.settings).save(TOKEN)
        record = encode(KEY, Stored(ENTRY, b"abc"))
        assert await old.cache_put("main", digest(KEY), "/v1/x", record, 60, "0")
    async with redis_space.backend(
        token_key=Secret(new_key), token_key_previous=Secret(old_key)
    ) as rotating:
        assert (
            await SharedTokenStore("main", rotating, rotating, rotating.settings).fetch() == TOKEN
        )
        assert await rotating.cache_get("main", digest(KEY), 1000) == record
    async with redis_space.backend(token_key=Secret(new_key)) as rotated:
        with pytest.raises(TokenStoreError, match="cannot be decrypted"):
            await SharedTokenStore("main", rotated, rotated, rotated.settings).fetch()
        with pytest.raises(BadRecord):
            await rotated.cache_get("main", digest(KEY), 1000)


async def test_authorize_wins_over_a_newer_token_a_replica_holds(
    redis_space: RedisSpace, redis_client: aioredis.Redis
) -> None:
    """After a flush, a replica writes back the token it holds (never backwards); a fresh
    `authorize` still wins, since its version is above any a replica can hold."""
    async with redis_space.backend() as backend:
        replica = SharedTokenStore("main", backend, backend, backend.settings)
        for n in range(3):
            await replica.save(StoredToken(f"access-{n}", f"refresh-{n}", 4102444800.0))
        await redis_client.delete(f"{redis_space.prefix}:token:main")  # a flush
        assert (await replica.fetch()).access_token == "access-2"  # type: ignore[union-attr]
        assert int(await redis_client.hget(f"{redis_space.prefix}:token:main", "version")) == 3
        authorized = StoredToken("fresh", "fresh-refresh", 4102444800.0)
        authorize = SharedTokenStore("main", backend, backend, backend.settings, supersede=True)
        await authorize.fetch()
        assert await authorize.save(authorized) == authorized
        assert await replica.fetch() == authorized  # adopted, not overwritten
