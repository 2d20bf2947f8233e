"""The ETag cache in front of the sandbox, over real sockets, counting upstream requests."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.cache.admin import run_cli
from proxy.edge.services import SERVICES
from proxy.messages import ProxyRequest
from proxy.settings import BudgetSettings, CacheRule, CacheSettings, RetrySettings, Settings
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings, serve_handler

LIST = "/v1/companies/5001/customers.json"
ONE = "/v1/companies/5001/customers/{}.json"


async def get(
    client: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with client.get(url, headers=headers) as r:
        return r.status, r.headers, await r.read()


def cached(tmp_path: Any, sandbox: Sandbox, **cache: Any) -> Settings:
    # One try: these tests count upstream requests, and resends would blur them.
    return proxy_settings(
        sandbox.url, tmp_path, cache=CacheSettings(**cache), retry=RetrySettings(attempts=1)
    )


def ctx_of(proxy: Proxy) -> Any:
    return proxy.app[SERVICES]


async def settle(proxy: Proxy) -> None:
    """Let background flights and queued disk writes finish."""
    ctx = ctx_of(proxy)
    if ctx.cache is not None:
        await asyncio.gather(*list(ctx.cache.tasks), return_exceptions=True)
    await ctx.store.flush()


async def test_miss_then_revalidated_with_the_etag(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    s1, h1, b1 = await get(client, proxy.url + LIST)
    assert (s1, h1["X-Cache"]) == (200, "MISS")
    assert "Age" not in h1
    s2, h2, b2 = await get(client, proxy.url + LIST)
    assert (s2, h2["X-Cache"]) == (200, "REVALIDATED")
    assert b2 == b1
    assert h2["ETag"] == h1["ETag"]
    assert int(h2["Age"]) >= 0
    assert h2["X-Next-Page"].startswith(proxy.url)  # rewritten per answer, stored upstream form
    assert sandbox.state.served("GET", LIST) == 2
    assert sandbox.state.not_modified() == 1


async def test_fresh_hit_by_rule_never_asks_upstream(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    rules = (CacheRule("/v1/companies/*/customers", fresh_for=60),)
    p = await make_proxy(cached(tmp_path, sandbox, rules=rules))
    await get(client, p.url + LIST)
    for _ in range(3):
        status, headers, _ = await get(client, p.url + LIST)
        assert (status, headers["X-Cache"]) == (200, "HIT")
    assert sandbox.state.served("GET", LIST) == 1
    # the caller's Cache-Control: no-cache forces a revalidation
    _, headers, _ = await get(client, p.url + LIST, **{"Cache-Control": "no-cache"})
    assert headers["X-Cache"] == "REVALIDATED"
    assert sandbox.state.served("GET", LIST) == 2


async def test_selecting_headers_make_separate_entries(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    path = "/v1/companies/5001/customers"
    _, h1, b1 = await get(client, proxy.url + path, Accept="application/json")
    _, h2, b2 = await get(client, proxy.url + path, Accept="application/json", **{"X-Page": "1"})
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "MISS")
    assert b1 != b2
    _, h3, b3 = await get(client, proxy.url + path, Accept="application/json", **{"X-Page": "1"})
    assert (h3["X-Cache"], b3) == ("REVALIDATED", b2)


async def test_callers_conditionals_are_answered_by_the_cache(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    _, headers, _ = await get(client, proxy.url + LIST)
    etag = headers["ETag"]
    for inm in (etag, f'"nope", W/{etag}', "*"):
        status, h, body = await get(client, proxy.url + LIST, **{"If-None-Match": inm})
        assert (status, body) == (304, b"")
        assert h["ETag"] == etag
        assert h["X-Cache"] == "REVALIDATED"
    status, _, body = await get(client, proxy.url + LIST, **{"If-None-Match": '"other"'})
    assert status == 200
    assert body
    # cold key: the caller's validator is not forwarded, the fetched answer is judged here
    other = "/v1/companies/5001/products.json"
    status, h, _ = await get(client, proxy.url + other, **{"If-None-Match": '"x"'})
    assert (status, h["X-Cache"]) == (200, "MISS")
    assert sandbox.state.not_modified() == 4  # only the cache's own revalidations


async def test_head_is_answered_from_a_stored_get(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(cached(tmp_path, sandbox, rules=(CacheRule("/v1/*", fresh_for=60),)))
    _, _, body = await get(client, p.url + LIST)
    async with client.head(p.url + LIST) as r:
        assert r.status == 200
        assert r.headers["X-Cache"] == "HIT"
        assert r.headers["ETag"]
        assert r.headers["Content-Length"] == str(len(body))
        assert await r.read() == b""
    assert sandbox.state.served() == 1


async def test_concurrent_requests_share_one_fetch(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any
) -> None:
    p = await make_proxy(cached(tmp_path, sandbox))
    # The upstream answers after 1 s, and the 500 connections are open before: every request
    # arrives while the one fetch is out (no cache rule, so one arriving after it would
    # revalidate), even on a machine slowed by coverage and load.
    sandbox.state.inject_latency(1.0, count=1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def opened() -> int:
            async with session.get(p.url + "/") as r:
                return r.status

        assert set(await asyncio.gather(*(opened() for _ in range(500)))) == {404}
        assert sandbox.state.served() == 0
        results = await asyncio.gather(*(get(session, p.url + LIST) for _ in range(500)))
    assert {r[0] for r in results} == {200}
    assert len({r[2] for r in results}) == 1
    assert sandbox.state.served() == 1
    shared = p.registry.get_sample_value(
        "kounta_proxy_cache_coalesced_total", {"outcome": "shared"}
    )
    assert shared is not None
    assert shared >= 400


async def test_a_waiter_gives_up_and_fetches_alone(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(cached(tmp_path, sandbox, coalesce_wait=0.05))
    sandbox.state.inject_latency(0.4, count=1)
    results = await asyncio.gather(get(client, p.url + LIST), get(client, p.url + LIST))
    assert [r[0] for r in results] == [200, 200]
    assert sandbox.state.served() == 2


async def test_shared_fetch_survives_the_first_caller_leaving(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(cached(tmp_path, sandbox, rules=(CacheRule("/v1/*", fresh_for=60),)))
    sandbox.state.inject_latency(0.3, count=1)
    first = asyncio.ensure_future(get(client, p.url + LIST))
    await asyncio.sleep(0.1)
    second = asyncio.ensure_future(get(client, p.url + LIST))
    await asyncio.sleep(0.05)
    first.cancel()  # the starter disconnects
    status, headers, body = await second
    assert (status, headers["X-Cache"]) == (200, "MISS")
    assert body.startswith(b"[")
    _, headers, _ = await get(client, p.url + LIST)
    assert headers["X-Cache"] == "HIT"
    assert sandbox.state.served() == 1
    assert not ctx_of(p).cache.flights  # no lock left behind


async def test_failed_fetch_fails_all_waiters_and_leaves_nothing(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(cached(tmp_path, sandbox))
    sandbox.state.inject_latency(0.2, count=1)
    sandbox.state.inject_status(503, b"down", count=1)
    results = await asyncio.gather(*(get(client, p.url + LIST) for _ in range(5)))
    assert [r[0] for r in results] == [503] * 5
    assert sandbox.state.served() == 1
    assert not ctx_of(p).cache.flights
    status, headers, _ = await get(client, p.url + LIST)
    assert (status, headers["X-Cache"]) == (200, "MISS")


@pytest.mark.parametrize("fault", ["status500", "status429", "drop", "timeout"])
async def test_stale_if_error(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    fault: str,
) -> None:
    settings = cached(tmp_path, sandbox, rules=(CacheRule("/v1/*", stale_if_error=300),))
    settings = Settings(**{**settings.__dict__, "budget": BudgetSettings(max_wait=0.1)})
    if fault == "timeout":
        upstream = settings.upstream
        settings = Settings(
            **{
                **settings.__dict__,
                "upstream": type(upstream)(
                    base_url=upstream.base_url,
                    connect_timeout=1,
                    read_timeout=0.2,
                    total_timeout=0.5,
                ),
            }
        )
    p = await make_proxy(settings)
    _, _, body = await get(client, p.url + LIST)
    if fault == "status500":
        sandbox.state.inject_status(500, b"boom", count=None)
    elif fault == "status429":
        sandbox.state.inject_status(429, b"Limit exceeded", count=None)
    elif fault == "drop":
        sandbox.state.inject_drop(count=None)
    else:
        sandbox.state.inject_latency(2.0, count=None)
    status, headers, stale = await get(client, p.url + LIST)
    assert (status, headers["X-Cache"]) == (200, "STALE")
    assert stale == body
    assert "Age" in headers


async def test_no_stale_without_stale_if_error(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    await get(client, proxy.url + LIST)
    sandbox.state.inject_status(500, b"boom")
    status, _headers, body = await get(client, proxy.url + LIST)
    assert status == 500
    assert b"server_error" in body


async def test_stale_while_revalidate_answers_at_once_and_refreshes_once(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    rules = (CacheRule("/v1/*", stale_while_revalidate=300),)
    p = await make_proxy(cached(tmp_path, sandbox, rules=rules))
    await get(client, p.url + LIST)
    sandbox.state.inject_latency(0.3, count=1)
    results = await asyncio.gather(*(get(client, p.url + LIST) for _ in range(5)))
    assert {r[1]["X-Cache"] for r in results} == {"STALE"}
    await settle(p)
    assert sandbox.state.served() == 2  # one background refresh for five stale answers
    assert sandbox.state.not_modified() == 1


async def test_only_if_cached_and_no_store(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    status, headers, body = await get(
        client, proxy.url + LIST, **{"Cache-Control": "only-if-cached"}
    )
    assert status == 504
    assert b"only_if_cached" in body
    assert sandbox.state.served() == 0
    status, headers, _ = await get(client, proxy.url + LIST, **{"Cache-Control": "no-store"})
    assert (status, headers["X-Cache"]) == (200, "BYPASS")
    status, headers, _ = await get(client, proxy.url + LIST, **{"Cache-Control": "no-store"})
    assert headers["X-Cache"] == "BYPASS"
    assert sandbox.state.served() == 2
    assert sandbox.state.not_modified() == 0
    # The documented label, from the decision's code (it once came from its prose: "request").
    bypassed = proxy.registry.get_sample_value(
        "kounta_proxy_cache_lookups_total", {"result": "bypass", "reason": "no_store"}
    )
    assert bypassed == 2


async def test_writes_invalidate_target_and_lists(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(cached(tmp_path, sandbox, rules=(CacheRule("/v1/*", fresh_for=600),)))
    _, _, listed = await get(client, p.url + LIST)
    first = __import__("json").loads(listed)[0]["id"]
    one = ONE.format(first)
    bare = one.removesuffix(".json")
    await get(client, p.url + one)
    await get(client, p.url + bare, Accept="application/json")
    other = "/v1/companies/5001/products.json"
    await get(client, p.url + other)
    async with client.put(p.url + bare, json={"first_name": "Zed"}) as r:
        assert r.status == 200
        assert r.headers["X-Cache"] == "BYPASS"
    for url, headers in ((one, {}), (bare, {"Accept": "application/json"}), (LIST, {})):
        _status, h, _body = await get(client, p.url + url, **headers)
        assert h["X-Cache"] == "MISS", url
    assert b"Zed" in (await get(client, p.url + one))[2]
    assert (await get(client, p.url + other))[1]["X-Cache"] == "HIT"


def respelled(path: str) -> str:
    """The same resource, spelled with escapes RFC 3986 6.2.2 calls equivalent: the last
    digit of the id and a letter of the collection percent-encoded, in both hex cases."""
    stem, dot, suffix = path.rpartition(".")
    head, digit = stem[:-1], stem[-1]
    return head.replace("customers", "%63ustomer%73") + f"%{ord(digit):02x}".upper() + dot + suffix


async def test_a_write_invalidates_every_spelling_of_its_target(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    # Found in review: after PUT .../100001.json, .../10000%31.json stayed a HIT.
    p = await make_proxy(cached(tmp_path, sandbox, rules=(CacheRule("/v1/*", fresh_for=600),)))
    _, _, listed = await get(client, p.url + LIST)
    one = ONE.format(__import__("json").loads(listed)[0]["id"])
    other = respelled(one)
    assert other != one and "%" in other
    url = URL(p.url + other, encoded=True)  # as sent: yarl would decode "%31" itself
    assert (await get(client, p.url + one))[1]["X-Cache"] == "MISS"
    async with client.get(url) as r:
        assert (r.status, r.headers["X-Cache"]) == (200, "HIT")  # one resource, one key
    async with client.put(p.url + one, json={"first_name": "Zed"}) as r:
        assert r.status == 200
    async with client.get(url) as r:
        assert (r.status, r.headers["X-Cache"]) == (200, "MISS")
        assert b"Zed" in await r.read()
    assert sandbox.state.served("GET", one) == 2  # the first MISS and the one after the write


async def test_failed_write_keeps_entries(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(cached(tmp_path, sandbox, rules=(CacheRule("/v1/*", fresh_for=600),)))
    await get(client, p.url + LIST)
    async with client.post(p.url + LIST, data=b"not json") as r:
        assert r.status == 400
    assert (await get(client, p.url + LIST))[1]["X-Cache"] == "HIT"


async def test_truncated_body_is_never_stored(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(cached(tmp_path, sandbox))
    sandbox.state.inject_drop(count=1)
    # The body is read whole before answering, so the cut shows as a clean 502, not a short 200.
    status, _, body = await get(client, proxy.url + LIST)
    assert status == 502
    assert b"upstream_truncated" in body
    status, headers, body = await get(client, proxy.url + LIST)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    assert body.endswith(b"]")


async def test_entries_survive_a_restart(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    settings = cached(tmp_path, sandbox)
    p1 = await make_proxy(settings)
    await get(client, p1.url + LIST)
    await settle(p1)
    await p1.app.shutdown()
    p2 = await make_proxy(settings)
    _, headers, _ = await get(client, p2.url + LIST)
    assert headers["X-Cache"] == "REVALIDATED"


async def test_corrupt_cache_dir_is_moved_aside(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    directory = tmp_path / "state" / "cache"
    directory.mkdir(parents=True)
    (directory / "cache.db").write_bytes(b"this is not sqlite" * 100)
    p = await make_proxy(cached(tmp_path, sandbox))
    status, headers, _ = await get(client, p.url + LIST)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    assert [d.name for d in (tmp_path / "state").iterdir() if "corrupt" in d.name]
    assert ctx_of(p).checks["cache"]() is None


async def test_read_errors_count_as_misses(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession, monkeypatch: Any
) -> None:
    await get(client, proxy.url + LIST)
    store = ctx_of(proxy).store
    await store.flush()
    store.hot.clear()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(store.disk, "get", broken)
    status, headers, _ = await get(client, proxy.url + LIST)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    errors = proxy.registry.get_sample_value(
        "kounta_proxy_cache_store_errors_total", {"op": "read"}
    )
    assert errors == 1


async def test_full_disk_disables_storing_but_keeps_answering(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession, monkeypatch: Any
) -> None:
    store = ctx_of(proxy).store

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.disk, "set", full)
    for _ in range(3):
        status, _headers, _ = await get(client, proxy.url + f"{LIST}?start=0")
        assert status == 200
        await store.flush()
        store.hot.clear()
    assert "disk full" in ctx_of(proxy).checks["cache"]()
    assert proxy.registry.get_sample_value("kounta_proxy_cache_storing_disabled") == 1
    full_errors = proxy.registry.get_sample_value(
        "kounta_proxy_cache_store_errors_total", {"op": "full"}
    )
    assert full_errors == 1  # one transition, one log line


async def big_upstream(size: int) -> tuple[web.AppRunner, str, bytes, list[int]]:
    body = bytes(range(256)) * (size // 256)
    etag = '"' + hashlib.sha1(body).hexdigest() + '"'
    hits: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        hits.append(1)
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        out = web.StreamResponse(headers={"ETag": etag, "Content-Type": "application/json"})
        out.enable_chunked_encoding()  # no Content-Length: the size shows only as it arrives
        await out.prepare(request)
        for i in range(0, len(body), 100_000):
            await out.write(body[i : i + 100_000])
        await out.write_eof()
        return out

    runner, upstream = await serve_handler(handler)
    return runner, upstream, body, hits


@pytest.mark.parametrize(("cap", "stored"), [(8 * 1024 * 1024, True), (2 * 1024 * 1024, False)])
async def test_large_bodies_stream_and_are_stored_under_the_cap(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession, cap: int, stored: bool
) -> None:
    runner, url, body, hits = await big_upstream(3 * 1024 * 1024)
    try:
        settings = proxy_settings(url, tmp_path, cache=CacheSettings(max_entry_size=cap))
        p = await make_proxy(settings)
        status, headers, got = await get(client, p.url + "/v1/big")
        assert (status, headers["X-Cache"], got == body) == (200, "MISS", True)
        await settle(p)
        status, headers, got = await get(client, p.url + "/v1/big")
        assert got == body
        assert headers["X-Cache"] == ("REVALIDATED" if stored else "MISS")
        assert len(hits) == 2
        await settle(p)  # the second fetch's pump may still be discarding its spill file
        assert not list((Path(ctx_of(p).store.directory) / "tmp").glob("body-*"))
    finally:
        await runner.cleanup()


def open_cache_files(directory: Path, glob: str = "*.val") -> list[str]:
    """This process's open files under ``directory`` whose name matches ``glob``."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = Path(os.readlink(fd))
            if target.is_relative_to(directory) and target.match(glob):
                found.append(str(target))
    return found


