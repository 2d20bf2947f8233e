"""Replicas of the proxy meeting on a real Redis: what the Redis tests share, in one place.

- :class:`RedisSpace`: a redis-server and this test's own key prefix (so tests can share the
  session's server); its ``settings()`` is a replica's ``[shared]`` section there, its
  ``backend()`` a started :class:`~proxy.shared.RedisBackend`, its ``client()`` a redis-py
  client, and ``listening()`` waits until replicas listen on a channel (an event, not a
  fixed sleep); :func:`until` polls any condition.
- fixtures ``redis_space`` (the session's server), ``own_redis_space`` (a server of the test's
  own that it may ``stop()`` and ``start()``), ``redis_client`` (a client on the session's
  server) and ``replicas`` / ``own_replicas``: :class:`Replicas`, which start proxies on one
  space.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from proxy.settings import CacheRule, CacheSettings, RetrySettings, Secret, Settings, SharedSettings
from proxy.shared import RedisBackend
from proxy.shared.metrics import SharedMetrics
from tests.conftest import MakeProxy, Proxy, proxy_settings
from tests.redis_server import TOKEN_KEY, RedisServer

FRESH_FOR = 600  # seconds every /v1 path stays fresh in a caching replica


async def until(done: Callable[[], bool], within: float = 5.0, what: str = "") -> None:
    """Until ``done()`` holds (polled); an AssertionError naming ``what`` after ``within`` s."""
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, what or "condition not met in time"
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class RedisSpace:
    """A redis-server and the key prefix of this test's own on it."""

    server: RedisServer
    prefix: str

    @property
    def url(self) -> str:
        return self.server.url

    def settings(self, **shared: Any) -> SharedSettings:
        """A replica's ``[shared]`` section on this space (the tests' token key)."""
        options = {"backend": "redis", "url": self.url, "key_prefix": self.prefix}
        return SharedSettings(**{**options, "token_key": Secret(TOKEN_KEY), **shared})

    @asynccontextmanager
    async def backend(
        self, registry: CollectorRegistry | None = None, **shared: Any
    ) -> AsyncIterator[RedisBackend]:
        """A started backend on this space, closed on the way out."""
        backend = RedisBackend(
            self.settings(**shared), SharedMetrics(registry or CollectorRegistry())
        )
        await backend.start()
        try:
            yield backend
        finally:
            await backend.close()

    @asynccontextmanager
    async def client(self) -> AsyncIterator[aioredis.Redis]:
        client = aioredis.Redis.from_url(self.url)
        try:
            yield client
        finally:
            await client.aclose()

    async def listening(self, count: int, topic: str = "cache", within: float = 5.0) -> None:
        """Until ``count`` subscribers listen on ``topic``'s channel of this space."""
        channel = f"{self.prefix}:events:{topic}"
        deadline = time.monotonic() + within
        async with self.client() as client:
            while (heard := dict(await client.pubsub_numsub(channel))[channel.encode()]) < count:
                assert time.monotonic() < deadline, f"{heard} of {count} listen on {channel}"
                await asyncio.sleep(0.01)


def caching(upstream: str, tmp_path: Path, shared: SharedSettings, **cache: Any) -> Settings:
    """A replica in front of ``upstream`` that keeps every /v1 path ``FRESH_FOR`` seconds and
    never retries (one upstream request per fetch)."""
    return proxy_settings(
        upstream,
        tmp_path,
        cache=CacheSettings(rules=(CacheRule("/v1/*", fresh_for=FRESH_FOR),), **cache),
        retry=RetrySettings(attempts=1),
        shared=shared,
    )


@dataclass
class Replicas:
    """Starts replicas on one space, each with its own state directory and registry."""

    make_proxy: MakeProxy
    tmp_path: Path
    space: RedisSpace

    async def start(self, *settings: Settings, listening: bool = True) -> list[Proxy]:
        """Proxies with these settings; with ``listening``, once all hear invalidations."""
        proxies = [await self.make_proxy(s, registry=CollectorRegistry()) for s in settings]
        if listening:
            await self.space.listening(len(proxies))
        return proxies

    async def without_rules(self, upstream: str, count: int = 2) -> list[Proxy]:
        """``count`` replicas (:func:`caching`) with no cache rule: fresh only when the
        upstream says so."""
        shared = self.space.settings()
        return await self.start(
            *(
                replace(caching(upstream, self.tmp_path / f"r{i}", shared), cache=CacheSettings())
                for i in range(count)
            )
        )

    async def caching(
        self, upstream: str, count: int = 2, *, redis_timeout: float = 0.3, **cache: Any
    ) -> list[Proxy]:
        """``count`` caching replicas (:func:`caching`) in front of ``upstream``."""
        shared = self.space.settings(timeout=redis_timeout)
        return await self.start(
            *(caching(upstream, self.tmp_path / f"r{i}", shared, **cache) for i in range(count))
        )


@pytest.fixture
def redis_space(redis_server: RedisServer, redis_prefix: str) -> RedisSpace:
    return RedisSpace(redis_server, redis_prefix)


@pytest.fixture
def own_redis_space(redis_proc: RedisServer, redis_prefix: str) -> RedisSpace:
    return RedisSpace(redis_proc, redis_prefix)


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    async with RedisSpace(redis_server, "").client() as client:
        yield client


@pytest.fixture
def replicas(make_proxy: MakeProxy, tmp_path: Path, redis_space: RedisSpace) -> Replicas:
    return Replicas(make_proxy, tmp_path, redis_space)


@pytest.fixture
def own_replicas(make_proxy: MakeProxy, tmp_path: Path, own_redis_space: RedisSpace) -> Replicas:
    return Replicas(make_proxy, tmp_path, own_redis_space)
