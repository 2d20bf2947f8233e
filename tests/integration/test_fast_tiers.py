"""Memory-tier misses on the fast path (proxy.edge.fast.FastPath.look): a fresh entry found
on disk or in Redis is answered without the long way, with the long way's answer (headers,
counts, access line), and every request looks the tier up once whichever way it takes.

The long way's own answer to the same lookup comes from a request with an unknown Pragma
(it changes nothing but the way the request takes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.cache.memory import Stored
from proxy.edge.services import SERVICES
from proxy.settings import (
    CacheRule,
    CacheSettings,
    RetrySettings,
    Secret,
    Settings,
    SharedSettings,
    WebhookSettings,
)
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings, serve_handler
from tests.integration.test_fast_path import LIST, LongWay, get, same_answers
from tests.integration.test_shared_entries import shared_op
from tests.redis_server import TOKEN_KEY, RedisServer
from tests.replicas import caching

FRESH = "/v1/fresh.json"  # max-age=600: a fresh HIT
STALE = "/v1/stale.json"  # max-age=0 and an ETag: revalidated every time
VARY = "/v1/vary.json"  # max-age=600, Vary: User-Agent (forwarded)
SLOW = {"Pragma": "x-whatever"}
PER_ANSWER = {"x-request-id", "date", "age"}
Answer = tuple[int, CIMultiDictProxy[str], bytes]


def settings_for(
    upstream: str, tmp_path: Any, name: str, url: str, prefix: str, **cache: Any
) -> Settings:
    """A caching replica on the Redis at ``url`` (tests/replicas.py's ``caching``)."""
    space = SharedSettings(
        backend="redis", url=url, key_prefix=prefix, timeout=0.3, token_key=Secret(TOKEN_KEY)
    )
    return caching(upstream, tmp_path / name, space, **cache)


@dataclass
class Origin:
    url: str = ""
    served: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b'{"things": [' + b'"thing", ' * 300 + b'"last"]}'

    async def handle(self, request: web.Request) -> web.Response:
        inm = request.headers.get("If-None-Match", "-")
        self.served.append((request.path, inm))
        age = "0" if request.path == STALE else "600"
        headers = {
            "ETag": '"v1"',
            "Cache-Control": f"max-age={age}",
            "Content-Type": "application/json",
            "X-Next-Page": f"{self.url}{request.path}?page=2",
        }
        if request.path == VARY:
            headers["Vary"] = "User-Agent"
        if inm == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, headers=headers)


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    o = Origin()
    runner, o.url = await serve_handler(o.handle)
    yield o
    await runner.cleanup()


