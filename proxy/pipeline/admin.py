"""The admin listener's ``GET /budget``: each account's bucket, queue and breaker."""

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
        return web.json_response({"accounts": accounts})

    return [web.get("/budget", status)]
