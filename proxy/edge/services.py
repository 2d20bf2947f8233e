"""The services a proxy application runs on, built once at startup and then frozen.

:func:`build` opens what must be opened (the client session, the cache store, token
files), each entered in one :class:`contextlib.AsyncExitStack` as it opens, puts the five
``send()`` layers together from the bottom up, and returns one :class:`Services`;
:func:`close` unwinds the stack. The application keeps it under
:data:`SERVICES`; admin routes and readiness checks come from the parts they belong to.
Nothing here is replaced after startup. What changes while serving lives apart: the
shutting-down flag in :class:`RunState`, and what a SIGHUP reload may change (log level,
caller keys, cache rules, budget rates, account secrets) in one immutable :class:`Live`
snapshot that :class:`LiveRef` holds and a reload replaces in one assignment. Whatever is
derived from a snapshot (caller metric children, budget rates) is kept with or keyed by
that snapshot, so nothing derived from an old one outlives a reload. :class:`Live` holds the live
settings only (:class:`~proxy.settings.LiveSettings`), never a second whole ``Settings``:
each part is built with its startup section and reads its live slice from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.auth.layer import Authenticator
from proxy.auth.providers import TokenProvider, provider_for
from proxy.cache import admin as cache_admin
from proxy.cache.broadcast import Broadcast
from proxy.cache.flight import Flights
from proxy.cache.invalidation import Invalidator, Purge
from proxy.cache.layer import Cache
from proxy.cache.metrics import CacheMetrics
from proxy.cache.redis_records import RedisRecords
from proxy.cache.refresh import ExpectedWait
from proxy.cache.store import CacheStore
from proxy.cache.tiers import Ahead, Entries, LocalEntries, Prepay, RedisEntries, Refund
from proxy.cache.webhooks.health import Feeds
from proxy.cache.webhooks.metrics import WebhookMetrics
from proxy.cache.webhooks.receiver import Receiver
from proxy.cache.webhooks.refetch import Refetcher
from proxy.cache.webhooks.verifier import Verifier
from proxy.client import create_session
from proxy.clock import WallClock
from proxy.edge.callers import AdminToken, Callers
from proxy.edge.metrics import PackageMetrics
from proxy.messages import Layer
from proxy.metrics import Metrics
from proxy.pipeline import admin as pipeline_admin
from proxy.pipeline.bucket import rate_for
from proxy.pipeline.budget import Budget
from proxy.pipeline.retry import Retry
from proxy.pipeline.upstream import Upstream
from proxy.settings import (
    CallerSettings,
    LiveAccount,
    LiveBudget,
    LiveCache,
    LiveSettings,
    Settings,
    live_of,
    masked,
    with_live,
)
from proxy.shared import Backend, open_backend
from proxy.shared.redis_backend import RedisBackend

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
class Live:
    """What a reload may change, as one value: swapped whole, never edited.

    ``settings`` holds exactly the live settings (:mod:`proxy.settings.live`: log level,
    ``[inbound]``, ``[callers]``, cache rules, account rates and secrets, the admin token) of
    the newest good file; the rest is what the proxy started with (``Services.settings``).
    ``callers``, ``providers`` and ``admin_token`` are made from them, each carrying over
    what must outlive a reload (previous keys within their overlap, the token store).
    """

    settings: LiveSettings
    callers: Callers
    providers: Mapping[str, TokenProvider]
    admin_token: AdminToken


@dataclass(slots=True)
class LiveRef:
    """The current :class:`Live`; a reload assigns ``current`` once."""

    current: Live

    # Each part that reads its live slice per request is handed one of these.

    def cache(self) -> LiveCache:
        return self.current.settings.cache

    def accounts(self) -> Mapping[str, LiveAccount]:
        return self.current.settings.accounts

    def budget(self) -> LiveBudget:
        return self.current.settings.budget

    def callers(self) -> Mapping[str, CallerSettings]:
        return self.current.settings.callers

    def running(self, started: Settings) -> Callable[[], Settings]:
        """For a part that reads the whole tree (the webhooks): the settings as started with
        the live ones, made once per reload."""
        made: list[tuple[LiveSettings, Settings]] = []

        def current() -> Settings:
            live = self.current.settings
            if not made or made[0][0] is not live:
                made[:] = [(live, with_live(started, live))]
            return made[0][1]

        return current


class LiveProviders(Mapping[str, TokenProvider]):
    """The current snapshot's providers, for the auth layer (which must not see edge types)."""

    def __init__(self, ref: LiveRef) -> None:
        self.ref = ref

    def __getitem__(self, name: str) -> TokenProvider:
        return self.ref.current.providers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ref.current.providers)

    def __len__(self) -> int:
        return len(self.ref.current.providers)


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings  # as started; the live settings: in Live (self.live)
    metrics: Metrics
    # Every package's own metrics group (on metrics.registry); each part was built with its own.
    metric_groups: PackageMetrics
    live: LiveRef
    clock: WallClock
    session: aiohttp.ClientSession
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
    # What build() opened, in order; close() unwinds it.
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    state: RunState = field(default_factory=RunState)
    # Webhook deliveries (its own listener; None unless webhooks.enabled).
    webhooks: Receiver | None = None

    @property
    def callers(self) -> Callers:
        return self.live.current.callers

    @property
    def providers(self) -> Mapping[str, TokenProvider]:
        return self.live.current.providers

    def running(self) -> Settings:
        """The settings the proxy runs with: as started, with the live ones of the last
        reload (for reports: the ``reloaded`` line, the configuration hash)."""
        return with_live(self.settings, self.live.current.settings)


