"""A read in the window between an invalidation's local part and its Redis part must not
bring Redis' old copy back into this process for good (found by bench.fleet --webhooks:
replica 0 answered HIT with the old record for its whole freshness after a delivery)."""

from __future__ import annotations

from typing import Any

import aiohttp

from proxy.cache.invalidation import Invalidation
from proxy.edge.services import SERVICES
from tests.conftest import Sandbox
from tests.replicas import Replicas


async def test_a_lookup_during_the_redis_drop_does_not_keep_the_old_copy(
    replicas: Replicas, sandbox: Sandbox
) -> None:
    [proxy] = await replicas.caching(sandbox.url, 1)
    product = sandbox.state.store["products"].ids[0]
    path = f"/v1/companies/5001/products/{product}.json"
    async with aiohttp.ClientSession() as client:
        for expected in ("MISS", "HIT"):
            async with client.get(proxy.url + path) as r:
                assert r.headers["X-Cache"] == expected
    cache = proxy.app[SERVICES].cache
    assert cache is not None
    store = proxy.app[SERVICES].store
    assert store is not None
    [key] = [k for k in store.hot.items if path in k]
    records = cache.invalidator.records
    assert records is not None and cache.entries.hot(key) is not None
    drop = records.drop

    async def read_then_drop(*args: Any) -> None:
        # A caller's lookup lands after the local drop, before Redis' (as under load).
        assert cache.entries.hot(key) is None
        await cache.entries.lookup("main", key)
        await drop(*args)

    records.drop = read_then_drop  # type: ignore[method-assign]
    await cache.invalidator.apply(Invalidation("main", frozenset({path.removesuffix(".json")})))
    assert cache.entries.hot(key) is None, "the old copy came back from Redis and stays"
    assert await cache.entries.lookup("main", key) is None
