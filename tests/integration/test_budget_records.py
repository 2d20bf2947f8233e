"""The shared budget record read back from a real Redis (issue 17 items 1 and 10): a pause is
cut to the reading replica's own budget.retry_after_max, a damaged record is not a pause for
ever, and a Redis restored from an older snapshot does not make a replica forget a pause."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from proxy.edge.services import SERVICES
from proxy.settings import Secret, SharedSettings
from proxy.shared import RedisBackend
from proxy.shared.metrics import SharedMetrics
from tests.conftest import MakeProxy, Proxy, Sandbox
from tests.integration.test_budget import fetch
from tests.integration.test_shared_budget import (  # noqa: F401 - sandbox_config: a fixture
    ME,
    sandbox_config,
    shared_settings,
)
from tests.integration.test_shared_tokens import wait_for
from tests.redis_server import TOKEN_KEY, RedisServer


@pytest.fixture
async def capped_proxy(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    redis_server: RedisServer,
    redis_prefix: str,
) -> Proxy:
    """A replica whose retry_after_max is 60 s and that waits at most 0.5 s for a slot."""
    settings = shared_settings(sandbox, tmp_path, redis_server.url, redis_prefix)
    budget = dataclasses.replace(settings.budget, max_wait=0.5, retry_after_max=60.0)
    proxy = await make_proxy(dataclasses.replace(settings, budget=budget))
    return proxy


async def other_replica_pauses(url: str, prefix: str, seconds: float) -> None:
    """A replica with a long retry_after_max (3600) shares Kounta's Retry-After: 3600."""
    backend = RedisBackend(
        SharedSettings(backend="redis", url=url, key_prefix=prefix, token_key=Secret(TOKEN_KEY)),
        SharedMetrics(CollectorRegistry()),
    )
    await backend.start()
    try:
        assert await backend.pause("main", seconds, 30, 30, 2.1) > seconds - 1
    finally:
        await backend.close()


async def test_a_shared_pause_is_cut_to_the_reading_replicas_retry_after_max(
    capped_proxy: Proxy,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    proxy = capped_proxy
    await other_replica_pauses(redis_server.url, redis_prefix, 3600.0)
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
    redis_server: RedisServer,
    redis_prefix: str,
    field: str,
    value: str,
) -> None:
    proxy = capped_proxy
    writer = aioredis.Redis.from_url(redis_server.url)
    try:
        await writer.hset(f"{redis_prefix}:budget:main", field, value)
    finally:
        await writer.aclose()
    status, body, headers = await fetch(client, proxy.url + ME)
    # Served, or refused for at most this replica's own cap: never a 500, never "degraded".
    assert status in (200, 429), body
    if status == 429:
        assert int(headers["Retry-After"]) <= 60
    assert proxy.app[SERVICES].budget.accounts["main"].status()["mode"] == "shared"


async def test_a_restored_older_snapshot_does_not_lift_a_pause(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    redis_proc: RedisServer,
    redis_prefix: str,
) -> None:
    settings = shared_settings(sandbox, tmp_path, redis_proc.url, redis_prefix)
    budget = dataclasses.replace(settings.budget, max_wait=10.0)
    proxy = await make_proxy(dataclasses.replace(settings, budget=budget))
    assert (await fetch(client, proxy.url + ME))[0] == 200
    writer = aioredis.Redis.from_url(redis_proc.url)
    try:
        assert await writer.save()  # the backup, before the pause
    finally:
        await writer.aclose()
    sandbox.state.inject_status(429, count=1, headers={"Retry-After": "6"}, body=b"Limit exceeded")
    status, _, _ = await fetch(client, proxy.url + ME, method="POST", json={})
    assert status == 429
    paused_at = time.monotonic()
    redis_proc.stop()
    redis_proc.start()  # from the snapshot: no pause in it

    async def back() -> bool:
        return bool(proxy.app[SERVICES].shared.up)

    await wait_for(back)
    served = sandbox.state.served("GET", ME)
    waiting = asyncio.create_task(fetch(client, proxy.url + ME))
    # Shared again within a second or two: Redis holds the pause for the other replicas.
    reader = aioredis.Redis.from_url(redis_proc.url)

    async def shared_again() -> bool:
        paused = float(await reader.hget(f"{redis_prefix}:budget:main", "paused") or 0)
        return paused > float((await reader.time())[0]) + 1

    try:
        await wait_for(shared_again, 3.0)
    finally:
        await reader.aclose()
    status, _, _ = await waiting
    assert status == 200
    assert time.monotonic() - paused_at >= 5.0  # the pause was kept, not lifted by the restore
    assert sandbox.state.served("GET", ME) == served + 1