SERVICES = web.AppKey("services", Services)


async def build(
    settings: Settings,
    metrics: Metrics,
    clock: WallClock,
    upstream: Layer | None = None,
    groups: PackageMetrics | None = None,
) -> Services:
    """Open and wire everything; ``upstream`` replaces the real upstream layer in tests.
    ``groups``: the packages' metrics when the caller made them already (the app, for the
    listener's connection counts), else made here on ``metrics.registry``.

    Every resource that opens is entered in one exit stack as it opens, so a failure part
    way unwinds exactly what was opened, and :func:`close` is that stack unwound."""
    stack = contextlib.AsyncExitStack()
    try:
        made = groups if groups is not None else PackageMetrics.on(metrics.registry)
        return await _build(stack, settings, metrics, made, clock, upstream)
    except BaseException:
        await stack.aclose()
        raise


async def _build(
    stack: contextlib.AsyncExitStack,
    settings: Settings,
    metrics: Metrics,
    groups: PackageMetrics,
    clock: WallClock,
    upstream: Layer | None,
) -> Services:
    callers = Callers(settings, groups.edge)
    describe(settings, groups)
    shared = open_backend(settings.shared, groups.shared)
    await shared.start()
    stack.push_async_callback(shared.close)
    providers = {
        name: provider_for(
            a,
            name=name,
            state_dir=settings.state_dir,
            clock=clock,
            metrics=groups.auth,
            shared=shared,
            shared_settings=settings.shared,
            refresh_floor=settings.auth.floor_for(a),
        )
        for name, a in settings.accounts.items()
    }
    live = LiveRef(Live(live_of(settings), callers, providers, AdminToken(settings.admin.token)))
    checks: dict[str, Check] = {f"token:{name}": _token_check(live, name) for name in providers}
    # Created even when tests swap the upstream layer: token requests use it too.
    closed_idle = groups.pipeline.upstream_closed_idle.inc
    session = create_session(settings.upstream, len(settings.accounts), closed_idle)
    stack.push_async_callback(session.close)
    layer: Layer = (
        upstream
        if upstream is not None
        else Upstream(settings.upstream, session, groups.pipeline, len(settings.accounts))
    )
    # budget: every upstream request (revalidations and auth resends included) takes a token.
    layer = budget = Budget(
        layer,
        settings,
        groups.pipeline,
        shared=shared,
        current=live.accounts,
        classes=live.budget,
        callers=live.callers,
    )
    stack.push_async_callback(budget.close)
    layer = Authenticator(layer, LiveProviders(live), groups.auth)
    # retry + breaker: only idempotent requests are retried, each attempt through auth+budget.
    layer = retry = Retry(layer, settings.retry, settings.accounts, groups.pipeline)
    admin_routes = pipeline_admin.routes(budget, retry)
    cache: Cache | None = None
    store: CacheStore | None = None
    if settings.cache.enabled:
        store = await open_store(settings, groups.cache)
        stack.push_async_callback(store.close)
        # cache: outermost, so fresh hits cost nothing below it.
        layer = cache = await build_cache(
            stack,
            layer,
            store,
            settings,
            groups.cache,
            clock,
            shared,
            live.cache,
            budget.expected_wait,
            budget.prepay,
            budget.refund,
            budget,
        )
        checks["cache"] = store_problem(store)
        groups.cache.watch_store(store.gauges)
        admin_routes += cache_admin.routes(store, cache.invalidator, tuple(settings.accounts))
        watcher = asyncio.ensure_future(watch_store(store, groups.cache))
        stack.push_async_callback(_cancel, watcher)
    receiver = None
    if cache is not None and settings.webhooks.enabled:
        receiver = webhook_receiver(settings, live, cache, shared, groups.webhooks)
        verifier = Verifier(
            cache, live.running(settings), functools.partial(spare_budget, budget),
            groups.webhooks, shared if isinstance(shared, RedisBackend) else None, retry,
        )  # fmt: skip
        verifying = asyncio.ensure_future(verifier.run())
        stack.push_async_callback(_cancel, verifying)
        if settings.webhooks.refetch:
            refetcher = start_refetch(settings, live, cache, budget, groups.webhooks)
            refetching = asyncio.ensure_future(refetcher.run())
            stack.push_async_callback(_cancel, refetching)
    # The providers of the live snapshot at close (a reload may have replaced them).
    stack.push_async_callback(_stop_providers, live)
    for provider in providers.values():
        await provider.start(session)
    return Services(
        settings=settings,
        metrics=metrics,
        metric_groups=groups,
        live=live,
        clock=clock,
        session=session,
        budget=budget,
        shared=shared,
        retry=retry,
        cache=cache,
        store=store,
        pipeline=layer,
        checks=checks,
        details={"shared": shared.detail},
        admin_routes=tuple(admin_routes),
        stack=stack,
        webhooks=receiver,
    )


