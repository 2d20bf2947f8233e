"""A reload in process: the new snapshot's credentials and cache rules take over at once."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import aiohttp

from proxy.edge.services import SERVICES
from proxy.ops.reload import reload, split_changes
from proxy.settings import AccountSettings, CacheRule, CacheSettings, ConfigError, Secret
from tests.conftest import TOKEN, MakeProxy, Sandbox, proxy_settings

NEW_TOKEN = "sandbox-token-after-reload-0001"


async def test_reload_swaps_credentials_and_cache_rules_at_once(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    settings = proxy_settings(sandbox.url, tmp_path)
    proxy = await make_proxy(settings)
    services = proxy.app[SERVICES]
    url = f"{proxy.url}/v1/companies/me.json"
    async with client.get(url) as r:
        assert (r.status, r.headers["X-Cache"]) == (200, "MISS")
    old_provider = services.providers["main"]

    account = dataclasses.replace(settings.accounts["main"], token=Secret(NEW_TOKEN))
    rules = (CacheRule(path="/v1/companies/*", fresh_for=60),)
    new = dataclasses.replace(
        settings, accounts={"main": account}, cache=dataclasses.replace(settings.cache, rules=rules)
    )
    sandbox.state.add_bearer_token(NEW_TOKEN)
    sandbox.state.revoke_bearer_token(TOKEN)  # the old token stops working upstream
    assert await reload(services, lambda: new)
    assert services.providers["main"] is not old_provider
    assert services.live.current.settings.cache.rules == rules
    async with client.get(url) as r:  # revalidated with the new token, stored under the rule
        assert r.status == 200, await r.text()
    async with client.get(url) as r:
        assert (r.status, r.headers["X-Cache"]) == (200, "HIT")  # fresh for 60 s now

    # A load that fails leaves everything as it was.
    def broken() -> Any:
        raise ConfigError("server.port", "must be an integer, got a string")

    before = services.live.current
    assert not await reload(services, broken)
    assert services.live.current is before


def test_what_needs_a_restart_is_told_apart_from_what_applies_live(tmp_path: Any) -> None:
    old = proxy_settings("http://127.0.0.1:9", tmp_path)
    account = AccountSettings(mode="static", token=Secret("x" * 20), rate_per_minute=90)
    new = dataclasses.replace(
        old,
        accounts={"main": account, "extra": account},
        cache=CacheSettings(max_size=10**6, max_entry_size=10**5),
    )
    live, restart = split_changes(old, new)
    assert live == ["accounts.main.rate_per_minute", "accounts.main.token"]
    assert "cache.max_size" in restart and "accounts.extra.token" in restart


async def test_a_reload_that_cannot_read_its_files_does_not_stall_the_listeners(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    """Files are read in a thread with a deadline (a stalled file system,
    a FIFO): the listeners answer meanwhile, and past the deadline the reload is refused."""
    settings = proxy_settings(sandbox.url, tmp_path)
    proxy = await make_proxy(settings)
    services = proxy.app[SERVICES]
    before = services.live.current
    stalled = threading.Event()

    def stuck() -> Any:
        stalled.wait(10)  # as open() of a FIFO without a writer, or a hung NFS read
        return settings

    loop = asyncio.get_running_loop()
    started = loop.time()
    reloading = asyncio.ensure_future(reload(services, stuck, read_timeout=0.5))
    try:
        async with client.get(f"{proxy.url}/v1/companies/me.json") as r:
            assert r.status == 200  # answered while the reload waits for its files
        assert loop.time() - started < 0.5
        assert not await reloading
    finally:
        stalled.set()
    assert 0.4 < loop.time() - started < 3
    assert services.live.current is before
