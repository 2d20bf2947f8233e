"""Stale-while-busy on a fleet (two replicas on a real redis-server, the sandbox upstream): the
busy estimate sees the fleet's bucket, and a refresh waiting for its batch token holds no
fetch lock another replica's caller would wait on."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import MakeProxy, Proxy, Sandbox
from tests.integration.test_budget import queued
from tests.integration.test_stale_while_busy import (
    BUSY,
    CUSTOMERS,
    get,
    on_redis,
    refreshed,
    slow,
)
from tests.redis_server import RedisServer


@pytest.fixture
async def two(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    redis_server: RedisServer,
    redis_prefix: str,
) -> list[Proxy]:
    """Replicas a and b on one Redis, a slow budget (a token every 0.5 s) in front of the
    sandbox."""
    return [
        await make_proxy(
            on_redis(slow(sandbox.url, tmp_path / name), redis_server, redis_prefix),
            registry=CollectorRegistry(),
        )
        for name in ("a", "b")
    ]


def locks(proxy: Proxy, result: str) -> float:
    labels = {"op": "lock", "result": result}
    return proxy.registry.get_sample_value("kounta_proxy_cache_shared_total", labels) or 0.0


async def test_an_idle_replica_sees_the_fleets_bucket_busy(
    two: list[Proxy], sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Replica B's own queue is empty while replica A's callers wait for the shared bucket
    (a token every 0.5 s): a stale read on B is answered at once from the cache, not sent to
    wait behind A's queue (B has not taken a token since A's callers queued)."""
    a, b = two
    ids = sorted(sandbox.state.store["customers"].records)
    path = f"{CUSTOMERS}/{ids[0]}.json"
    status, first, _, _ = await get(client, b.url + path)  # the one token at hand
    assert status == 200
    cold = [asyncio.create_task(get(client, f"{a.url}{CUSTOMERS}/{ids[n]}.json")) for n in (1, 2)]
    await queued(a, 2)
    status, body, headers, _ = await get(client, b.url + path)
    assert (status, headers["X-Cache"], body) == (200, "STALE", first), headers
    assert headers["Cache-Status"] == BUSY
    await asyncio.gather(*cold)
    await refreshed(b)


async def test_a_queued_refresh_holds_no_fetch_lock_from_another_replicas_caller(
    two: list[Proxy], sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Replica A answers a stale read at once (its callers queue) and queues the refresh at
    batch priority; meanwhile a caller on replica B who opts out of stale (max-stale=0) takes
    the key's fetch lock itself, instead of waiting on it for A's batch token and fetch."""
    a, b = two
    ids = sorted(sandbox.state.store["customers"].records)
    path = f"{CUSTOMERS}/{ids[0]}.json"
    assert (await get(client, a.url + path))[0] == 200  # stored here and in Redis
    cold = [asyncio.create_task(get(client, f"{a.url}{CUSTOMERS}/{ids[n]}.json")) for n in (1, 2)]
    await queued(a, 2)
    headers = (await get(client, a.url + path))[2]
    assert headers["X-Cache"] == "STALE", headers  # and A's refresh waits for a batch token
    status, _, headers, _ = await get(client, b.url + path, **{"Cache-Control": "max-stale=0"})
    assert status == 200, headers
    assert (locks(b, "taken"), locks(b, "waited")) == (1.0, 0.0)
    await asyncio.gather(*cold)
    await refreshed(a)