def webhook_receiver(
    settings: Settings, live: LiveRef, cache: Cache, shared: Backend, metrics: WebhookMetrics
) -> Receiver:
    """Deliveries go through the cache's invalidator; event ids are remembered in Redis
    when it is shared (every replica then knows a delivery was applied)."""
    accounts = tuple(settings.accounts)
    feeds = cache.feeds
    for name in accounts:
        metrics.start(name)
        gauge = metrics.feed_healthy.labels(name)
        gauge.set_function(functools.partial(feeds.health_value, name))
    marks = shared if isinstance(shared, RedisBackend) else None
    return Receiver(live.running(settings), cache.invalidator, feeds, metrics, marks)


def start_refetch(
    settings: Settings, live: LiveRef, cache: Cache, budget: Budget, metrics: WebhookMetrics
) -> Refetcher:
    """The refetcher, told of the cache's webhook-rule reads and applied changes; its
    refetches go through the cache layer (docs/webhooks.md, Refetch)."""
    spare = functools.partial(spare_budget, budget)
    refetcher = Refetcher(live.running(settings), spare, metrics)
    refetcher.layer = cache
    cache.on_read = refetcher.read
    cache.invalidator.watchers.append(refetcher.changed)
    return refetcher


async def build_cache(
    stack: contextlib.AsyncExitStack,
    inner: Layer,
    store: CacheStore,
    settings: Settings,
    metrics: CacheMetrics,
    clock: WallClock,
    shared: Backend,
    current: Callable[[], LiveCache],
    busy: ExpectedWait | None = None,
    prepay: Prepay | None = None,
    refund: Refund | None = None,
    ahead: Ahead | None = None,
) -> Cache:
    """The cache's rooms, each built once and handed what it needs: flights, the tier
    (chosen here, once), the broadcast, and the invalidator they all send changes to."""
    config = settings.cache
    flights = Flights()
    broadcast = None if shared.events is None else Broadcast(shared.events, metrics)
    entries: Entries = LocalEntries(store, flights, metrics)
    records: RedisRecords | None = None
    if shared.cache is not None:
        # Entries shared in Redis, with a fetch lock per key across replicas.
        records = RedisRecords(
            shared.cache,
            metrics,
            max_entry_size=config.max_entry_size,
            # Kept in Redis as long as a stale copy may still answer (error or busy budget).
            stale_if_error=max(config.stale_if_error, config.stale_while_busy),
            lock_ttl=settings.upstream.total_timeout,
            accounts=tuple(settings.accounts),
            announce_all=None
            if broadcast is None
            else functools.partial(broadcast.publish, Purge()),
        )
        entries = RedisEntries(
            store, flights, metrics, records, clock, config.coalesce_wait, prepay, refund, ahead
        )
    invalidator = Invalidator(entries, records, broadcast)
    cache = Cache(
        inner,
        entries,
        settings,
        metrics,
        clock,
        current,
        flights=flights,
        invalidator=invalidator,
        feeds=Feeds(tuple(settings.accounts), enabled=settings.webhooks.enabled),
        busy=busy,
    )
    stack.push_async_callback(cache.close)
    if broadcast is not None:
        # Invalidations from the other replicas (their stores are their own).
        broadcast.listen(invalidator.received, invalidator.gap)
        stack.push_async_callback(broadcast.close)
    return cache


