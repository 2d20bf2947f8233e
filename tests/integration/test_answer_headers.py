"""What an answer tells the caller and the access log: RFC 9211 Cache-Status, who the
proxy took the caller for, Allow on 405, request ids and real byte counts."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from proxy.settings import CacheRule, CacheSettings, CallerSettings, Secret
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings

KEY = "answer-headers-caller-key-01"
CUSTOMERS = "/v1/companies/5001/customers"


@pytest.fixture
async def keyed(make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any) -> Proxy:
    rules = (CacheRule(path="/v1/*", fresh_for=60, stale_if_error=300),)
    settings = proxy_settings(
        sandbox.url,
        tmp_path,
        callers={"billing": CallerSettings(key=Secret(KEY), account="main")},
        cache=CacheSettings(rules=rules),
    )
    return await make_proxy(settings)


async def call(
    client: aiohttp.ClientSession, method: str, url: str, **headers: str
) -> tuple[int, Any, bytes]:
    sent = {"X-Proxy-Key": KEY, **{k.replace("_", "-"): v for k, v in headers.items()}}
    async with client.request(method, url, headers=sent) as r:
        return r.status, r.headers, await r.read()


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]


async def test_cache_status_follows_rfc_9211_on_both_paths(
    keyed: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    ids = sorted(sandbox.state.store["customers"].records)
    url = f"{keyed.url}{CUSTOMERS}/{ids[0]}.json"
    expected = [
        ({}, "MISS", "kounta-proxy; fwd=uri-miss; fwd-status=200"),
        ({}, "HIT", "kounta-proxy; hit"),  # the fast path
        ({"Cache_Control": "max-age=0"}, "REVALIDATED", "kounta-proxy; fwd=stale; fwd-status=304"),
    ]
    for headers, x_cache, cache_status in expected:
        status, got, _ = await call(client, "GET", url, **headers)
        assert (status, got["X-Cache"], got["Cache-Status"]) == (200, x_cache, cache_status)
        assert got["X-Proxy-Caller"] == "billing; account=main"
    sandbox.state.inject_status(503, b"down", count=5)
    status, got, _ = await call(client, "GET", url, Cache_Control="max-age=0")
    assert (status, got["X-Cache"]) == (200, "STALE")
    assert got["Cache-Status"] == "kounta-proxy; fwd=stale; fwd-status=503; detail=upstream_503"
    assert got["Warning"] == '111 - "Revalidation Failed"'
    sandbox.state.clear_faults()
    status, got, _ = await call(
        client, "POST", f"{keyed.url}{CUSTOMERS}.json", Content_Type="application/json"
    )
    assert got["Cache-Status"].startswith("kounta-proxy; fwd=bypass; fwd-status=")
    assert got["Cache-Status"].endswith(str(status))


async def test_405_names_the_allowed_methods_and_unknown_callers_get_no_caller_header(
    keyed: Proxy, client: aiohttp.ClientSession
) -> None:
    status, got, body = await call(client, "PROPFIND", f"{keyed.url}{CUSTOMERS}.json")
    assert status == 405
    assert got["Allow"] == "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
    assert b"method_not_allowed" in body
    async with client.get(f"{keyed.url}{CUSTOMERS}.json", headers={"X-Proxy-Key": "nope"}) as r:
        assert r.status == 401
        assert "X-Proxy-Caller" not in r.headers


async def test_access_log_has_client_agent_and_real_bytes(
    keyed: Proxy, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    agent = "billing-service/2.1"
    status, got, body = await call(
        client,
        "GET",
        f"{keyed.url}{CUSTOMERS}.json",
        X_Proxy_All_Pages="true",
        X_Request_ID="all-pages-request-1",
        User_Agent=agent,
    )
    assert status == 200 and body.startswith(b"[")
    assert got["X-Request-ID"] == "all-pages-request-1"
    assert got["X-Proxy-Caller"] == "billing; account=main"
    status, _, refused = await call(client, "PROPFIND", f"{keyed.url}/v1/x.json", User_Agent=agent)
    assert status == 405
    pages, error = access_lines(caplog)[-2:]
    assert (pages["request_id"], pages["bytes"], pages["status"]) == (
        "all-pages-request-1",
        len(body),
        200,
    )
    assert (error["bytes"], error["status"]) == (len(refused), 405)
    for line in (pages, error):
        assert (line["client"], line["user_agent"]) == ("127.0.0.1", agent)
