"""How the proxy backs off a failing Kounta, over real sockets: a Retry-After is capped, and the
breakers count requests (not attempts) per route and account."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import aiohttp
import pytest

from proxy.edge.services import SERVICES
from proxy.ops.admin import create_admin_app
from proxy.settings import BudgetSettings, CacheSettings, RetrySettings
from tests.conftest import MakeProxy, Sandbox, proxy_settings, serve
from tests.integration.test_caching_rules import Origin, answer

CUSTOMERS = "/v1/companies/5001/customers.json"
PRODUCTS = "/v1/companies/5001/products.json"


async def status_of(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with client.get(url) as r:
        return r.status, json.loads(await r.read() or b"{}")


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize("asked", ["999999999", "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_a_huge_retry_after_pauses_the_account_only_up_to_the_cap(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    asked: str,
) -> None:
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    budget = BudgetSettings(backoff_initial=0.2, backoff_max=0.5)  # the cap: backoff_max
    p = await make_proxy(proxy_settings(sandbox.url, tmp_path, budget=budget))
    sandbox.state.inject_status(429, b"Limit exceeded", count=1, headers={"Retry-After": asked})
    started = time.monotonic()
    status, body = await status_of(client, p.url + CUSTOMERS)
    took = time.monotonic() - started
    # Paused for the cap, then sent again: one answer cannot stop the account for years.
    assert status == 200, body
    assert 0.5 <= took < 5
    assert sandbox.state.statuses() == {429: 1, 200: 1}
    [record] = [r for r in caplog.records if r.getMessage() == "upstream_rate_limited"]
    fields = record.fields  # type: ignore[attr-defined]
    assert (record.levelno, fields["capped"], fields["capped_at"], fields["pause"]) == (
        logging.WARNING,
        True,
        0.5,
        0.5,
    )
    assert fields["asked"] > 1e8


async def test_retry_after_max_sets_its_own_cap(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    budget = BudgetSettings(backoff_initial=0.1, backoff_max=60.0, retry_after_max=0.3, max_wait=2)
    p = await make_proxy(proxy_settings(sandbox.url, tmp_path, budget=budget))
    sandbox.state.inject_status(429, b"", count=1, headers={"Retry-After": "3600"})
    status, body = await status_of(client, p.url + CUSTOMERS)
    assert status == 200, body
    account = p.app[SERVICES].budget.accounts["main"]
    assert account.paused_for() == 0.0


# --------------------------------------------------------------------------- breakers


async def test_deliberate_5xx_on_one_path_do_not_open_the_breaker_for_every_path(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    retry = RetrySettings(attempts=3, backoff_initial=0.01, backoff_max=0.02, breaker_failures=3)
    p = await make_proxy(proxy_settings(sandbox.url, tmp_path, retry=retry))
    admin, admin_port = await serve(create_admin_app(p.app[SERVICES]))
    try:
        # As a caching test suite does: Kounta answers 503 on one path, on purpose.
        sandbox.state.inject_status(503, count=None, path_prefix=CUSTOMERS.removesuffix(".json"))
        for _ in range(2):
            assert (await status_of(client, p.url + CUSTOMERS))[0] == 503
        assert sandbox.state.served("GET", CUSTOMERS) == 6  # 2 requests, 3 attempts each
        status, body = await status_of(client, p.url + PRODUCTS)
        assert status == 200, body  # the other paths of the account are untouched
        assert (await status_of(client, p.url + CUSTOMERS))[0] == 503  # a third request...
        status, body = await status_of(client, p.url + CUSTOMERS)
        assert (status, body["error"]) == (503, "circuit_open")  # ...opens this route's breaker
        assert "/v1/companies/{id}/customers" in body["error_description"]
        assert sandbox.state.served("GET", CUSTOMERS) == 9
        assert (await status_of(client, p.url + PRODUCTS))[0] == 200
        _, report = await status_of(client, f"http://127.0.0.1:{admin_port}/budget")
        main = report["accounts"]["main"]
        assert main["breaker"]["state"] == "closed"
        assert main["route_breakers"]["/v1/companies/{id}/customers"]["state"] == "open"
        sample = p.registry.get_sample_value
        assert sample("kounta_proxy_breaker_routes_open", {"account": "main"}) == 1
        assert sample("kounta_proxy_breaker_state", {"account": "main", "state": "closed"}) == 1
    finally:
        await admin.cleanup()


async def test_500s_from_one_endpoint_never_open_a_breaker(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    retry = RetrySettings(attempts=3, breaker_failures=2)
    p = await make_proxy(proxy_settings(sandbox.url, tmp_path, retry=retry))
    sandbox.state.inject_status(500, b"boom", count=5, path_prefix=CUSTOMERS.removesuffix(".json"))
    statuses = [(await status_of(client, p.url + CUSTOMERS))[0] for _ in range(6)]
    assert statuses == [500] * 5 + [200]
    assert sandbox.state.served("GET", CUSTOMERS) == 6  # never resent, never failing fast


async def test_an_unreachable_kounta_opens_the_accounts_breaker_after_requests_not_attempts(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    origin = await Origin(lambda path: answer()).start()
    retry = RetrySettings(attempts=2, backoff_initial=0.01, backoff_max=0.02, breaker_failures=3)
    settings = proxy_settings(origin.url, tmp_path, retry=retry, cache=CacheSettings(enabled=False))
    p = await make_proxy(settings)
    await origin.stop()  # refused from now on
    for _ in range(3):  # 6 attempts, 3 requests: the third opens the breaker
        status, body = await status_of(client, p.url + CUSTOMERS)
        assert (status, body["error"]) == (502, "upstream_unreachable")
    status, body = await status_of(client, p.url + PRODUCTS)
    assert (status, body["error"]) == (503, "circuit_open")  # every path of the account
