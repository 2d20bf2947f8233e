"""Shared fixtures: the sandbox and the proxy on real loopback sockets."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web, web_app
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry

from proxy.edge.app import create_app
from proxy.listener import bound_port, start
from proxy.metrics import Registry
from proxy.sandbox import SANDBOX_STATE, SandboxConfig, SandboxState, create_sandbox_app
from proxy.settings import AccountSettings, Secret, ServerSettings, Settings, UpstreamSettings

TOKEN = "sandbox-token"
# Real redis-server fixtures (redis_server, redis_proc, redis_prefix) and replicas on them.
# A stalled test fails with its tasks' stacks instead of hanging the run (tests.stalls).
pytest_plugins = ["tests.redis_server", "tests.replicas", "tests.stalls"]

# Hypothesis on a shared 2-core machine: how long an example takes to make or run depends on
# the machine's load, not on the code, so neither is a failure (the properties still are).
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


@pytest.fixture(scope="session", autouse=True)
def _subprocesses_keep_their_bytecode() -> Iterator[None]:
    """With PYTHONDONTWRITEBYTECODE set (as on the project's machines), every ``kounta-proxy``
    or ``python -m proxy...`` subprocess of the tests compiled all of proxy/ again (~0.15 s
    of each start; the installed libraries have their bytecode). The first one now writes it
    where Python does by default (proxy/**/__pycache__, ignored by git and the image)."""
    patch = pytest.MonkeyPatch()
    patch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _forget_the_tests_apps() -> Iterator[None]:
    """aiohttp memoises each handler's middleware chain per (handler, apps) in an LRU of 1,024
    entries (``web_app._cached_build_middleware``), so every application a test served stayed
    alive after it: its sandbox's records, its proxy's caches and metric registries. Over the
    whole suite that was up to 1,024 dead apps (1.7 GB, millions of objects for every full
    garbage collection to walk). Cleared after each test; a no-op if aiohttp drops the cache."""
    yield
    cached = getattr(web_app, "_cached_build_middleware", None)
    if cached is not None:
        cached.cache_clear()


@pytest.fixture
def steady_heap() -> Iterator[None]:
    """For tests that time requests against the sandbox's window across processes or a shared
    Redis clock: the heap the suite built so far is frozen out of the collector while the test
    runs. Late in a whole-suite run it is hundreds of MB, and one full GC pass in this process
    stalled the sandbox (or a replica between its granted slot and its send) for longer than
    the budget's margin: a request granted before the stall arrived late, one granted a
    period after it on time, and the sandbox counted both in one window (one refusal, seen in
    CI at margins 0.1 and 0.25 s). Kounta is another machine and pays no such stall; the
    proxies freeze their own start-up heap, as ``serve`` does."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class Sandbox:
    url: str
    state: SandboxState
    app: web.Application


@dataclass
class Proxy:
    url: str
    app: web.Application
    settings: Settings
    registry: CollectorRegistry
    runner: web.AppRunner


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = await start(app, "127.0.0.1", 0, 2.0)
    return runner, bound_port(runner)


async def serve_handler(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> tuple[web.AppRunner, str]:
    """A one-handler upstream for every GET path on loopback; clean up its runner."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner, port = await serve(app)
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    """Override in a test module for a differently configured sandbox."""
    return SandboxConfig(
        bearer_tokens=(TOKEN,), rate_per_minute_bearer=100_000, rate_per_minute_basic=100_000
    )


@pytest.fixture
async def sandbox(sandbox_config: SandboxConfig) -> AsyncIterator[Sandbox]:
    app = create_sandbox_app(sandbox_config)
    runner, port = await serve(app)
    yield Sandbox(url=f"http://127.0.0.1:{port}", state=app[SANDBOX_STATE], app=app)
    await runner.cleanup()


def proxy_settings(upstream_url: str, tmp_path: Any, **sections: Any) -> Settings:
    """Settings for a proxy in front of ``upstream``; keyword arguments replace whole sections
    or top-level keys (e.g. ``server=ServerSettings(...)``)."""
    base = Settings(
        state_dir=str(tmp_path / "state"),
        server=ServerSettings(host="127.0.0.1", port=0),
        upstream=UpstreamSettings(
            base_url=upstream_url, connect_timeout=2, read_timeout=5, total_timeout=10
        ),
        # As high as the sandbox fixture's limit: tests of other features must not wait for
        # the rate budget (tests/integration/test_budget.py sets its own low limits).
        accounts={
            "main": AccountSettings(mode="static", token=Secret(TOKEN), rate_per_minute=100_000)
        },
    )
    return dataclasses.replace(base, **sections)


MakeProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(tmp_path: Any) -> AsyncIterator[MakeProxy]:
    runners: list[web.AppRunner] = []

    async def make(settings: Settings, **kwargs: Any) -> Proxy:
        registry = kwargs.pop("registry", None) or Registry()  # as the real app: no _created series
        app = create_app(settings, registry=registry, **kwargs)
        runner, port = await serve(app)
        runners.append(runner)
        url = f"http://127.0.0.1:{port}"
        return Proxy(url=url, app=app, settings=settings, registry=registry, runner=runner)

    yield make
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def proxy(make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any) -> Proxy:
    return await make_proxy(proxy_settings(sandbox.url, tmp_path))


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=True) as session:
        yield session
