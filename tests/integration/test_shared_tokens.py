"""OAuth tokens shared on a real Redis: encrypted at rest, refreshed by one replica at a time,
rotation-safe, and what a replica does while Redis is away."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from cryptography.fernet import Fernet
from prometheus_client import CollectorRegistry

from proxy.auth.providers import OAuthProvider
from proxy.auth.shared_tokens import SharedTokenStore
from proxy.edge.services import SERVICES
from proxy.ops.reload import reload, split_changes
from proxy.sandbox import SandboxConfig
from proxy.sandbox.oauth import SANDBOX_OAUTH
from proxy.settings import CacheSettings, Secret, Settings, SharedSettings
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings
from tests.integration.test_credentials import ME, SEED_REFRESH, account
from tests.redis_server import RedisServer

KEY = Fernet.generate_key().decode()
LIFETIME = 2  # seconds an access token lives (refreshed after half of it)


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(
        rate_per_minute_bearer=100_000,
        rate_per_minute_basic=100_000,
        refresh_tokens=(SEED_REFRESH,),
        rotate_refresh_tokens=True,
        access_token_lifetime=LIFETIME,
    )


def settings_for(
    sandbox: Sandbox, tmp_path: Path, url: str, prefix: str, backend: str = "redis", **kw: Any
) -> Settings:
    oauth = account(sandbox, tmp_path, refresh_leeway=1.0, token_timeout=1.0, token_wait=4.0)
    if "refresh_token" in kw:
        oauth = account(
            sandbox, tmp_path, refresh_leeway=1.0, refresh_token=kw.pop("refresh_token")
        )
    shared = SharedSettings(
        backend=backend,  # type: ignore[arg-type]
        url=url,
        key_prefix=prefix,
        token_key=Secret(KEY),
        timeout=0.3,
        replicas=3,
        **kw,
    )
    return proxy_settings(
        sandbox.url,
        tmp_path,
        accounts={"main": oauth},
        cache=CacheSettings(enabled=False),
        shared=shared,
    )


async def get(client: aiohttp.ClientSession, proxy: Proxy) -> tuple[int, Any]:
    async with client.get(proxy.url + ME) as r:
        return r.status, await r.json(content_type=None)


def provider(proxy: Proxy) -> OAuthProvider:
    found = proxy.app[SERVICES].providers["main"]
    assert isinstance(found, OAuthProvider)
    return found


async def until(done: Callable[[], bool], within: float) -> None:
    """Until ``done()`` holds; an AssertionError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def settled(providers: list[OAuthProvider]) -> None:
    """Until no provider is refreshing or due for a refresh (a condition, bounded)."""
    await until(lambda: all(p._inflight is None and not p._due() for p in providers), 3.0)


async def stored(client: aioredis.Redis, prefix: str) -> tuple[int, dict[str, Any], bytes]:
    version, data = await client.hmget(f"{prefix}:token:main", ["version", "data"])
    return int(version), json.loads(Fernet(KEY.encode()).decrypt(data)), data


