"""The proxy application: ``init_app`` in the aiohttp way.

One cleanup context builds the :class:`~proxy.edge.services.Services` at startup and
closes them at cleanup; the middlewares and the one catch-all route read them from
``app[SERVICES]``. The fresh-hit fast path is handed to the listener as the app's
request-handler wrapper (:data:`proxy.listener.WRAP_HANDLER`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.clock import WallClock
from proxy.edge import fast, services
from proxy.edge.answer import stamp_server
from proxy.edge.handlers import handle
from proxy.edge.inbound import expect_nothing
from proxy.edge.metrics import EdgeMetrics, PackageMetrics
from proxy.edge.middlewares import access_middleware, error_middleware
from proxy.edge.services import SERVICES
from proxy.listener import LIMITS, WRAP_HANDLER, Limits
from proxy.messages import Layer
from proxy.metrics import Metrics, Registry
from proxy.settings import Settings


def create_app(
    settings: Settings,
    *,
    upstream: Layer | None = None,
    registry: CollectorRegistry | None = None,
    clock: WallClock = time.time,
) -> web.Application:
    """The proxy application; ``upstream`` replaces the real upstream layer in tests."""
    app = web.Application(
        middlewares=[access_middleware, error_middleware],
        client_max_size=settings.server.max_body_size,
    )
    metrics = Metrics(registry if registry is not None else Registry())
    groups = PackageMetrics.on(metrics.registry)
    app.cleanup_ctx.append(_services_ctx(settings, metrics, groups, clock, upstream))
    # expect_nothing: 100 Continue only once the request passed its checks (inbound.read_body)
    app.router.add_route("*", "/{tail:.*}", handle, expect_handler=expect_nothing)
    app.on_response_prepare.append(stamp_server)
    app[WRAP_HANDLER] = fast.wrap
    app[LIMITS] = limits(settings, groups.edge)
    return app


def limits(settings: Settings, metrics: EdgeMetrics | None = None) -> Limits:
    """The listener's connection limits from ``[server]``, counted in ``metrics``."""
    server = settings.server
    if metrics is None:
        return Limits(
            server.header_timeout,
            server.max_connections,
            keepalive_timeout=server.keepalive_timeout,
        )
    return Limits(
        server.header_timeout,
        server.max_connections,
        on_drop=lambda reason: metrics.connections_dropped.labels(reason).inc(),
        on_count=metrics.connections_open.set,
        keepalive_timeout=server.keepalive_timeout,
    )


def _services_ctx(
    settings: Settings,
    metrics: Metrics,
    groups: PackageMetrics,
    clock: WallClock,
    upstream: Layer | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        built = app[SERVICES] = await services.build(settings, metrics, clock, upstream, groups)
        yield
        await services.close(built)

    return ctx
