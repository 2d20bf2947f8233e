"""The admin listener: metrics, liveness, readiness and the features' admin routes.

It is a second aiohttp application on its own port (``[admin]``, default
``127.0.0.1:9464``), over the proxy's own :class:`~proxy.edge.services.Services`, so admin
routes see the same cache, budget and token state. The main port never serves any of
this: it answers only ``/v1/...``.

- ``GET /metrics``: the Prometheus exposition of ``services.metrics.registry`` (text or
  OpenMetrics, as the scraper's ``Accept`` asks; gzip if it accepts it).
- ``GET /healthz``: 200 while the process runs its event loop.
- ``GET /readyz``: 200 when every account has a usable token (``token:NAME``), every
  check in ``services.checks`` passes and the proxy is not shutting down, else 503; the
  JSON body names each check and what is wrong.
- every route in ``services.admin_routes`` (cache stats and purge, budget status).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from proxy.edge.services import SERVICES, Services
from proxy.errors import JSON_CONTENT_TYPE, code_for
from proxy.listener import StartupError, bound_port, start
from proxy.logs import event, log

SHUTDOWN_CHECK = "shutdown"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_admin_app(services: Services) -> web.Application:
    """The admin application over the proxy's own services."""
    app = web.Application(middlewares=[_json_errors])
    app[SERVICES] = services
    app.router.add_get("/metrics", make_aiohttp_handler(services.metrics.registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_routes(services.admin_routes)
    return app


async def healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    results = run_checks(services)
    failing = sorted(name for name, problem in results.items() if problem is not None)
    body: dict[str, Any] = {
        "status": "not_ready" if failing else "ready",
        "failing": failing,
        "checks": {name: problem or "ok" for name, problem in sorted(results.items())},
    }
    # Details say how the proxy runs without failing readiness (e.g. shared: degraded).
    details = {name: note() for name, note in services.details.items()}
    body["details"] = {name: note for name, note in sorted(details.items()) if note}
    return _json(503 if failing else 200, body)


def run_checks(services: Services) -> dict[str, str | None]:
    """Every readiness check by name: None when fine, else one line saying what is wrong."""
    results: dict[str, str | None] = {
        SHUTDOWN_CHECK: "the proxy is shutting down" if services.state.shutting_down else None
    }
    for name, check in services.checks.items():
        try:
            problem = check()
        except Exception as e:
            # A broken check must fail readiness, not the endpoint.
            log.exception("readiness_check_failed", extra={"fields": {"check": name}})
            problem = f"the check raised {type(e).__name__}"
        results[name] = None if problem is None else " ".join(str(problem).split())
    return results


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths and wrong methods answer JSON here too."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _json(e.status, {"error": code_for(e.status), "error_description": e.reason})


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        headers={"Content-Type": JSON_CONTENT_TYPE, "Cache-Control": "no-store"},
    )


async def start_admin(services: Services, grace: float = 5.0) -> web.AppRunner | None:
    """Start the admin listener if enabled; a busy port is a :class:`StartupError`."""
    settings = services.settings.admin
    if not settings.enabled:
        event("admin_disabled")
        return None
    try:
        runner = await start(create_admin_app(services), settings.host, settings.port, grace)
    except StartupError as e:
        raise StartupError(f"admin listener: {e}") from None
    event("admin_started", listen=f"{settings.host}:{bound_port(runner)}")
    return runner
