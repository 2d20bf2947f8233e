"""Administering the cache: the admin listener's routes and ``kounta-proxy cache``.

- ``GET /cache/stats``: entries, bytes and whether storing works, as JSON.
- ``POST /cache/purge?prefix=/v1/...&account=NAME`` (both optional: every entry).
- ``kounta-proxy cache stats | purge``: the same, on the cache directory directly (the
  running proxy notices a purge by the store's epoch within a few seconds).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Collection
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import errors
from proxy.cache.flight import Flights
from proxy.cache.invalidation import Invalidator, Purge
from proxy.cache.metrics import CacheMetrics
from proxy.cache.store import CacheStore
from proxy.cache.tiers import LocalEntries
from proxy.logs import event
from proxy.settings import Settings


def routes(
    store: CacheStore,
    invalidator: Invalidator,
    accounts: Collection[str] = (),
) -> list[web.RouteDef]:
    """The admin routes over the running proxy's ``store``; a purge goes through
    ``invalidator`` (here, Redis, the other replicas). ``accounts``: the names a purge may
    name (empty: any)."""

    async def stats(request: web.Request) -> web.Response:
        found = await store.stats()
        # Answered even when the disk cannot be counted: "error" and "storing" say why.
        return web.json_response({"enabled": True, **found, "storing": store.problem or "ok"})

    async def purge(request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        account = request.query.get("account") or None
        if prefix and not prefix.startswith("/"):
            raise errors.InvalidRequest("prefix must be a path starting with '/'")
        if account is not None and accounts and account not in accounts:
            raise errors.InvalidRequest(unknown_account(account, accounts))
        removed = await invalidator.apply(Purge(prefix, account))
        event("cache_purged", prefix=prefix, account=account, removed=removed)
        return web.json_response({"purged": removed})

    return [web.get("/cache/stats", stats), web.post("/cache/purge", purge)]


def run_cli(settings: Settings, action: str, prefix: str, account: str | None) -> int:
    """``kounta-proxy cache stats | purge``: works on the directory directly."""

    async def go() -> dict[str, Any]:
        config = settings.cache
        store = await CacheStore.open(
            config.directory(settings.state_dir), config.max_size, memory_size=0
        )
        try:
            if action == "purge":
                # This process only: the running proxy sees it by the store's epoch.
                local = LocalEntries(store, Flights(), CacheMetrics(CollectorRegistry()))
                return {"purged": await Invalidator(local).apply(Purge(prefix, account))}
            return await store.stats()
        finally:
            await store.close()

    if prefix and not prefix.startswith("/"):
        return _fail(f"--prefix must be a path starting with '/', got {prefix!r}")
    if account is not None and account not in settings.accounts:
        # A typo would purge nothing and say {"purged": 0}, as if all were well.
        return _fail(unknown_account(account, settings.accounts))
    directory = settings.cache.directory(settings.state_dir)
    if not directory.is_dir():
        # Never create a cache where none was: the settings probably point elsewhere.
        return _fail(f"no cache at {directory} (is --config the proxy's settings file?)")
    try:
        print(json.dumps(asyncio.run(go())))
    except OSError as e:
        return _fail(f"cannot use the cache directory: {e.strerror or e}", status=1)
    return 0


def unknown_account(account: str, accounts: Collection[str]) -> str:
    known = ", ".join(sorted(accounts)) or "none"
    return f"no account named {account!r} in the settings (accounts: {known})"


def _fail(message: str, status: int = 2) -> int:
    print(f"kounta-proxy: {message}", file=sys.stderr)
    return status