async def test_a_stored_body_left_unread_is_closed_by_release(
    make_proxy: MakeProxy, tmp_path: Any
) -> None:
    # A caller that hangs up mid-body ends in the answer's release(): that must close the
    # stored body's file then and there, not whenever its generator is collected.
    runner, url, body, _ = await big_upstream(3 * 1024 * 1024)
    try:
        p = await make_proxy(proxy_settings(url, tmp_path))
        async with aiohttp.ClientSession() as client:
            assert (await get(client, p.url + "/v1/big"))[2] == body
        await settle(p)
        directory = Path(ctx_of(p).store.directory)
        request = ProxyRequest(
            method="GET",
            path="/v1/big",
            query="",
            headers=CIMultiDictProxy(CIMultiDict({"Accept": "*/*"})),
            account="main",
        )
        response = await ctx_of(p).cache.send(request)
        assert (response.cache_status, response.upstream_status) == ("REVALIDATED", 304)
        assert not isinstance(response.body, bytes)
        first = await anext(aiter(response.body))  # streaming from its file now
        assert first == body[: len(first)] and len(first) < len(body)
        assert len(open_cache_files(directory)) == 1
        await response.release()
        assert open_cache_files(directory) == []
    finally:
        await runner.cleanup()


async def test_a_fetch_cancelled_at_shutdown_leaves_no_spill_file(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    async def stalling(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"ETag": '"s"', "Content-Type": "application/json"})
        out.enable_chunked_encoding()
        await out.prepare(request)
        await out.write(b"x" * (2 * 1024 * 1024))  # over SPILL_AT: written to a file
        await asyncio.sleep(30)  # and then nothing more
        return out

    runner, upstream = await serve_handler(stalling)
    try:
        p = await make_proxy(proxy_settings(upstream, tmp_path))
        tmp = Path(ctx_of(p).store.directory) / "tmp"
        async with client.get(p.url + "/v1/slow") as r:
            await r.content.readexactly(1024 * 1024)
            for _ in range(100):  # until the flight has spilled to its file
                if open_cache_files(tmp, "body-*"):
                    break
                await asyncio.sleep(0.02)
            assert len(open_cache_files(tmp, "body-*")) == 1
            await ctx_of(p).cache.close()  # what shutdown does to running flights
        assert open_cache_files(tmp, "body-*") == []
        assert list(tmp.glob("body-*")) == []
    finally:
        await runner.cleanup()


