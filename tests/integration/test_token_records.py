"""Token records in Redis as untrusted, versioned input: a Redis restored from an older snapshot
never moves a replica back to a spent refresh token, and a malformed record is the documented
503, never a 500."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from proxy.edge.services import SERVICES
from proxy.sandbox.oauth import SANDBOX_OAUTH
from tests.conftest import MakeProxy, Sandbox
from tests.integration.test_shared_tokens import (  # noqa: F401 - sandbox_config: a fixture
    LIFETIME,
    get,
    provider,
    sandbox_config,
    settings_for,
    stored,
    wait_for,
)
from tests.redis_server import RedisServer
from tests.replicas import Replicas


@pytest.fixture
async def proc_client(redis_proc: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_proc.url)
    yield client
    await client.aclose()


async def _refreshes(sandbox: Sandbox) -> int:
    return int(sandbox.app[SANDBOX_OAUTH].counters.by_client.get("sandbox-client", 0))


async def test_a_restored_older_snapshot_never_moves_replicas_back_to_a_spent_refresh_token(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: object,
    client: aiohttp.ClientSession,
    redis_proc: RedisServer,
    redis_prefix: str,
) -> None:
    settings = settings_for(sandbox, tmp_path, redis_proc.url, redis_prefix)  # type: ignore[arg-type]
    proxies = [await make_proxy(settings, registry=CollectorRegistry()) for _ in range(2)]
    for p in proxies:
        assert (await get(client, p))[0] == 200
    reader = aioredis.Redis.from_url(redis_proc.url)
    try:
        # The operator's backup: SAVE writes dump.rdb now.
        assert await reader.save()
        saved_version, _, _ = await stored(reader, redis_prefix)
        # More refreshes (rotating refresh tokens): the snapshot's refresh token is spent.
        before = await _refreshes(sandbox)

        async def rotated() -> bool:
            await get(client, proxies[0])
            return await _refreshes(sandbox) >= before + 2

        await wait_for(rotated, 4 * LIFETIME)
        newer_version, _, _ = await stored(reader, redis_prefix)
        assert newer_version > saved_version
    finally:
        await reader.aclose()
    # The restore, as an operator does it: stop Redis (no save on shutdown) and start it
    # again from the snapshot.
    redis_proc.stop()
    redis_proc.start()
    reader = aioredis.Redis.from_url(redis_proc.url)
    try:
        restored, _, _ = await stored(reader, redis_prefix)
        assert restored == saved_version  # the older record is back

        async def back() -> bool:
            return all(p.app[SERVICES].shared.up for p in proxies)

        await wait_for(back)
        # Two more lifetimes of traffic through both replicas. (A 503 may come while the
        # replicas' pooled connections to the restarted Redis fail once each: Redis was away.
        # Never a 502: no refresh with the snapshot's spent refresh token.)
        # Then on until ten answers in a row are 200 (a loaded machine reconnects later),
        # for 10 s at most.
        stop = time.monotonic() + 2 * LIFETIME
        statuses: list[int] = []
        n = 0
        while time.monotonic() < stop or (
            statuses[-10:] != [200] * 10 and time.monotonic() < stop + 10
        ):
            statuses.append((await get(client, proxies[n % 2]))[0])
            n += 1
            await asyncio.sleep(0.05)
        assert set(statuses) <= {200, 503} and statuses[-10:] == [200] * 10, statuses
        assert sandbox.app[SANDBOX_OAUTH].counters.spent_refresh == 0
        # The newer record was written back: Redis never stays behind the replicas.
        version, record, _ = await stored(reader, redis_prefix)
        assert version >= newer_version
        assert all(provider(p).problem() is None for p in proxies)
        held = {provider(p)._token.access_token for p in proxies}  # type: ignore[union-attr]
        assert record["access_token"] in held
    finally:
        await reader.aclose()


# Each malformed version in turn on one replica: once a refresh is due, every request reads
# the record again, so one wait for the token's end covers them all.
MALFORMED_VERSIONS = (b"abc", b"1.5", b"-3", b"1e400", b"99999999999999999999999", b"", b"nan")


async def test_a_malformed_token_record_is_a_503_with_a_readiness_detail_not_a_500(
    replicas: Replicas,
    sandbox: Sandbox,
    client: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    space = replicas.space
    proxy = await replicas.make_proxy(
        settings_for(sandbox, replicas.tmp_path, space.url, space.prefix)
    )
    assert (await get(client, proxy))[0] == 200
    key = f"{space.prefix}:token:main"
    await redis_client.hset(key, "version", MALFORMED_VERSIONS[0])
    expires_at = provider(proxy).expires_at
    assert expires_at is not None
    await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.3)  # a refresh is due
    for seen, version in enumerate(MALFORMED_VERSIONS, 1):
        await redis_client.hset(key, "version", version)
        deadline = time.monotonic() + 3
        while True:  # until the replica has read (and refused) this version
            status, body = await get(client, proxy)
            assert status == 503 and body["error"] == "temporarily_unavailable", (version, body)
            assert "shared token store" in body["error_description"], version
            assert provider(proxy).problem() is not None, version
            refused = proxy.registry.get_sample_value(
                "kounta_proxy_shared_bad_records_total", {"kind": "token"}
            )
            if refused is not None and refused >= seen:
                break
            assert time.monotonic() < deadline, f"{version!r} was never read"
            await asyncio.sleep(0.05)
