"""The services a proxy application runs on, built once at startup and then frozen.

:func:`build` opens what must be opened (the client session, the cache store, token
files), puts the five ``send()`` layers together from the bottom up, and returns one
:class:`Services`; :func:`close` undoes it in reverse. The application keeps it under
:data:`SERVICES`; admin routes and readiness checks come from the parts they belong to.
Nothing here is replaced after startup: the one thing that changes while serving, the
shutting-down flag, lives in :class:`RunState`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.auth.layer import Authenticator
from proxy.auth.providers import TokenProvider, provider_for
from proxy.cache import admin as cache_admin
from proxy.cache.broadcast import Broadcast
from proxy.cache.layer import Cache
from proxy.cache.store import CacheStore
from proxy.client import create_session
from proxy.clock import WallClock
from proxy.edge.callers import Callers
from proxy.messages import Layer
from proxy.metrics import Metrics
from proxy.pipeline import admin as pipeline_admin
from proxy.pipeline.budget import Budget, rate_for
from proxy.pipeline.retry import Retry
from proxy.pipeline.upstream import Upstream
from proxy.settings import Settings
from proxy.shared import Backend, open_backend

# A readiness check: None when fine, else one line saying what is wrong.
Check = Callable[[], str | None]
# How often the cache store looks for a purge made by another process (the CLI).
STORE_WATCH_SECONDS = 2.0


@dataclass(slots=True)
class RunState:
    """What changes while the proxy runs: set at the first SIGTERM/SIGINT, so /readyz
    fails at once and traffic moves elsewhere."""

    shutting_down: bool = False


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    metrics: Metrics
    callers: Callers
    clock: WallClock
    session: aiohttp.ClientSession
    providers: Mapping[str, TokenProvider]
    budget: Budget
    # Where budget and tokens are shared with other processes (local: nowhere).
    shared: Backend
    retry: Retry
    cache: Cache | None  # None when cache.enabled = false
    store: CacheStore | None
    # The outermost layer: a request meets cache → retry → auth → budget → upstream.
    pipeline: Layer
    # Readiness checks by name, run by /readyz on the admin listener.
    checks: Mapping[str, Check]
    # Readiness details that do not fail readiness ("shared": "degraded").
    details: Mapping[str, Check]
    # Routes the parts offer on the admin listener (cache stats and purge, budget status).
    admin_routes: tuple[web.RouteDef, ...]
    state: RunState = field(default_factory=RunState)
    # Background tasks owned by the services (the store watcher), stopped by close().
    tasks: tuple[asyncio.Task[None], ...] = ()


SERVICES = web.AppKey("services", Services)


async def build(
    settings: Settings, metrics: Metrics, clock: WallClock, upstream: Layer | None = None
) -> Services:
    """Open and wire everything; ``upstream`` replaces the real upstream layer in tests."""
    callers = Callers(settings, metrics)
    describe(settings, metrics)
    shared = open_backend(settings.shared, metrics)
    await shared.start()
    providers = {
        name: provider_for(
            a,
            name=name,
            state_dir=settings.state_dir,
            clock=clock,
            metrics=metrics,
            shared=shared,
            shared_settings=settings.shared,
        )
        for name, a in settings.accounts.items()
    }
    checks: dict[str, Check] = {f"token:{name}": p.problem for name, p in providers.items()}
    # Created even when tests swap the upstream layer: token requests use it too.
    session = create_session(settings.upstream)
    try:
        store = await open_store(settings, metrics) if settings.cache.enabled else None
    except BaseException:
        await session.close()
        await shared.close()
        raise
    layer: Layer = (
        upstream if upstream is not None else Upstream(settings.upstream, session, metrics)
    )
    # budget: every upstream request (revalidations and auth resends included) takes a token.
    layer = budget = Budget(layer, settings, metrics, shared=shared)
    layer = Authenticator(layer, providers, metrics)
    # retry + breaker: only idempotent requests are retried, each attempt through auth+budget.
    layer = retry = Retry(layer, settings.retry, settings.accounts, metrics)
    admin_routes = pipeline_admin.routes(budget, retry)
    cache: Cache | None = None
    tasks: tuple[asyncio.Task[None], ...] = ()
    if store is not None:
        # cache: outermost, so fresh hits cost nothing below it.
        layer = cache = Cache(layer, store, settings, metrics, clock)
        announce_purge: cache_admin.AnnouncePurge | None = None
        if shared.events is not None:
            # Invalidations to and from the other replicas (their stores are their own).
            broadcast = Broadcast(cache, shared.events, metrics)
            broadcast.start()
            announce_purge = broadcast.announce_purge
        checks["cache"] = lambda: store.problem
        admin_routes += cache_admin.routes(store, metrics, announce_purge)
        tasks = (asyncio.ensure_future(watch_store(store, metrics)),)
    for provider in providers.values():
        await provider.start(session)
    return Services(
        settings=settings,
        metrics=metrics,
        callers=callers,
        clock=clock,
        session=session,
        providers=providers,
        budget=budget,
        shared=shared,
        retry=retry,
        cache=cache,
        store=store,
        pipeline=layer,
        checks=checks,
        details={"shared": shared.detail},
        admin_routes=tuple(admin_routes),
        tasks=tasks,
    )


def describe(settings: Settings, metrics: Metrics) -> None:
    """The gauges that state the configuration (what the alerts and dashboard compare to)."""
    metrics.shared_backend_up.set(1)
    metrics.shared_degraded.set(0)
    for name, account in settings.accounts.items():
        metrics.budget_limit.labels(name).set(rate_for(account, settings.budget).per_window)
        if account.mode == "oauth":
            metrics.token_refresh_leeway.labels(name).set(account.refresh_leeway)


async def close(services: Services) -> None:
    """Stop token refreshes, then the cache's flights and store, then the session."""
    for provider in services.providers.values():
        await provider.stop()
    for task in services.tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if services.cache is not None:
        await services.cache.close()
    if services.store is not None:
        await services.store.close()
    await services.budget.close()
    await services.shared.close()
    await services.session.close()


async def open_store(settings: Settings, metrics: Metrics) -> CacheStore:
    config = settings.cache
    store = await CacheStore.open(
        config.directory(settings.state_dir), config.max_size, config.memory_size
    )
    store.on_error = lambda op: metrics.cache_store_errors.labels(op).inc()
    store.on_evict = metrics.cache_evictions.inc

    def full() -> None:
        metrics.cache_store_errors.labels("full").inc()
        metrics.cache_storing_disabled.set(1)

    store.on_full = full
    return store


async def watch_store(store: CacheStore, metrics: Metrics) -> None:
    """Pick up purges made by another process (the CLI) and keep the gauges current."""
    while True:
        await asyncio.sleep(STORE_WATCH_SECONDS)
        await store.check_epoch()
        metrics.cache_storing_disabled.set(0 if store.writable else 1)
