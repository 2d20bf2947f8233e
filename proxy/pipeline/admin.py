"""The admin listener's ``GET /budget``: each account's bucket, queue and breakers (its own
and those of routes with recent failures)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.pipeline.budget import Budget
from proxy.pipeline.retry import Retry


def routes(budget: Budget, retry: Retry) -> list[web.RouteDef]:
    async def status(request: web.Request) -> web.Response:
        accounts: dict[str, dict[str, Any]] = {
            name: a.status() for name, a in sorted(budget.accounts.items())
        }
        for name, breaker in sorted(retry.breakers.items()):
            accounts.setdefault(name, {})["breaker"] = breaker.status()
            routes = retry.routes.get(name, {})
            # Only routes with recent failures are kept; most of the time this is empty.
            accounts[name]["route_breakers"] = {
                route: b.status() for route, b in sorted(routes.items())
            }
        return web.json_response({"accounts": accounts})

    return [web.get("/budget", status)]