async def test_three_replicas_refresh_once_per_lifetime_under_rotation(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    redis_prefix: str,
    redis_client: aioredis.Redis,
) -> None:
    settings = settings_for(sandbox, tmp_path, redis_server.url, redis_prefix)
    proxies = [await make_proxy(settings, registry=CollectorRegistry()) for _ in range(3)]
    run = 3.5 * LIFETIME / 2  # long enough for three rounds of refreshes
    stop = time.monotonic() + run
    statuses: list[int] = []

    async def caller(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            statuses.append((await get(client, proxies[(i + n) % 3]))[0])
            n += 1
            await asyncio.sleep(0.02)

    await asyncio.gather(*(caller(i) for i in range(6)))
    assert set(statuses) == {200}, statuses
    # No replica sent a token past its end (a 401 resent behind the caller's back spends budget).
    assert sandbox.state.statuses().get(401, 0) == 0, sandbox.state.statuses()
    server = sandbox.app[SANDBOX_OAUTH]
    # One token request per half lifetime for the whole fleet (plus the first), never a
    # refresh token that another replica had already spent.
    assert server.counters.spent_refresh == 0
    requests = server.counters.by_client["sandbox-client"]
    assert 2 <= requests <= run / (LIFETIME / 2) + 2, requests
    # All three hold the same token, and Redis holds it encrypted only. Checked once no replica
    # is refreshing or due: while one stores a new token the others, due at the same moment,
    # adopt it within a lock poll (see test_replicas_waiting_for_the_refresh_lock_...).
    await settled([provider(p) for p in proxies])
    held = {provider(p)._token.access_token for p in proxies}  # type: ignore[union-attr]
    version, record, raw = await stored(redis_client, redis_prefix)
    assert version == requests
    assert held == {record["access_token"]}
    assert record["access_token"].encode() not in raw
    assert record["refresh_token"].encode() not in raw and b"refresh_token" not in raw


async def test_replicas_waiting_for_the_refresh_lock_adopt_the_new_token_without_it(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis_prefix: str,
    redis_client: aioredis.Redis,
) -> None:
    """Another replica holds the lock and stores a new token: a replica waiting for the lock
    adopts it at once instead of queueing for the lock only to read it (the cause of replicas
    holding an older token for a lock poll per replica ahead of them)."""
    key = f"{redis_prefix}:token:main"

    async def put(version: int, access: str, expires_at: float) -> None:
        record = {"access_token": access, "refresh_token": SEED_REFRESH, "expires_at": expires_at}
        record["obtained_at"] = time.time() if version > 1 else 0.0
        data = Fernet(KEY.encode()).encrypt(json.dumps(record).encode())
        await redis_client.hset(key, mapping={"version": version, "data": data})

    await put(1, "expired", 1.0)
    await redis_client.set(f"{key}:lock", "another-replica", px=5000)
    proxy = await make_proxy(settings_for(sandbox, tmp_path, redis_server.url, redis_prefix))
    # It found the expired token and waits for the lock.
    await until(lambda: provider(proxy)._inflight is not None, 2.0)
    await put(2, "stored-by-the-lock-holder", time.time() + 60)
    with contextlib.suppress(AssertionError):
        await until(lambda: provider(proxy).expires_at != 1.0, 1.0)
    assert provider(proxy)._token.access_token == "stored-by-the-lock-holder"  # type: ignore[union-attr]
    assert await redis_client.get(f"{key}:lock") == b"another-replica"
    assert sandbox.app[SANDBOX_OAUTH].counters.by_client.get("sandbox-client", 0) == 0


async def test_unshared_replicas_spend_each_others_refresh_tokens(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """The control: three replicas with their own token files under rotation lock each other out."""
    proxies = []
    for i in range(3):
        settings = settings_for(
            sandbox, tmp_path / f"host{i}", "redis://127.0.0.1:1/0", "p", "local"
        )
        proxies.append(await make_proxy(settings, registry=CollectorRegistry()))
    statuses = [(await get(client, p))[0] for p in proxies]
    assert sandbox.app[SANDBOX_OAUTH].counters.spent_refresh >= 1
    assert statuses.count(200) < 3


async def test_a_replica_that_died_mid_refresh_leaves_the_last_good_refresh_token(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    redis_prefix: str,
    redis_client: aioredis.Redis,
) -> None:
    # What a crashed replica leaves: the last good record (expired access token, good refresh
    # token) and its lock, which only its TTL will end.
    record = {"access_token": "expired", "refresh_token": SEED_REFRESH, "expires_at": 1.0}
    data = Fernet(KEY.encode()).encrypt(json.dumps(record).encode())
    await redis_client.hset(f"{redis_prefix}:token:main", mapping={"version": 1, "data": data})
    await redis_client.set(f"{redis_prefix}:token:main:lock", "dead-owner", px=1500)
    # This replica's own seed is not the good one: it must use the one in Redis.
    settings = settings_for(
        sandbox, tmp_path, redis_server.url, redis_prefix, refresh_token=Secret("not-this-one")
    )
    started = time.monotonic()
    proxy = await make_proxy(settings)
    status, body = await get(client, proxy)
    assert status == 200, body
    assert time.monotonic() - started >= 1.0  # it waited for the dead owner's lock to expire
    version, stored_record, _ = await stored(redis_client, redis_prefix)
    assert version == 2 and stored_record["refresh_token"] != SEED_REFRESH
    assert sandbox.app[SANDBOX_OAUTH].counters.spent_refresh == 0


async def wait_for(check: Any, seconds: float = 6.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_redis_away_keeps_the_valid_token_then_answers_503_until_it_returns(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    redis_proc: RedisServer,
    redis_prefix: str,
) -> None:
    proxy = await make_proxy(settings_for(sandbox, tmp_path, redis_proc.url, redis_prefix))
    assert (await get(client, proxy))[0] == 200
    redis_proc.stop()
    assert (await get(client, proxy))[0] == 200  # the token in memory is still valid
    expires_at = provider(proxy).expires_at
    assert expires_at is not None
    await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.2)
    status, body = await get(client, proxy)
    assert status == 503 and body["error"] == "temporarily_unavailable", body
    assert "shared token store" in body["error_description"]
    spent_before = sandbox.app[SANDBOX_OAUTH].counters.by_client.get("sandbox-client", 0)
    redis_proc.start()
    await wait_for(lambda: _ok(client, proxy))
    assert sandbox.app[SANDBOX_OAUTH].counters.by_client["sandbox-client"] == spent_before + 1
    assert sandbox.app[SANDBOX_OAUTH].counters.spent_refresh == 0


async def _ok(client: aiohttp.ClientSession, proxy: Proxy) -> bool:
    return (await get(client, proxy))[0] == 200


async def test_solo_refresh_while_redis_is_away_is_written_back(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    redis_proc: RedisServer,
    redis_prefix: str,
) -> None:
    settings = settings_for(sandbox, tmp_path, redis_proc.url, redis_prefix, solo_refresh=True)
    proxy = await make_proxy(settings)
    assert (await get(client, proxy))[0] == 200
    redis_proc.stop()
    expires_at = provider(proxy).expires_at
    assert expires_at is not None
    await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.2)
    assert (await get(client, proxy))[0] == 200  # refreshed alone
    redis_proc.start()  # an empty Redis (no persistence): the solo token is written back
    held = provider(proxy)._token
    assert held is not None
    reader = aioredis.Redis.from_url(redis_proc.url)
    try:

        async def written() -> bool:
            return bool(await reader.exists(f"{redis_prefix}:token:main"))

        await wait_for(written)
        _, record, _ = await stored(reader, redis_prefix)
        assert record["access_token"] in {held.access_token, provider(proxy)._token.access_token}  # type: ignore[union-attr]
    finally:
        await reader.aclose()


async def test_a_reload_keeps_the_shared_token_store_and_shared_settings(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    redis_prefix: str,
    redis_client: aioredis.Redis,
) -> None:
    """SIGHUP with new credentials: the new provider reads the account's record in Redis (not
    a token file nobody writes); a changed ``[shared]`` waits for a restart."""
    settings = settings_for(sandbox, tmp_path, redis_server.url, redis_prefix)
    proxy = await make_proxy(settings)
    services = proxy.app[SERVICES]
    assert (await get(client, proxy))[0] == 200
    server = sandbox.app[SANDBOX_OAUTH]
    requests = server.counters.by_client["sandbox-client"]
    old = provider(proxy)

    account = dataclasses.replace(settings.accounts["main"], refresh_token=Secret("not-" + KEY))
    shared = dataclasses.replace(settings.shared, timeout=2.0, key_prefix=redis_prefix + "-new")
    new = dataclasses.replace(settings, accounts={"main": account}, shared=shared)
    live, restart = split_changes(settings, new)
    assert live == ["accounts.main.refresh_token"]
    assert restart == ["shared.key_prefix", "shared.timeout"]
    assert await reload(services, lambda: new)

    assert provider(proxy) is not old
    assert isinstance(provider(proxy).file, SharedTokenStore)
    assert services.running().shared == settings.shared  # restart-only: kept
    # The stored token serves at once: no token request with the new (unknown) refresh token.
    assert (await get(client, proxy))[0] == 200
    assert server.counters.by_client["sandbox-client"] == requests
    assert (await stored(redis_client, redis_prefix))[0] == requests
