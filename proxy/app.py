"""Wiring: build the aiohttp application and the chain of layers behind it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.auth import Authenticator, TokenProvider, provider_for
from proxy.callers import Callers
from proxy.errors import ProxyError, code_for
from proxy.handlers import exchange_of, guard, handle, proxy_error_answer, request_id
from proxy.logs import event, log
from proxy.messages import Layer
from proxy.metrics import Metrics
from proxy.routes import template
from proxy.settings import Settings
from proxy.upstream import Upstream, create_session

Clock = Callable[[], float]


@dataclass
class Context:
    """Everything a request needs, built once per application."""

    settings: Settings
    metrics: Metrics
    callers: Callers
    clock: Clock = time.time
    pipeline: Layer = field(init=False)
    providers: dict[str, TokenProvider] = field(default_factory=dict)
    # Readiness checks by name: each returns None when fine, else what is wrong (one line).
    # /readyz on the admin listener runs them all.
    checks: dict[str, Callable[[], str | None]] = field(default_factory=dict)
    # Routes a feature offers on the admin listener (e.g. cache purge, budget status).
    admin_routes: list[web.RouteDef] = field(default_factory=list)


CONTEXT = web.AppKey("context", Context)


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
    ctx = Context(
        settings=settings,
        metrics=Metrics(registry if registry is not None else CollectorRegistry()),
        callers=Callers(settings),
        clock=clock,
    )
    ctx.providers = {name: provider_for(a) for name, a in settings.accounts.items()}
    app[CONTEXT] = ctx
    app.cleanup_ctx.append(_pipeline_ctx(upstream))
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _pipeline_ctx(
    upstream: Layer | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def pipeline(app: web.Application) -> AsyncIterator[None]:
        ctx = app[CONTEXT]
        session = None
        bottom = upstream
        if bottom is None:
            session = create_session(ctx.settings.upstream)
            bottom = Upstream(ctx.settings.upstream, session)
        ctx.pipeline = build_pipeline(ctx, bottom)
        yield
        if session is not None:
            await session.close()

    return pipeline


def build_pipeline(ctx: Context, upstream: Layer) -> Layer:
    """The layers, built from the bottom up; a request meets them in the reverse order:

    cache → retry/breaker → auth → budget → upstream
    """
    layer: Layer = upstream
    # budget: every upstream request (revalidations and auth resends included) takes a token.
    layer = Authenticator(layer, ctx.providers)
    # retry + breaker: only idempotent requests are retried, each attempt through auth+budget.
    # cache: outermost, so fresh hits cost nothing below it.
    return layer


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as OAuth 2.0 JSON; nothing leaves as a traceback."""
    info = exchange_of(request)
    try:
        guard(request)
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


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line and the request metrics for every request."""
    ctx = request.app[CONTEXT]
    info = exchange_of(request)
    info.request_id = request_id(request.headers)
    metrics = ctx.metrics
    started = time.perf_counter()
    status = 500
    metrics.in_flight.inc()
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        metrics.in_flight.dec()
        elapsed = time.perf_counter() - started
        route = template(request.path) if request.path.startswith("/v1/") else "other"
        metrics.requests.labels(
            request.method, route, f"{status // 100}xx", info.cache_status
        ).inc()
        metrics.request_duration.labels(route, info.cache_status).observe(elapsed)
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
        )
