"""The shared budget record read back from a real Redis as untrusted input: a pause is cut to the
reading replica's own budget.retry_after_max, a damaged record is not a pause for ever, and a
Redis restored from an older snapshot does not make a replica forget a pause."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.edge.services import SERVICES
from tests.conftest import Proxy, Sandbox
from tests.integration.test_budget import fetch
from tests.integration.test_shared_budget import (  # noqa: F401 - sandbox_config: a fixture
    ME,
    sandbox_config,
    shared_settings,
)
from tests.integration.test_shared_tokens import wait_for
from tests.replicas import RedisSpace, Replicas


@pytest.fixture
async def capped_proxy(replicas: Replicas, sandbox: Sandbox) -> Proxy:
    """A replica whose retry_after_max is 60 s and that waits at most 0.5 s for a slot."""
    settings = shared_settings(sandbox, replicas)
    budget = dataclasses.replace(settings.budget, max_wait=0.5, retry_after_max=60.0)
    return await replicas.make_proxy(dataclasses.replace(settings, budget=budget))


async def test_a_shared_pause_is_cut_to_the_reading_replicas_retry_after_max(
    capped_proxy: Proxy, client: aiohttp.ClientSession, redis_space: RedisSpace
) -> None:
    proxy = capped_proxy
    # A replica with a long retry_after_max (3600) shares Kounta's Retry-After: 3600.
    async with redis_space.backend() as other:
        assert await other.pause("main", 3600.0, 30, 30, 2.1) > 3599
    status, body, headers = await fetch(client, proxy.url + ME)
    assert status == 429 and body["error"] == "rate_limited", body
    assert 1 <= int(headers["Retry-After"]) <= 60, headers["Retry-After"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("paused", "inf"), ("paused", "nan"), ("paused", "junk"), ("tat", "1e300"), ("tat", "nan")],
)
async def test_a_damaged_budget_record_is_not_a_pause_for_ever(
    capped_proxy: Proxy,
    client: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    redis_space: RedisSpace,
    field: str,
    value: str,
) -> None:
    proxy = capped_proxy
    await redis_client.hset(f"{redis_space.prefix}:budget:main", field, value)
    status, body, headers = await fetch(client, proxy.url + ME)
    # Served, or refused for at most this replica's own cap: never a 500, never "degraded".
    assert status in (200, 429), body
    if status == 429:
        assert int(headers["Retry-After"]) <= 60
    assert proxy.app[SERVICES].budget.accounts["main"].status()["mode"] == "shared"


async def test_a_restored_older_snapshot_does_not_lift_a_pause(
    own_replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    settings = shared_settings(sandbox, own_replicas)
    budget = dataclasses.replace(settings.budget, max_wait=10.0)
    proxy = await own_replicas.make_proxy(dataclasses.replace(settings, budget=budget))
    space = own_replicas.space
    assert (await fetch(client, proxy.url + ME))[0] == 200
    async with space.client() as writer:
        assert await writer.save()  # the backup, before the pause
    sandbox.state.inject_status(429, count=1, headers={"Retry-After": "6"}, body=b"Limit exceeded")
    status, _, _ = await fetch(client, proxy.url + ME, method="POST", json={})
    assert status == 429
    paused_at = time.monotonic()
    space.server.stop()
    space.server.start()  # from the snapshot: no pause in it

    async def back() -> bool:
        return bool(proxy.app[SERVICES].shared.up)

    await wait_for(back)
    served = sandbox.state.served("GET", ME)
    waiting = asyncio.create_task(fetch(client, proxy.url + ME))
    # Shared again within a second or two: Redis holds the pause for the other replicas.
    async with space.client() as reader:

        async def shared_again() -> bool:
            paused = float(await reader.hget(f"{space.prefix}:budget:main", "paused") or 0)
            return paused > float((await reader.time())[0]) + 1

        await wait_for(shared_again, 3.0)
    status, _, _ = await waiting
    assert status == 200
    assert time.monotonic() - paused_at >= 5.0  # the pause was kept, not lifted by the restore
    assert sandbox.state.served("GET", ME) == served + 1
