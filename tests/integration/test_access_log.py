"""The access log line an operator acts on: the proxy's error code (and, for the log only, its
detail), the query string, budget wait, retries, who fetched for a coalesced request, and
upstream time whenever an upstream answer was used; debug events that trace one request."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.settings import (
    AccountSettings,
    BudgetSettings,
    RetrySettings,
    Secret,
)
from tests.conftest import TOKEN, MakeProxy, Sandbox, proxy_settings, serve_handler


def lines(caplog: pytest.LogCaptureFixture, name: str = "request") -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.getMessage() == name]  # type: ignore[attr-defined]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with client.get(url) as r:
        body = await r.read()
        return r.status, json.loads(body) if r.status >= 400 else {}


async def test_each_proxy_error_code_is_in_the_access_line_and_the_address_only_there(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, "kounta_proxy")
    down = f"http://127.0.0.1:{closed_port()}"
    settings = proxy_settings(
        down,
        tmp_path,
        retry=RetrySettings(attempts=1, breaker_failures=1, breaker_cooldown=60),
    )
    proxy = await make_proxy(settings)
    status, body = await get(client, f"{proxy.url}/v1/companies/me?fields=id")
    assert (status, body["error"]) == (502, "upstream_unreachable")
    # The caller hears the code and a generic description, never the upstream's address.
    assert "127.0.0.1" not in json.dumps(body) and "Connect call" not in json.dumps(body)
    status, body = await get(client, f"{proxy.url}/v1/companies/me")
    assert (status, body["error"]) == (503, "circuit_open")
    got = lines(caplog)
    assert [line["error"] for line in got[:2]] == ["upstream_unreachable", "circuit_open"]
    assert "127.0.0.1" in got[0]["error_detail"]  # the address is kept for the operator
    assert got[0]["query"] == "fields=id" and got[1]["query"] is None
    assert got[0]["retries"] == 0 and got[0]["budget_wait_ms"] >= 0


async def test_token_unavailable_code_is_in_the_access_line(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    caplog: Any,
) -> None:
    caplog.set_level(logging.INFO, "kounta_proxy")
    settings = proxy_settings(
        sandbox.url,
        tmp_path,
        accounts={
            "main": AccountSettings(
                mode="oauth",
                client_id="id",
                client_secret=Secret("cs-secret"),
                refresh_token=Secret("rt-secret"),
                token_url=f"http://127.0.0.1:{closed_port()}/token",
                token_wait=0.5,
                token_timeout=0.5,
            )
        },
    )
    proxy = await make_proxy(settings)
    status, body = await get(client, f"{proxy.url}/v1/companies/me")
    assert (status, body["error"]) == (503, "temporarily_unavailable")
    assert "127.0.0.1" not in json.dumps(body)
    (line,) = lines(caplog)
    assert line["error"] == "temporarily_unavailable"


async def test_budget_wait_and_retries_are_fields(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, "kounta_proxy")
    calls = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.Response(status=503, text="busy")
        return web.json_response({"n": calls})

    runner, url = await serve_handler(flaky)
    try:
        settings = proxy_settings(
            url,
            tmp_path,
            retry=RetrySettings(attempts=3, backoff_initial=0.01, backoff_max=0.01),
            # 60 a minute with a burst of 1: the second upstream request waits about 1 s.
            budget=BudgetSettings(window=60, window_margin=0),
            accounts={
                "main": AccountSettings(
                    mode="static", token=Secret(TOKEN), rate_per_minute=60, burst=1
                )
            },
        )
        proxy = await make_proxy(settings)
        status, _ = await get(client, f"{proxy.url}/v1/companies/me")
        assert status == 200
    finally:
        await runner.cleanup()
    (line,) = lines(caplog)
    assert line["retries"] == 1
    assert line["budget_wait_ms"] > 500  # the resend waited for its budget token
    assert line["error"] is None and line["upstream_status"] == 200


async def test_a_coalesced_request_names_the_fetcher_and_304_has_upstream_time(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, "kounta_proxy")
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            await gate.wait()
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.json_response({"v": 1}, headers={"ETag": '"v1"', "Cache-Control": "no-cache"})

    runner, url = await serve_handler(slow)
    try:
        proxy = await make_proxy(proxy_settings(url, tmp_path))
        target = f"{proxy.url}/v1/companies/me"
        async with client.get(target) as r:  # stored, with its ETag
            assert r.status == 200
        caplog.clear()

        async def fetch(rid: str) -> str:
            async with client.get(target, headers={"X-Request-ID": rid}) as r:
                await r.read()
                return r.headers["X-Cache"]

        first = asyncio.ensure_future(fetch("leader-1"))
        await asyncio.sleep(0.2)
        second = asyncio.ensure_future(fetch("follower-2"))
        await asyncio.sleep(0.2)
        gate.set()
        assert await asyncio.gather(first, second) == ["REVALIDATED", "REVALIDATED"]
    finally:
        await runner.cleanup()
    got = {line["request_id"]: line for line in lines(caplog)}
    leader, follower = got["leader-1"], got["follower-2"]
    assert leader["fetched_by"] is None and follower["fetched_by"] == "leader-1"
    for line in (leader, follower):
        assert line["upstream_status"] == 304
        assert line["upstream_ms"] is not None and line["upstream_ms"] > 100


async def test_debug_level_traces_one_request(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    caplog: Any,
) -> None:
    caplog.set_level(logging.DEBUG, "kounta_proxy")
    proxy = await make_proxy(proxy_settings(sandbox.url, tmp_path))
    async with client.get(
        f"{proxy.url}/v1/companies/me", headers={"X-Request-ID": "trace-me"}
    ) as r:
        assert r.status == 200
    mine = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.DEBUG and getattr(r, "fields", {}).get("request_id") == "trace-me"
    ]
    assert {"cache_lookup", "token_chosen", "budget_taken"} <= set(mine)
    lookup = next(
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "cache_lookup"
    )
    assert (lookup["result"], lookup["reason"]) == ("miss", "cold")


async def test_a_stale_answer_names_the_failure_it_stood_in_for(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, "kounta_proxy")

    async def once(request: web.Request) -> web.Response:
        return web.json_response({"v": 1}, headers={"ETag": '"v1"', "Cache-Control": "max-age=0"})

    runner, url = await serve_handler(once)
    settings = proxy_settings(url, tmp_path, retry=RetrySettings(attempts=1))
    proxy = await make_proxy(settings)
    async with client.get(f"{proxy.url}/v1/companies/me") as r:
        assert r.status == 200
    await runner.cleanup()  # Kounta goes away: the stored copy answers (cache.stale_if_error)
    async with client.get(f"{proxy.url}/v1/companies/me") as r:
        assert (r.status, r.headers["X-Cache"]) == (200, "STALE")
    line = lines(caplog)[-1]
    assert (line["status"], line["cache"], line["error"]) == (200, "STALE", "upstream_unreachable")
    assert str(URL(url).port) in line["error_detail"]