def steady(proxy: Proxy, headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """Headers in order, without per-answer values and the proxy's own URL."""
    return [
        (k.lower(), v.replace(proxy.url, "PROXY"))
        for k, v in headers.items()
        if k.lower() not in PER_ANSWER
    ]


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.registry.get_sample_value(name, labels) or 0.0  # type: ignore[attr-defined]


def hits(proxy: Proxy) -> float:
    return sample(proxy, "kounta_proxy_cache_lookups_total", result="hit", reason="fresh")


class Looks:
    """Counts the tier's lookups of a proxy (its real lookup, wrapped)."""

    def __init__(self, proxy: Proxy) -> None:
        entries = proxy.app[SERVICES].cache.entries  # type: ignore[union-attr]
        self.count = 0
        real: Callable[[str, str], Awaitable[Stored | None]] = entries.lookup

        async def counted(account: str, key: str) -> Stored | None:
            self.count += 1
            return await real(account, key)

        entries.lookup = counted


async def disk_only(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Any
) -> tuple[Proxy, LongWay, Looks]:
    """A proxy without a memory tier (every hit is a disk hit), its long way and lookups."""
    cache = CacheSettings(memory_size=0)
    p = await make_proxy(proxy_settings(origin.url, tmp_path, cache=cache))
    return p, LongWay(p), Looks(p)


async def test_a_fresh_disk_hit_skips_the_long_way_and_answers_the_same(
    make_proxy: MakeProxy,
    origin: Origin,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    p, long_way, looks = await disk_only(make_proxy, origin, tmp_path)
    first = await get(client, p.url + FRESH)
    assert (first[0], first[1]["X-Cache"], long_way.count, looks.count) == (200, "MISS", 1, 1)
    assert not p.app[SERVICES].store.hot.items  # type: ignore[union-attr]

    fast = [await get(client, p.url + FRESH, **h) for h in ({}, {"If-None-Match": '"v1"'})]
    assert long_way.count == 1  # both answered on the fast path, from the disk
    slow = [await get(client, p.url + FRESH, **SLOW, **h) for h in ({}, {"If-None-Match": '"v1"'})]
    assert long_way.count == 3
    assert looks.count == 5  # one lookup each, whichever way it went
    assert origin.served == [(FRESH, "-")]
    for (fs, fh, fb), (ss, sh, sb) in zip(fast, slow, strict=True):
        assert (fs, fb) == (ss, sb)
        assert fh["X-Cache"] == "HIT" and fh["Cache-Status"] == sh["Cache-Status"]
        assert steady(p, fh) == steady(p, sh)  # same headers, same order
    assert [a[0] for a in fast] == [200, 304] and fast[0][2] == first[2]
    assert hits(p) == 4  # a fresh hit each, counted once
    lines = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    fields = ("status", "cache", "route", "caller", "account", "bytes", "upstream_status")
    assert [[f[n] for n in fields] for f in lines[1:3]] == [
        [f[n] for n in fields] for f in lines[3:5]
    ]
    assert sample(p, "kounta_proxy_requests_in_flight") == 0


async def test_a_stale_disk_entry_is_handed_to_the_long_way_without_a_second_lookup(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p, long_way, looks = await disk_only(make_proxy, origin, tmp_path)
    assert (await get(client, p.url + STALE))[1]["X-Cache"] == "MISS"
    again = await get(client, p.url + STALE)
    assert (again[0], again[1]["X-Cache"], again[2]) == (200, "REVALIDATED", origin.body)
    assert again[1]["Cache-Status"] == "kounta-proxy; fwd=stale; fwd-status=304"
    assert (long_way.count, looks.count) == (2, 2)  # the long way used the edge's lookup
    assert origin.served == [(STALE, "-"), (STALE, '"v1"')]


async def test_a_fresh_redis_hit_skips_the_long_way_and_answers_the_same(
    make_proxy: MakeProxy,
    origin: Origin,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    a, b, c = [
        await make_proxy(
            settings_for(origin.url, tmp_path, f"r{i}", redis_server.url, redis_prefix),
            registry=CollectorRegistry(),
        )
        for i in range(3)
    ]
    assert (await get(client, a.url + FRESH))[1]["X-Cache"] == "MISS"
    for _ in range(100):  # the store in Redis follows the answer
        if shared_op(a, "put", "ok"):
            break
        await asyncio.sleep(0.01)
    assert shared_op(a, "put", "ok") == 1
    fast_way, slow_way = LongWay(b), LongWay(c)
    fast_looks, slow_looks = Looks(b), Looks(c)
    fast = await get(client, b.url + FRESH)
    slow = await get(client, c.url + FRESH, **SLOW)
    assert (fast_way.count, slow_way.count) == (0, 1)  # b answered on the fast path
    assert (fast_looks.count, slow_looks.count) == (1, 1)
    assert shared_op(b, "get", "hit") == shared_op(c, "get", "hit") == 1
    assert (fast[0], fast[1]["X-Cache"], fast[2]) == (200, "HIT", slow[2])
    assert steady(b, fast[1]) == steady(c, slow[1])
    assert hits(b) == hits(c) == 1
    # Promoted into b's memory tier as the long way promotes: the next one needs no lookup.
    assert (await get(client, b.url + FRESH))[1]["X-Cache"] == "HIT"
    assert (fast_looks.count, fast_way.count) == (1, 0)
    assert origin.served == [(FRESH, "-")]


async def test_a_disk_entry_with_vary_is_answered_as_the_long_way_selects_it(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p, long_way, looks = await disk_only(make_proxy, origin, tmp_path)
    en, fr = {"User-Agent": "till/1"}, {"User-Agent": "till/2"}
    assert (await get(client, p.url + VARY, **en))[1]["X-Cache"] == "MISS"
    fast = await get(client, p.url + VARY, **en)
    assert (fast[0], fast[1]["X-Cache"], long_way.count) == (200, "HIT", 1)
    slow = await get(client, p.url + VARY, **en, **SLOW)
    assert steady(p, fast[1]) == steady(p, slow[1])
    # Another agent: the stored answer does not select it, the long way fetches.
    other = await get(client, p.url + VARY, **fr)
    assert (other[0], other[1]["X-Cache"], long_way.count) == (200, "MISS", 3)
    assert looks.count == 4
    assert origin.served == [(VARY, "-"), (VARY, "-")]


async def test_a_webhook_rules_disk_entry_goes_the_long_way_which_says_so(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    rule = CacheRule("/v1/*", fresh_for=600, webhooks=True)
    settings = proxy_settings(
        origin.url,
        tmp_path,
        cache=CacheSettings(memory_size=0, rules=(rule,)),
        webhooks=WebhookSettings(enabled=True, port=0, secret=Secret("s" * 32)),
    )
    p = await make_proxy(settings)
    long_way, looks = LongWay(p), Looks(p)
    assert (await get(client, p.url + FRESH))[1]["X-Cache"] == "MISS"
    plain = await get(client, p.url + FRESH)
    slow = await get(client, p.url + FRESH, **SLOW)
    assert (plain[1]["X-Cache"], long_way.count, looks.count) == ("HIT", 3, 3)
    assert "detail=webhooks" in plain[1]["Cache-Status"]
    assert steady(p, plain[1]) == steady(p, slow[1])


async def test_a_caller_leaving_during_the_tier_lookup_is_logged_as_the_long_way_logs_it(
    make_proxy: MakeProxy,
    origin: Origin,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    redis_proc: RedisServer,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    settings = settings_for(origin.url, tmp_path, "r", redis_proc.url, redis_prefix, memory_size=0)
    shared = dataclasses.replace(settings.shared, timeout=3.0)  # longer than the caller waits
    p = await make_proxy(dataclasses.replace(settings, shared=shared), registry=CollectorRegistry())
    long_way = LongWay(p)
    assert (await get(client, p.url + FRESH))[1]["X-Cache"] == "MISS"
    assert redis_proc.proc is not None
    redis_proc.proc.send_signal(signal.SIGSTOP)  # the lookup in Redis hangs (until its timeout)
    try:
        with pytest.raises(asyncio.TimeoutError):
            async with client.get(p.url + FRESH, timeout=aiohttp.ClientTimeout(total=0.3)):
                pass
        for _ in range(100):
            lines = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
            if len(lines) == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        redis_proc.proc.send_signal(signal.SIGCONT)
    assert [(f["status"], f["cache"]) for f in lines] == [(200, "MISS"), (499, "-")]
    assert long_way.count == 1  # the second never reached the long way
    assert sample(p, "kounta_proxy_requests_in_flight") == 0


async def test_disk_hits_the_fast_way_and_the_long_way_give_the_same_answers(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    cache = CacheSettings(rules=(CacheRule("/v1/*", fresh_for=600),), memory_size=0)
    settings = proxy_settings(sandbox.url, tmp_path, cache=cache, retry=RetrySettings(attempts=1))
    p = await make_proxy(settings)
    long_way = LongWay(p)
    status, headers, _ = await get(client, p.url + LIST)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    await same_answers(p, long_way, headers["ETag"], client)
    assert not p.app[SERVICES].store.hot.items  # type: ignore[union-attr]
