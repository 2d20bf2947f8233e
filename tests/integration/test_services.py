"""Building the services: every resource that opens is unwound when a later step fails, and
close() is that unwinding (one exit stack), in reverse order."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.cache.store import CacheStore
from proxy.edge import services
from proxy.metrics import Metrics
from proxy.settings import Secret, SharedSettings
from tests.conftest import proxy_settings
from tests.redis_server import TOKEN_KEY, RedisServer


async def test_a_failure_part_way_closes_what_was_opened(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    settings = proxy_settings(
        "http://127.0.0.1:9",
        tmp_path,
        shared=SharedSettings(
            backend="redis",
            url=redis_server.url,
            key_prefix=redis_prefix,
            token_key=Secret(TOKEN_KEY),
        ),
    )
    sessions: list[aiohttp.ClientSession] = []
    opened = services.create_session

    def create_session(*args: object) -> aiohttp.ClientSession:
        sessions.append(opened(*args))  # type: ignore[arg-type]
        return sessions[-1]

    class Failing:
        async def start(self, session: aiohttp.ClientSession) -> None:
            raise OSError("the token file is gone")

        async def stop(self) -> None:
            stopped.append(True)

    stopped: list[bool] = []

    backends: list[object] = []
    open_backend = services.open_backend

    def recording_backend(*args: object) -> object:
        backends.append(open_backend(*args))  # type: ignore[arg-type]
        return backends[-1]

    monkeypatch.setattr(services, "create_session", create_session)
    monkeypatch.setattr(services, "provider_for", lambda *a, **k: Failing())
    monkeypatch.setattr(services, "open_backend", recording_backend)
    stores: list[CacheStore] = []
    open_store = services.open_store

    async def recording_store(*args: object) -> CacheStore:
        stores.append(await open_store(*args))  # type: ignore[arg-type]
        return stores[-1]

    monkeypatch.setattr(services, "open_store", recording_store)
    with pytest.raises(OSError, match="token file is gone"):
        await services.build(settings, Metrics(CollectorRegistry()), time.time)
    # The last step failed: everything before it was closed, the providers stopped too.
    assert stopped == [True]
    assert sessions and sessions[0].closed
    assert stores and stores[0].executor._shutdown  # type: ignore[attr-defined]
    (backend,) = backends
    assert backend.client.connection_pool._in_use_connections == set()  # type: ignore[attr-defined]
    assert backend._probe.done()  # type: ignore[attr-defined]


async def test_close_unwinds_everything_build_opened(tmp_path: Path) -> None:
    built = await services.build(
        proxy_settings("http://127.0.0.1:9", tmp_path), Metrics(CollectorRegistry()), time.time
    )
    assert not built.session.closed
    await services.close(built)
    assert built.session.closed
    assert built.store is not None and built.store.executor._shutdown  # type: ignore[attr-defined]
