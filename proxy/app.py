"""Wiring: build the aiohttp application and the chain of layers behind it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.auth import Authenticator, TokenProvider, provider_for
from proxy.budget import Budget
from proxy.budget import status_handler as budget_status
from proxy.cache import Cache
from proxy.cache import install as install_cache
from proxy.cache_store import CacheStore
from proxy.callers import Callers
from proxy.errors import ProxyError, code_for
from proxy.handlers import (
    ASTERISK,
    Exchange,
    exchange_of,
    expect_nothing,
    guard,
    handle,
    options_answer,
    proxy_error_answer,
    request_id,
    stamp_server,
)
from proxy.logs import event, log
from proxy.messages import Layer
from proxy.metrics import Metrics
from proxy.retry import Retry
from proxy.routes import template
from proxy.settings import Settings
from proxy.upstream import UPSTREAM_SECONDS, Upstream, create_session

Clock = Callable[[], float]
# Logged (never sent) when the caller hung up before the answer was complete, as nginx does.
CLIENT_CLOSED_REQUEST = 499


@dataclass
class Context:
    """Everything a request needs, built once per application."""

    settings: Settings
    metrics: Metrics
    callers: Callers
    clock: Clock = time.time
    pipeline: Layer = field(init=False)
    providers: dict[str, TokenProvider] = field(default_factory=dict)
    # The one client session (upstream requests and token requests); set at startup.
    session: aiohttp.ClientSession | None = None
    # Readiness checks by name: each returns None when fine, else what is wrong (one line).
    # /readyz on the admin listener runs them all.
    checks: dict[str, Callable[[], str | None]] = field(default_factory=dict)
    # Routes a feature offers on the admin listener (e.g. cache purge, budget status).
    admin_routes: list[web.RouteDef] = field(default_factory=list)
    # The rate budget and the retry/breaker layers (set when the pipeline is built).
    budget: Budget | None = None
    retry: Retry | None = None
    # The ETag cache: its store is opened at startup, the layer built with the pipeline.
    cache_store: CacheStore | None = None
    cache: Cache | None = None
    # Set at the first SIGTERM/SIGINT: /readyz fails at once so traffic moves elsewhere.
    shutting_down: bool = False


CONTEXT = web.AppKey("context", Context)
# Set on the proxy application only (the admin application shares its CONTEXT): where
# proxy.server.Runner may put the fresh-hit fast path in front.
PROXY_APP = web.AppKey("proxy_app", bool)


def create_app(
    settings: Settings,
    *,
    upstream: Layer | None = None,
    registry: CollectorRegistry | None = None,
    clock: Clock = time.time,
) -> web.Application:
    """The proxy application; ``upstream`` replaces the real upstream layer in tests."""
    app = web.Application(
        middlewares=[access_middleware, error_middleware],
        client_max_size=settings.server.max_body_size,
    )
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    ctx = Context(
        settings=settings, metrics=metrics, callers=Callers(settings, metrics), clock=clock
    )
    ctx.providers = {
        name: provider_for(
            a, name=name, state_dir=settings.state_dir, clock=clock, metrics=ctx.metrics
        )
        for name, a in settings.accounts.items()
    }
    for name, provider in ctx.providers.items():
        ctx.checks[f"token:{name}"] = provider.problem
    app[CONTEXT] = ctx
    app[PROXY_APP] = True
    ctx.admin_routes.append(web.get("/budget", budget_status))
    install_cache(app, ctx)  # before the pipeline: the store must be open when it is built
    app.cleanup_ctx.append(_pipeline_ctx(upstream))
    app.cleanup_ctx.append(_credentials_ctx)
    # expect_nothing: 100 Continue only once the request passed its checks (handlers.read_body)
    app.router.add_route("*", "/{tail:.*}", handle, expect_handler=expect_nothing)
    app.on_response_prepare.append(stamp_server)
    return app


def _pipeline_ctx(
    upstream: Layer | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def pipeline(app: web.Application) -> AsyncIterator[None]:
        ctx = app[CONTEXT]
        # Created even when tests swap the upstream layer: token requests use it too.
        session = ctx.session = create_session(ctx.settings.upstream)
        bottom = upstream
        if bottom is None:
            bottom = Upstream(ctx.settings.upstream, session, ctx.metrics)
        ctx.pipeline = build_pipeline(ctx, bottom)
        yield
        if ctx.budget is not None:
            await ctx.budget.close()
        await session.close()

    return pipeline


async def _credentials_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load token files and start background refresh; stop it before the session closes."""
    ctx = app[CONTEXT]
    assert ctx.session is not None
    for provider in ctx.providers.values():
        await provider.start(ctx.session)
    yield
    for provider in ctx.providers.values():
        await provider.stop()