async def spare_budget(budget: Budget, account: str) -> bool:
    """Room for a request nobody waits for: none waiting for the account (fleet-wide on
    Redis), 2 tokens at hand (the shared bucket's on Redis)."""
    bucket = budget.account(account)
    return bucket.waiting == 0 and await bucket.gate.spare(bucket.clock.now(), 2.0)


def store_problem(store: CacheStore) -> Check:
    return lambda: store.problem


# How long a background task has to end after a cancel before it is cancelled again.
RECANCEL_SECONDS = 1.0


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel a background loop and wait until it has ended. Cancelled again while it runs
    on: on Python 3.11 a cancel that lands just as an ``asyncio.timeout`` inside the loop
    (a Redis call's) expires can be swallowed, and the loop then goes on forever (seen: a
    replica's close stalled on the webhook verifier's next tick)."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=RECANCEL_SECONDS)
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error


async def _stop_providers(live: LiveRef) -> None:
    for provider in live.current.providers.values():
        await provider.stop()


def _token_check(live: LiveRef, name: str) -> Check:
    """Readiness of the account's current provider (a reload may replace it)."""
    return lambda: live.current.providers[name].problem()


def describe(settings: Settings, groups: PackageMetrics) -> None:
    """The gauges that state the configuration (what the alerts and dashboard compare to)."""
    groups.shared.shared_backend_up.set(1)
    groups.shared.shared_degraded.set(0)
    groups.edge.config_applied(masked(settings))
    for name, account in settings.accounts.items():
        groups.pipeline.account(name, rate_for(account, settings.budget).per_window)
        if account.mode == "oauth":
            groups.auth.token_refresh_leeway.labels(name).set(account.refresh_leeway)
            groups.auth.renewable_account(name)


async def close(services: Services) -> None:
    """Undo :func:`build`: every resource closed in the reverse order it was opened (token
    refreshes first, then the cache's flights and store, the budget, the session, Redis)."""
    await services.stack.aclose()


async def open_store(settings: Settings, metrics: CacheMetrics) -> CacheStore:
    config = settings.cache
    shares = {name: account.cache_share for name, account in settings.accounts.items()}
    return await CacheStore.open(
        config.directory(settings.state_dir),
        config.max_size,
        config.memory_size,
        metrics,
        shares=shares,
    )


async def watch_store(store: CacheStore, metrics: CacheMetrics) -> None:
    """Pick up purges made by another process (the CLI), probe a disk that was full, and
    keep the gauges current."""
    while True:
        await asyncio.sleep(STORE_WATCH_SECONDS)
        await store.check_epoch()
        metrics.cache_storing_disabled.set(0 if await store.probe() else 1)
