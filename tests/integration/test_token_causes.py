"""Why a token refresh failed: the cause is logged (rate-limited, never per attempt), counted by
kind, and never shows a secret; callers still hear only the code and a generic description."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.auth.endpoint import TokenRequestFailed, failure_kind
from proxy.logs import Throttle
from proxy.settings import AccountSettings, Secret
from tests.conftest import MakeProxy, Sandbox, proxy_settings, serve

REFRESH = "rt-very-secret-value"
CLIENT_SECRET = "cs-very-secret-value"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def oauth(token_url: str) -> AccountSettings:
    return AccountSettings(
        mode="oauth",
        client_id="id",
        client_secret=Secret(CLIENT_SECRET),
        refresh_token=Secret(REFRESH),
        token_url=token_url,
        token_wait=0.5,
        token_timeout=1.0,
    )


def failed_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "token_request_failed"
    ]


def failures(registry: Any, kind: str) -> float:
    value = registry.get_sample_value(
        "kounta_proxy_token_failures_total", {"account": "main", "kind": kind}
    )
    return float(value or 0.0)


async def test_refused_token_url_is_logged_once_with_its_cause_and_counted(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, "kounta_proxy")
    port = closed_port()
    settings = proxy_settings(
        sandbox.url, tmp_path, accounts={"main": oauth(f"http://127.0.0.1:{port}/token")}
    )
    proxy = await make_proxy(settings)
    assert failures(proxy.registry, "http_4xx") == 0  # every kind starts at 0
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(f"{proxy.url}/v1/companies/me") as r:
                body = await r.text()
                assert r.status == 503
                assert str(port) not in body and REFRESH not in body
            await _next_attempt(proxy)  # the background retries: one more token request
    logged = failed_lines(caplog)
    assert len(logged) == 1, logged  # rate-limited: not one line per attempt
    (line,) = logged
    assert line["cause"] == "connect" and line["error"] == "temporarily_unavailable"
    assert str(port) in line["detail"]  # the operator sees where it tried
    assert line["token_url"] == f"http://127.0.0.1:{port}/token"
    assert failures(proxy.registry, "connect") >= 2
    text = " ".join(json.dumps(getattr(r, "fields", {})) for r in caplog.records)
    assert REFRESH not in text and CLIENT_SECRET not in text


async def _next_attempt(proxy: Any) -> None:
    """Wait until the provider made one more token request (the background retries)."""
    before = failures(proxy.registry, "connect")
    for _ in range(100):
        if failures(proxy.registry, "connect") > before:
            return
        await asyncio.sleep(0.05)


@pytest.fixture
async def rejecting_endpoint() -> AsyncIterator[str]:
    """A token endpoint that answers 400 with Kounta's error and echoes what it was sent."""

    async def token(request: web.Request) -> web.Response:
        sent = await request.text()
        return web.json_response(
            {"error": "invalid_request", "error_description": f"bad request: {sent}"},
            status=400,
        )

    app = web.Application()
    app.router.add_post("/token", token)
    runner, port = await serve(app)
    yield f"http://127.0.0.1:{port}/token"
    await runner.cleanup()


async def test_a_4xx_with_kountas_error_is_the_cause_and_echoed_secrets_are_scrubbed(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    caplog: Any,
    rejecting_endpoint: str,
) -> None:
    caplog.set_level(logging.INFO, "kounta_proxy")
    settings = proxy_settings(sandbox.url, tmp_path, accounts={"main": oauth(rejecting_endpoint)})
    proxy = await make_proxy(settings)
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}/v1/x") as r:
        assert r.status >= 500
    (line, *_) = failed_lines(caplog)
    assert line["cause"] == "http_4xx" and line["status"] == 400
    assert "error='invalid_request'" in line["detail"]
    assert REFRESH not in line["detail"] and CLIENT_SECRET not in line["detail"]
    assert "****" in line["detail"]
    assert failures(proxy.registry, "http_4xx") >= 1


def test_failure_kinds_of_network_errors() -> None:
    key = aiohttp.client_reqrep.ConnectionKey("h", 443, True, True, None, None, None)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    dns = aiohttp.ClientConnectorError(key, socket.gaierror(-2, "Name or service not known"))
    assert failure_kind(refused) == "connect"
    assert failure_kind(dns) == "dns"
    assert failure_kind(TimeoutError()) == "timeout"
    assert failure_kind(aiohttp.ServerDisconnectedError()) == "reset"
    assert TokenRequestFailed("x", "tls", "d").kind == "tls"


def test_throttle_holds_back_and_counts_then_reports() -> None:
    now = [0.0]
    throttle = Throttle(60, clock=lambda: now[0])
    assert throttle.allow("a") == 0
    assert throttle.allow("a") is None and throttle.allow("a") is None
    assert throttle.allow("b") == 0  # another key is news
    now[0] = 61
    assert throttle.allow("a") == 2  # the two held back
    throttle.forget("a")
    assert throttle.allow("a") == 0
