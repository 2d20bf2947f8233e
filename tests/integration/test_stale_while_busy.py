"""Stale-while-busy through the real proxy: a slow budget (a token every 0.5 s, so the next
request's expected wait passes ``budget.busy_after``), the sandbox or a small upstream of our
own that says what the stored response may allow."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.cache.flight import Dropped
from proxy.cache.layer import Cache
from proxy.edge.services import SERVICES
from proxy.settings import (
    AccountSettings,
    BudgetSettings,
    CacheSettings,
    CallerSettings,
    Secret,
    Settings,
    SharedSettings,
)
from tests.conftest import TOKEN, MakeProxy, Proxy, Sandbox, proxy_settings, serve
from tests.integration.test_budget import queued
from tests.redis_server import TOKEN_KEY, RedisServer

KEY = "stale-busy-key-0123456789"
CUSTOMERS = "/v1/companies/5001/customers"
BUSY = "kounta-proxy; fwd=stale; detail=budget"
# 12 requests a 6-second window: one token every 0.5 s, well past busy_after (0.25 s).
WINDOW, RATE = 6.0, 12


def slow(upstream: str, tmp_path: Any, burst: int = 1) -> Settings:
    return proxy_settings(
        upstream,
        tmp_path,
        accounts={
            "main": AccountSettings(
                mode="static", token=Secret(TOKEN), rate_per_minute=RATE, burst=burst
            )
        },
        callers={"till": CallerSettings(key=Secret(KEY), account="main")},
        budget=BudgetSettings(window=WINDOW, window_margin=0.0, busy_after=0.25),
        cache=CacheSettings(stale_while_busy=60.0),
    )


async def get(
    client: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, bytes, Any, float]:
    started = time.monotonic()
    async with client.get(url, headers={"X-Proxy-Key": KEY, **headers}) as r:
        return r.status, await r.read(), r.headers, time.monotonic() - started


async def stored_then_stale(client: aiohttp.ClientSession, url: str) -> Any:
    """Store ``url`` (the one token at hand), then read it again at once: STALE; its headers."""
    await get(client, url)
    status, _, headers, _ = await get(client, url)
    assert (status, headers["X-Cache"]) == (200, "STALE"), headers
    return headers


def on_redis(settings: Settings, server: RedisServer, prefix: str) -> Settings:
    shared = SharedSettings(
        backend="redis", url=server.url, key_prefix=prefix, token_key=Secret(TOKEN_KEY)
    )
    return dataclasses.replace(settings, shared=shared)


def cache_of(proxy: Proxy) -> Cache:
    cache = proxy.app[SERVICES].cache
    assert cache is not None
    return cache


async def refreshed(proxy: Proxy) -> list[type[BaseException] | None]:
    """Wait for the background refreshes under way; what each ended with (None: an answer,
    else the exception's type)."""
    ended: list[type[BaseException] | None] = []
    for flight in list(cache_of(proxy).refreshes.values()):
        try:
            await asyncio.wait_for(asyncio.shield(flight.done), 5.0)
            ended.append(None)
        except Exception as e:
            ended.append(type(e))
    return ended


def stale_answers(proxy: Proxy) -> float:
    labels = {"result": "stale", "reason": "busy"}
    return proxy.registry.get_sample_value("kounta_proxy_cache_lookups_total", labels) or 0.0


async def test_a_busy_budget_answers_stale_at_once_and_refreshes_behind_at_batch_priority(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(slow(sandbox.url, tmp_path))
    record = sorted(sandbox.state.store["customers"].records)[0]
    path = f"{CUSTOMERS}/{record}.json"
    url = f"{proxy.url}{path}"
    status, first, headers, _ = await get(client, url)  # takes the one token
    assert (status, headers["X-Cache"]) == (200, "MISS")
    sandbox.state.touch("customers", record)  # changed at Kounta meanwhile
    # The next token is ~0.5 s off: five readers get the stored copy at once.
    answers = await asyncio.gather(*(get(client, url) for _ in range(5)))
    for status, body, headers, _ in answers:
        assert (status, headers["X-Cache"], body) == (200, "STALE", first)
        assert headers["Cache-Status"] == BUSY
        assert int(headers["Age"]) >= 0
    # At once: each is the old body (none waited for the token that brings the new one), and
    # the refresh is still under way after all five answered (no wall-clock bound: a loaded
    # machine slows the answers, not what they are).
    assert stale_answers(proxy) == 5
    # One revalidation for the five (coalesced), at batch priority, after the answers.
    assert len(cache_of(proxy).refreshes) == 1
    assert await refreshed(proxy) == [None]
    assert sandbox.state.served("GET", path) == 2
    assert (
        proxy.registry.get_sample_value(
            "kounta_proxy_budget_served_total", {"account": "main", "class": "batch"}
        )
        == 1
    )
    status, body, headers, _ = await get(client, url)
    assert status == 200 and body != first  # the entry was refreshed with Kounta's change


@pytest.mark.parametrize(
    "cache_control", ["no-cache", "max-stale=0", "max-age=1", "no-cache, max-stale=60"]
)
async def test_a_caller_who_opts_out_waits_for_kounta(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    cache_control: str,
) -> None:
    proxy = await make_proxy(slow(sandbox.url, tmp_path))
    record = sorted(sandbox.state.store["customers"].records)[1]
    path = f"{CUSTOMERS}/{record}.json"
    await get(client, f"{proxy.url}{path}")
    status, _, headers, took = await get(
        client, f"{proxy.url}{path}", **{"Cache-Control": cache_control}
    )
    assert status == 200 and headers["X-Cache"] in ("REVALIDATED", "MISS"), headers
    assert sandbox.state.served("GET", path) == 2
    assert took > 0.25  # it waited for its token
    assert stale_answers(proxy) == 0
    assert not cache_of(proxy).refreshes


class Upstream:
    """Answers /v1/things/NAME with the Cache-Control the name stands for, an ETag that
    changes on each PUT, and 304 to a matching If-None-Match; notes what it was asked."""

    CONTROLS = {
        "plain": "max-age=0",
        "private": "max-age=0, private",
        "swr": "max-age=0, stale-while-revalidate=60",
        "must-revalidate": "max-age=0, must-revalidate",
        "proxy-revalidate": "max-age=0, proxy-revalidate",
        "s-maxage": "max-age=0, s-maxage=600",
        "no-cache": "no-cache",
    }

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}
        self.seen: list[tuple[str, str, str | None]] = []

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"].removesuffix(".json")
        inm = request.headers.get("If-None-Match")
        self.seen.append((request.method, name, inm))
        if request.method == "PUT":
            self.versions[name] = self.versions.get(name, 0) + 1
        etag = f'"{name}-{self.versions.get(name, 0)}"'
        headers = {"ETag": etag, "Cache-Control": self.CONTROLS.get(name, "max-age=0")}
        if request.method == "GET" and inm == etag:
            return web.Response(status=304, headers=headers)
        return web.json_response({"name": name, "etag": etag}, headers=headers)

    def gets(self, name: str) -> int:
        return sum(1 for m, n, _ in self.seen if m == "GET" and n == name)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    kounta = Upstream()
    app = web.Application()
    app.router.add_route("*", "/v1/things/{name}", kounta.handle)
    runner, port = await serve(app)
    yield kounta, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_responses_that_forbid_stale_always_go_to_kounta(
    make_proxy: MakeProxy, upstream: tuple[Upstream, str], tmp_path: Any
) -> None:
    kounta, base = upstream
    never = ("must-revalidate", "proxy-revalidate", "s-maxage", "no-cache")
    names = ("private", *never)
    proxy = await make_proxy(slow(base, tmp_path, burst=len(names)))
    async with aiohttp.ClientSession() as client:
        for name in names:  # the burst: each stored at once
            status, _, headers, _ = await get(client, f"{proxy.url}/v1/things/{name}")
            assert (status, headers["X-Cache"]) == (200, "MISS")
        # The four that forbid stale first: all wait for Kounta, so at least two are queued
        # even when a loaded machine took long enough to store the five for a token or two to
        # come back; behind them the expected wait is past busy_after.
        forbidding = [
            asyncio.ensure_future(get(client, f"{proxy.url}/v1/things/{name}")) for name in never
        ]
        await queued(proxy, 2)
        status, _, headers, _ = await get(client, f"{proxy.url}/v1/things/private")
        assert (status, headers["X-Cache"]) == (200, "STALE")  # private does not forbid it
        answers = await asyncio.gather(*forbidding)
    for name, (status, _, headers, _) in zip(never, answers, strict=True):
        # Each went to Kounta (none answered from the stored copy, whatever the wait).
        assert status == 200 and headers["X-Cache"] in ("REVALIDATED", "MISS"), (name, headers)
        assert kounta.gets(name) == 2, name
    assert stale_answers(proxy) == 1


async def test_a_refresh_is_dropped_when_a_write_invalidates_the_entry_meanwhile(
    make_proxy: MakeProxy, upstream: tuple[Upstream, str], tmp_path: Any
) -> None:
    kounta, base = upstream
    proxy = await make_proxy(slow(base, tmp_path))
    url = f"{proxy.url}/v1/things/plain"
    async with aiohttp.ClientSession() as client:
        await stored_then_stale(client, url)
        async with client.put(url, json={}, headers={"X-Proxy-Key": KEY}) as r:
            assert r.status == 200  # standard: its token comes before the batch refresh
    [ended] = await refreshed(proxy)
    assert ended is not None  # dropped: no token spent on a revalidation nobody needs
    assert kounta.seen == [("GET", "plain", None), ("PUT", "plain", None)]


async def test_stale_while_revalidate_refreshes_at_batch_priority(
    make_proxy: MakeProxy, upstream: tuple[Upstream, str], tmp_path: Any
) -> None:
    kounta, base = upstream
    proxy = await make_proxy(slow(base, tmp_path))
    url = f"{proxy.url}/v1/things/swr"
    async with aiohttp.ClientSession() as client:
        headers = await stored_then_stale(client, url)
    assert "stale-while-revalidate" in headers["Cache-Status"]
    assert await refreshed(proxy) == [None]
    assert kounta.seen[-1] == ("GET", "swr", '"swr-0"')
    served = {
        klass: proxy.registry.get_sample_value(
            "kounta_proxy_budget_served_total", {"account": "main", "class": klass}
        )
        for klass in ("standard", "batch")
    }
    assert served == {"standard": 1, "batch": 1}


async def test_replicas_on_redis_refresh_a_key_once_for_the_fleet(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    """Two replicas sharing the budget and the entries, both busy (requests queued): both
    answer the stored copy at once, and one revalidation reaches Kounta for the two."""
    a, b = [
        await make_proxy(
            on_redis(slow(sandbox.url, tmp_path / name), redis_server, redis_prefix),
            registry=CollectorRegistry(),
        )
        for name in ("a", "b")
    ]
    ids = sorted(sandbox.state.store["customers"].records)
    path = f"{CUSTOMERS}/{ids[0]}.json"
    status, first, _, _ = await get(client, a.url + path)
    assert status == 200
    cold = [  # each replica's budget queue holds two caller requests
        asyncio.create_task(get(client, f"{p.url}{CUSTOMERS}/{ids[n]}.json"))
        for n, p in ((1, a), (2, a), (3, b), (4, b))
    ]
    await queued(a, 1)
    await queued(b, 1)
    answers = await asyncio.gather(get(client, a.url + path), get(client, b.url + path))
    for status, body, headers, _ in answers:  # STALE with the old body: neither waited
        assert (status, headers["X-Cache"], body) == (200, "STALE", first), headers
        assert headers["Cache-Status"] == BUSY
    # Each queued a refresh; the one that found the other's fetch lock was dropped at once.
    ended = await refreshed(a) + await refreshed(b)
    assert ended.count(None) <= 1 and set(ended) <= {None, Dropped}, ended
    await asyncio.gather(*cold)
    assert sandbox.state.served("GET", path) == 2  # the first fetch and one revalidation


async def test_closing_the_cache_leaves_no_refresh_task_behind(
    make_proxy: MakeProxy,
    upstream: tuple[Upstream, str],
    tmp_path: Any,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    """A refresh still waiting for its token when the proxy stops is cancelled, and so is
    what it spawns as it settles (its finish, against Redis: before the tier closes)."""
    _, base = upstream
    proxy = await make_proxy(on_redis(slow(base, tmp_path), redis_server, redis_prefix))
    url = f"{proxy.url}/v1/things/plain"
    async with aiohttp.ClientSession() as client:
        await get(client, url)
        # With Redis the replica learns the budget is busy from its queue (a caller waiting).
        waiting = asyncio.create_task(get(client, f"{proxy.url}/v1/things/private"))
        await queued(proxy, 1)
        assert (await get(client, url))[2]["X-Cache"] == "STALE"
        await waiting
    cache = cache_of(proxy)
    assert cache.refreshes and cache.tasks
    await cache.close()
    assert not cache.tasks
