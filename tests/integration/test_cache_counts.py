"""One answer, one lookup, one name: for every ``X-Cache`` value the answer
says, ``kounta_proxy_cache_lookups_total`` counts exactly one lookup whose ``result`` is that
value, and ``Cache-Status`` says the same thing. Real sockets, a real disk cache, an origin
of our own on loopback, the proxy's clock moved by the test.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import MakeProxy, Proxy, proxy_settings, serve_handler

FRESH = "/v1/companies/5001/products.json"
CHANGING = "/v1/companies/5001/customers.json"
SWR = "/v1/companies/5001/categories.json"
MISSING = "/v1/companies/5001/orders/404.json"
# What each X-Cache value's Cache-Status member (RFC 9211) may say.
CACHE_STATUS = {
    "HIT": ("kounta-proxy; hit",),
    "STALE": ("kounta-proxy; hit; detail=",),
    "REVALIDATED": ("kounta-proxy; fwd=stale",),
    "MISS": ("kounta-proxy; fwd=miss", "kounta-proxy; fwd=uri-miss"),
    "BYPASS": ("kounta-proxy; fwd=bypass",),
}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def origin(request: web.Request) -> web.Response:
    if request.path == MISSING:
        return web.json_response({"error": "not_found"}, status=404)
    if request.path == CHANGING:
        # Always stale, always the same: every lookup revalidates and gets a 304.
        headers = {"Cache-Control": "max-age=0", "ETag": '"c1"'}
        if request.headers.get("If-None-Match") == '"c1"':
            return web.Response(status=304, headers=headers)
        return web.json_response([{"id": 1}], headers=headers)
    if request.path == SWR:
        headers = {"Cache-Control": "max-age=10, stale-while-revalidate=600", "ETag": '"s1"'}
        return web.json_response([{"id": 2}], headers=headers)
    return web.json_response([{"id": 3}], headers={"Cache-Control": "max-age=600"})


@pytest.fixture
async def counted(make_proxy: MakeProxy, tmp_path: Path) -> AsyncIterator[tuple[Proxy, Clock]]:
    runner, url = await serve_handler(origin)
    clock = Clock()
    proxy = await make_proxy(proxy_settings(url, tmp_path), clock=clock)
    yield proxy, clock
    await runner.cleanup()


def lookups(proxy: Proxy) -> dict[tuple[str, str], float]:
    found = {}
    for family in proxy.registry.collect():
        for s in family.samples:
            if s.name == "kounta_proxy_cache_lookups_total" and s.value:
                found[(s.labels["result"], s.labels["reason"])] = s.value
    return found


async def ask(proxy: Proxy, path: str, **headers: str) -> tuple[int, str, str, dict[Any, float]]:
    """Status, X-Cache and Cache-Status of one answer, and the lookups it added."""
    before = lookups(proxy)
    async with (
        aiohttp.ClientSession() as client,
        client.get(proxy.url + path, headers=headers) as r,
    ):
        await r.read()
        answer = r.status, r.headers["X-Cache"], r.headers["Cache-Status"]
    after = lookups(proxy)
    added = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    return (*answer, added)


async def test_every_answer_is_one_lookup_named_as_its_x_cache(
    counted: tuple[Proxy, Clock],
) -> None:
    proxy, clock = counted
    seen: dict[str, int] = {}
    cases: list[tuple[str, dict[str, str], int, str]] = [
        (FRESH, {}, 200, "MISS"),
        (FRESH, {}, 200, "HIT"),  # the fast path
        (FRESH, {"If-None-Match": "*"}, 304, "HIT"),  # the caller's own 304: one lookup
        (FRESH, {"Accept-Language": "en", "Cache-Control": "max-age=600"}, 200, "HIT"),
        (FRESH, {"Cache-Control": "no-store"}, 200, "BYPASS"),
        (CHANGING, {}, 200, "MISS"),
        (CHANGING, {}, 200, "REVALIDATED"),  # was counted twice
        (CHANGING, {"If-None-Match": '"c1"'}, 304, "REVALIDATED"),
        # Not a cacheable answer: was X-Cache BYPASS, Cache-Status fwd=uri-miss, miss/cold.
        (MISSING, {}, 404, "BYPASS"),
        (MISSING, {}, 404, "BYPASS"),
        (SWR, {}, 200, "MISS"),
    ]
    for path, headers, status, x_cache in cases:
        got = await ask(proxy, path, **headers)
        assert got[:2] == (status, x_cache), (path, headers, got)
        check(got, x_cache)
        seen[x_cache] = seen.get(x_cache, 0) + 1
    clock.now += 20  # past max-age=10, within stale-while-revalidate
    got = await ask(proxy, SWR)
    assert got[:2] == (200, "STALE"), got
    check(got, "STALE")
    seen["STALE"] = 1
    assert set(seen) == set(CACHE_STATUS)  # every X-Cache value was seen


def check(got: tuple[int, str, str, dict[Any, float]], x_cache: str) -> None:
    _, _, cache_status, added = got
    assert sum(added.values()) == 1, (x_cache, added)  # one answer, one lookup
    ((result, _reason),) = added
    assert result == x_cache.lower(), (x_cache, added)  # one name
    assert cache_status.startswith(CACHE_STATUS[x_cache]), (x_cache, cache_status)