def build_pipeline(ctx: Context, upstream: Layer) -> Layer:
    """The layers, built from the bottom up; a request meets them in the reverse order:

    cache → retry/breaker → auth → budget → upstream
    """
    layer: Layer = upstream
    # budget: every upstream request (revalidations and auth resends included) takes a token.
    layer = ctx.budget = Budget(layer, ctx.settings, ctx.metrics)
    layer = Authenticator(layer, ctx.providers, ctx.metrics)
    # retry + breaker: only idempotent requests are retried, each attempt through auth+budget.
    accounts = ctx.settings.accounts
    layer = ctx.retry = Retry(layer, ctx.settings.retry, accounts, ctx.metrics)
    # cache: outermost, so fresh hits cost nothing below it.
    if ctx.cache_store is not None:
        layer = ctx.cache = Cache(layer, ctx.cache_store, ctx.settings, ctx.metrics, ctx.clock)
    return layer


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as OAuth 2.0 JSON; nothing leaves as a traceback."""
    info = exchange_of(request)
    try:
        info.target = guard(request)
        if info.target is ASTERISK:  # OPTIONS *: no route matches "*"; answered here
            return options_answer()
        return await handler(request)
    except ProxyError as e:
        return proxy_error_answer(e, info.request_id)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        description = e.reason if e.text is None or e.text.startswith(str(e.status)) else e.text
        error = ProxyError(description or e.reason, code=code_for(e.status))
        error.status = e.status
        return proxy_error_answer(error, info.request_id)
    except Exception:
        log.exception("unhandled_error", extra={"fields": {"request_id": info.request_id}})
        error = ProxyError(f"Internal proxy error (request id {info.request_id})")
        return proxy_error_answer(error, info.request_id)


# Route labels by path: most traffic repeats a few paths; bounded by clearing.
_ROUTES: dict[str, str] = {}
ROUTES_MAX = 4096


def route_of(path: str) -> str:
    """The metric/log route label of ``path`` (:func:`proxy.routes.template`), remembered."""
    route = _ROUTES.get(path)
    if route is None:
        if len(_ROUTES) >= ROUTES_MAX:
            _ROUTES.clear()
        route = _ROUTES[path] = template(path) if path.startswith("/v1/") else "other"
    return route


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line and the request metrics for every request."""
    ctx = request.app[CONTEXT]
    info = exchange_of(request)
    info.request_id = request_id(request.headers)
    metrics = ctx.metrics
    started = time.perf_counter()
    status = 500
    upstream_seconds: list[float] = []
    UPSTREAM_SECONDS.set(upstream_seconds)
    metrics.in_flight.inc()
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED_REQUEST
        raise
    finally:
        metrics.in_flight.dec()
        elapsed = time.perf_counter() - started
        route = route_of(request.path)
        metrics.request_done(request.method, route, status, info.cache_status, elapsed)
        if log.isEnabledFor(logging.INFO):  # skip building the line when nobody reads it
            access_line(request, info, route, status, elapsed, upstream_seconds)


def access_line(
    request: web.BaseRequest,
    info: Exchange,
    route: str,
    status: int,
    elapsed: float,
    upstream_seconds: list[float],
) -> None:
    event(
        "request",
        request_id=info.request_id,
        caller=info.caller,
        account=info.account,
        method=request.method,
        route=route,
        path=request.path,
        status=status,
        cache=info.cache_status,
        upstream_status=info.upstream_status,
        bytes=info.bytes_sent,
        ms=round(elapsed * 1000, 2),
        upstream_ms=round(sum(upstream_seconds) * 1000, 2) if upstream_seconds else None,
    )