async def test_a_purge_during_a_fetch_keeps_its_answer_out(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(cached(tmp_path, sandbox, rules=(CacheRule("/v1/*", fresh_for=600),)))
    sandbox.state.inject_latency(0.3, count=1)
    fetching = asyncio.ensure_future(get(client, p.url + LIST))
    await asyncio.sleep(0.1)
    await ctx_of(p).store.purge("/v1/companies/5001/", None)
    assert (await fetching)[1]["X-Cache"] == "MISS"
    # fetched before the purge finished: it may hold what the operator purged
    assert (await get(client, p.url + LIST))[1]["X-Cache"] == "MISS"
    assert sandbox.state.served() == 2


async def test_purge_and_stats(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    settings = cached(tmp_path, sandbox, rules=(CacheRule("/v1/*", fresh_for=600),))
    p = await make_proxy(settings)
    await get(client, p.url + LIST)
    await get(client, p.url + "/v1/companies/5001/products.json")
    store = ctx_of(p).store
    await store.flush()
    assert (await store.stats())["entries"] == 2
    assert await store.purge("/v1/companies/5001/products", None) == 1
    assert (await get(client, p.url + LIST))[1]["X-Cache"] == "HIT"
    assert await store.purge("", "someone-else") == 0
    assert (await get(client, p.url + LIST))[1]["X-Cache"] == "HIT"
    assert await store.purge("", None) == 1
    assert (await get(client, p.url + LIST))[1]["X-Cache"] == "MISS"


def test_cli_stats_and_purge(tmp_path: Any, capsys: Any) -> None:
    settings = proxy_settings("http://127.0.0.1:1", tmp_path)
    # no cache directory yet: refused, and none is created behind the operator's back
    assert run_cli(settings, "stats", "", None) == 2
    assert "no cache at" in capsys.readouterr().err
    assert not (tmp_path / "state" / "cache").exists()
    (tmp_path / "state" / "cache").mkdir(parents=True)
    assert run_cli(settings, "stats", "", None) == 0
    assert '"entries": 0' in capsys.readouterr().out
    assert run_cli(settings, "purge", "/v1/", "main") == 0
    assert '"purged": 0' in capsys.readouterr().out
