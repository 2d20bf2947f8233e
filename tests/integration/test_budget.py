"""The rate budget, retries, breaker and error language against the sandbox.

The sandbox's 60-second rate window is compressed by running its clock fast
(``SPEED`` times real time); the proxy's budget gets the same compressed window
(``budget.window``), so a limit that would take minutes to exercise takes a second.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.edge.services import SERVICES
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.ops.admin import create_admin_app
from proxy.sandbox import SandboxConfig
from proxy.settings import (
    AccountSettings,
    BudgetSettings,
    CacheRule,
    CacheSettings,
    CallerSettings,
    PagingSettings,
    RetrySettings,
    Secret,
    Settings,
)
from tests.conftest import TOKEN, MakeProxy, Proxy, Sandbox, proxy_settings, serve

WINDOW = 0.5  # real seconds standing for Kounta's minute
SPEED = 60.0 / WINDOW
LIMIT = 60  # requests per (compressed) minute, in the sandbox and the proxy alike
CUSTOMERS = "/v1/companies/5001/customers"


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(
        bearer_tokens=(TOKEN,), rate_per_minute_bearer=LIMIT, rate_per_minute_basic=LIMIT
    )


@pytest.fixture
def fast_sandbox(sandbox: Sandbox) -> Sandbox:
    sandbox.state.clock = lambda: time.time() * SPEED
    return sandbox


def customer_ids(sandbox: Sandbox) -> list[int]:
    return sorted(sandbox.state.store["customers"].records)


def caller_key(i: int) -> str:
    return f"caller-key-{i:02d}-0123456789"


def budget_settings(
    upstream: str,
    tmp_path: Any,
    *,
    rate: int = LIMIT,
    burst: int = 0,
    callers: int = 10,
    **sections: Any,
) -> Settings:
    account = AccountSettings(mode="static", token=Secret(TOKEN), rate_per_minute=rate, burst=burst)
    return proxy_settings(
        upstream,
        tmp_path,
        accounts={"main": account},
        callers={
            f"caller{i}": CallerSettings(key=Secret(caller_key(i)), account="main")
            for i in range(callers)
        },
        budget=sections.pop(
            "budget", BudgetSettings(window=WINDOW, window_margin=0.1, backoff_initial=0.2)
        ),
        **sections,
    )


async def fetch(
    client: aiohttp.ClientSession, url: str, caller: int = 0, **kw: Any
) -> tuple[int, Any, Any]:
    headers = {"X-Proxy-Key": caller_key(caller), **kw.pop("headers", {})}
    async with client.request(kw.pop("method", "GET"), url, headers=headers, **kw) as r:
        return r.status, await r.json(content_type=None), r.headers


async def test_300_requests_from_10_callers_stay_under_the_limit(
    make_proxy: MakeProxy, fast_sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(budget_settings(fast_sandbox.url, tmp_path))
    ids = customer_ids(fast_sandbox)
    started = time.monotonic()

    async def one_caller(i: int) -> list[int]:
        statuses = []
        for n in range(30):
            url = f"{proxy.url}{CUSTOMERS}/{ids[i * 30 + n]}.json"
            status, _, _ = await fetch(client, url, caller=i)
            statuses.append(status)
        return statuses

    results = await asyncio.gather(*(one_caller(i) for i in range(10)))
    elapsed = time.monotonic() - started
    assert Counter(s for r in results for s in r) == {200: 300}
    assert 429 not in fast_sandbox.state.statuses()
    assert fast_sandbox.state.served("GET") == 300
    # The limit really was binding: 300 requests at 60 a (0.5 s) window need 4+ windows.
    assert elapsed >= 4 * WINDOW


async def test_a_busy_caller_does_not_starve_the_others(
    make_proxy: MakeProxy, fast_sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    # A quarter of the limit: the busy queue lasts over a second, so the light callers'
    # arrival is not a race with its draining on a loaded machine.
    rate = LIMIT // 4
    proxy = await make_proxy(budget_settings(fast_sandbox.url, tmp_path, rate=rate, burst=1))
    ids = customer_ids(fast_sandbox)
    done: dict[str, list[float]] = {"busy": [], "light": []}
    started = time.monotonic()

    async def one(kind: str, caller: int, n: int) -> None:
        url = f"{proxy.url}{CUSTOMERS}/{ids[n]}.json"
        status, _, _ = await fetch(client, url, caller=caller)
        assert status == 200
        done[kind].append(time.monotonic() - started)

    busy = [asyncio.create_task(one("busy", 0, n)) for n in range(1, 41)]
    await queued(proxy, 20)  # the busy caller's requests are queued first
    await asyncio.gather(*(one("light", i, 100 + i) for i in range(1, 4)), *busy)
    busy_times = sorted(done["busy"])
    # Round robin: each light caller is served within the next few tokens, long before
    # the busy caller's queue has drained.
    assert max(done["light"]) < busy_times[len(busy_times) // 3], (done["light"], busy_times)


async def test_forced_upstream_429_pauses_and_recovers(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(budget_settings(sandbox.url, tmp_path, rate=100_000))
    sandbox.state.inject_status(429, b"Limit exceeded", count=1)
    started = time.monotonic()
    status, body, _ = await fetch(client, f"{proxy.url}{CUSTOMERS}/{customer_ids(sandbox)[0]}.json")
    assert status == 200, body
    assert time.monotonic() - started >= 0.2  # the backoff (no Retry-After was given)
    assert sandbox.state.statuses() == {429: 1, 200: 1}

    # A POST meeting a 429 is answered 429 JSON and never resent.
    sandbox.state.inject_status(429, b"Limit exceeded", count=1, headers={"Retry-After": "3"})
    status, body, headers = await fetch(
        client, f"{proxy.url}{CUSTOMERS}.json", method="POST", json={"first_name": "A"}
    )
    assert status == 429
    assert body["error"] == "rate_limited"
    assert body["retry_after"] == 3 and headers["Retry-After"] == "3"
    assert sandbox.state.served("POST") == 1

    ctx = proxy.app[SERVICES]
    assert ctx.budget is not None
    main = ctx.budget.accounts["main"]
    assert main.upstream_429s == 2
    assert main.paused_for() > 2  # the whole account waits out Kounta's Retry-After
    sample = proxy.registry.get_sample_value
    assert sample("kounta_proxy_budget_upstream_429_total", {"account": "main"}) == 2
    assert sample("kounta_proxy_budget_paused_seconds", {"account": "main"}) > 2
    assert sample("kounta_proxy_budget_tokens", {"account": "main"}) == 0
    assert sample("kounta_proxy_budget_queue_length", {"account": "main"}) == 0
    assert (
        sample("kounta_proxy_budget_wait_seconds_count", {"account": "main", "class": "standard"})
        == 3
    )


async def test_a_get_the_budget_cannot_send_in_time_is_answered_stale(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    cache = CacheSettings(rules=(CacheRule(path="/v1/*", fresh_for=0, stale_if_error=300),))
    proxy = await make_proxy(budget_settings(sandbox.url, tmp_path, rate=100_000, cache=cache))
    stored, other = (f"{proxy.url}{CUSTOMERS}/{n}.json" for n in customer_ids(sandbox)[:2])
    status, first, _ = await fetch(client, stored)
    assert status == 200
    # Kounta asks for a 100 s pause, cut to budget.backoff_max (60 s): nothing can be sent
    # within any request's wait now.
    sandbox.state.inject_status(429, b"Limit exceeded", headers={"Retry-After": "100"})
    status, body, headers = await fetch(client, other)
    assert (status, body["error"], headers["Retry-After"]) == (429, "rate_limited", "60")
    assert headers["X-Proxy-Error"] == "1"
    status, again, headers = await fetch(client, stored)
    assert (status, again) == (200, first)  # the stored copy, instead of a 429
    assert sandbox.state.served("GET") == 2


async def test_a_post_is_never_sent_twice(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(budget_settings(sandbox.url, tmp_path, rate=100_000))
    url = f"{proxy.url}{CUSTOMERS}.json"
    sandbox.state.inject_drop(count=1, path_prefix=CUSTOMERS)
    # Kounta may have created the record: the caller learns of a failure, nothing is resent.
    try:
        status, body, _ = await fetch(client, url, method="POST", json={"first_name": "Dropped"})
    except aiohttp.ClientPayloadError:
        pass  # the proxy broke off the streamed answer
    else:
        assert (status, body["error"]) == (502, "upstream_truncated")
    for status in (502, 503, 504):
        sandbox.state.inject_status(status, b"<h1>down</h1>", "text/html", path_prefix=CUSTOMERS)
        got, body, headers = await fetch(client, url, method="POST", json={"first_name": "X"})
        assert got == status and body["error_description"] == "down"
        assert "X-Proxy-Error" not in headers  # Kounta's answer, passed on normalised
    assert sandbox.state.served("POST") == 4


async def test_idempotent_requests_are_retried_on_503(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    settings = budget_settings(
        sandbox.url, tmp_path, rate=100_000, retry=RetrySettings(backoff_initial=0.01)
    )
    proxy = await make_proxy(settings)
    sandbox.state.inject_status(503, count=2)
    status, _, _ = await fetch(client, f"{proxy.url}{CUSTOMERS}/{customer_ids(sandbox)[0]}.json")
    assert status == 200
    assert sandbox.state.served("GET") == 3


async def test_breaker_opens_fails_fast_probes_and_closes(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    retry = RetrySettings(attempts=1, breaker_failures=2, breaker_cooldown=0.3)
    proxy = await make_proxy(budget_settings(sandbox.url, tmp_path, rate=100_000, retry=retry))
    admin_runner, admin_port = await serve(create_admin_app(proxy.app[SERVICES]))
    status_url = f"http://127.0.0.1:{admin_port}/budget"
    try:
        sandbox.state.inject_status(502, count=2)
        url = f"{proxy.url}{CUSTOMERS}/{customer_ids(sandbox)[0]}.json"
        assert [(await fetch(client, url))[0] for _ in range(2)] == [502, 502]
        status, body, headers = await fetch(client, url)
        assert (status, body["error"], headers["X-Proxy-Error"]) == (503, "circuit_open", "1")
        assert int(headers["Retry-After"]) >= 1
        assert sandbox.state.served("GET") == 2  # failing fast sent nothing
        async with client.get(status_url) as r:
            report = (await r.json())["accounts"]["main"]
        # Kounta answered (502): the route's breaker opened, not the whole account's.
        assert report["route_breakers"]["/v1/companies/{id}/customers/{id}"]["state"] == "open"
        assert report["breaker"]["state"] == "closed"
        await asyncio.sleep(0.35)
        assert (await fetch(client, url))[0] == 200  # the probe
        async with client.get(status_url) as r:
            report = (await r.json())["accounts"]["main"]
        assert report["breaker"] == {"state": "closed", "consecutive_failures": 0, "open_for": 0.0}
        assert report["route_breakers"] == {}
        assert report["rate"] == 100_000
    finally:
        await admin_runner.cleanup()


BODIES: list[tuple[bytes, str]] = [
    (b"", "text/plain"),
    (b"Limit exceeded", "text/plain"),
    (b"<html><body><h1>Broken</h1>\x00\xff</body></html>", "text/html"),
    (b'{"errors": ["bad"]}', "application/json"),
    (b'{"error": "custom_code", "error_description": "Said so", "extra": 1}', "application/json"),
]


async def test_every_error_status_arrives_normalised(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    retry = RetrySettings(attempts=1, breaker_failures=0)
    proxy = await make_proxy(budget_settings(sandbox.url, tmp_path, rate=100_000, retry=retry))
    statuses = [s for s in range(400, 600) if s != 429]  # 429: see the test above
    for status in statuses:
        body, ctype = BODIES[status % len(BODIES)]
        sandbox.state.inject_status(status, body, ctype, count=1)
        got, data, headers = await fetch(
            client, f"{proxy.url}{CUSTOMERS}/{customer_ids(sandbox)[0]}.json"
        )
        assert got == status
        assert headers["Content-Type"] == "application/json; charset=utf-8"
        assert headers["Cache-Control"] == "no-store"
        assert isinstance(data["error"], str) and data["error"]
        assert isinstance(data["error_description"], str) and data["error_description"]
        assert "X-Proxy-Error" not in headers
        if ctype == "application/json":
            assert data.get("upstream_body") == {"errors": ["bad"]} or data["extra"] == 1
        if status == 401:
            assert headers["WWW-Authenticate"].startswith("Bearer error=")
    assert sandbox.state.served("GET") == len(statuses)


async def test_all_pages_as_one_array(
    make_proxy: MakeProxy, fast_sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(budget_settings(fast_sandbox.url, tmp_path, rate=10 * LIMIT))
    async with client.get(
        f"{proxy.url}{CUSTOMERS}.json",
        headers={"X-Proxy-Key": caller_key(0), "X-Proxy-All-Pages": "1"},
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        records = json.loads(await r.read())
    ids = [record["id"] for record in records]
    assert len(ids) == len(set(ids)) == 1000
    assert fast_sandbox.state.served("GET") == 40  # 25 a page, each through the budget
    assert 429 not in fast_sandbox.state.statuses()


async def test_all_pages_past_the_cap_is_an_error(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    settings = budget_settings(
        sandbox.url, tmp_path, rate=100_000, paging=PagingSettings(max_pages=10)
    )
    proxy = await make_proxy(settings)
    headers = {"X-Proxy-All-Pages": "1"}
    status, body, h = await fetch(client, f"{proxy.url}{CUSTOMERS}.json", headers=headers)
    assert (status, body["error"], h["X-Proxy-Error"]) == (422, "too_many_pages", "1")
    assert "40 pages" in body["error_description"]
    assert sandbox.state.served("GET") == 1
    bad = {"X-Proxy-All-Pages": "all"}
    assert (await fetch(client, f"{proxy.url}{CUSTOMERS}.json", headers=bad))[0] == 400
    status, body, _ = await fetch(
        client, f"{proxy.url}{CUSTOMERS}.json", method="POST", headers=headers, json={}
    )
    assert (status, body["error"]) == (400, "invalid_request")
    assert sandbox.state.served("POST") == 0


class EndlessList:
    """An upstream whose list never ends and never says how long it is."""

    def __init__(self, base: str, next_url: Callable[[int], str]) -> None:
        self.base = base
        self.next_url = next_url
        self.sent = 0

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        self.sent += 1
        page = int(request.query.partition("=")[2] or 0)
        headers = CIMultiDict(
            {"Content-Type": "application/json", "X-Next-Page": self.next_url(page)}
        )
        return ProxyResponse(status=200, headers=headers, body=json.dumps([{"id": page}]).encode())


@pytest.mark.parametrize("where", ["endless", "elsewhere"])
async def test_all_pages_breaks_off_rather_than_cut_silently(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession, where: str
) -> None:
    base = "http://127.0.0.1:9"
    if where == "endless":
        upstream = EndlessList(base, lambda n: f"{base}{CUSTOMERS}.json?page={n + 1}")
    else:
        upstream = EndlessList(base, lambda n: f"http://evil.example{CUSTOMERS}.json?page=1")
    settings = budget_settings(base, tmp_path, rate=100_000, paging=PagingSettings(max_pages=5))
    proxy: Proxy = await make_proxy(settings, upstream=upstream)
    async with client.get(
        f"{proxy.url}{CUSTOMERS}.json",
        headers={"X-Proxy-Key": caller_key(0), "X-Proxy-All-Pages": "1"},
    ) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert upstream.sent == (5 if where == "endless" else 1)


async def test_a_request_whose_turn_comes_too_late_hears_429_at_once(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    """30 concurrent uncached GETs at 90 a minute (burst 4), a 1 s limit: about 19 fit; the
    rest are told at once, with the time their turn would have come, not after 1 s."""
    budget = BudgetSettings(window=6.0, window_margin=0.1, max_wait=1.0)
    proxy = await make_proxy(budget_settings(sandbox.url, tmp_path, rate=90, budget=budget))
    ids = customer_ids(sandbox)
    # 30 connections opened first (answered without the budget: an unknown key), so the clock
    # below counts the budget's answers, not a loaded machine's connection set-up.
    warm = await asyncio.gather(
        *(fetch(client, f"{proxy.url}{CUSTOMERS}/{ids[0]}.json", 99) for _ in range(30))
    )
    assert {status for status, _, _ in warm} == {401}
    started = time.monotonic()

    async def one(n: int) -> tuple[int, float, str | None]:
        status, _, headers = await fetch(client, f"{proxy.url}{CUSTOMERS}/{ids[n]}.json", n % 10)
        return status, time.monotonic() - started, headers.get("Retry-After")

    results = await asyncio.gather(*(one(n) for n in range(30)))
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(served) + len(refused) == 30
    assert 15 <= len(served) <= 22, results
    # Refused at once, not after waiting out max_wait (1 s): on an idle machine within 0.1 s;
    # 0.9 leaves room for a loaded one, and every refusal comes before the last request that
    # was served.
    assert max(t for _, t, _ in refused) < 0.9, refused
    assert max(t for _, t, _ in refused) < max(t for _, t, _ in served), results
    # Retry-After: when the turn would have come (1-2 s at 14.75 a second), not 0, not 10.
    assert {int(r or 0) for _, _, r in refused} <= {1, 2, 3}
    assert all(t < 1.3 for _, t, _ in served)
    sample = proxy.registry.get_sample_value
    rejected = sample(
        "kounta_proxy_budget_rejections_total", {"account": "main", "reason": "deadline"}
    )
    assert rejected == len(refused)


async def queued(proxy: Proxy, at_least: int, account: str = "main") -> None:
    """Wait (5 s at most) until ``at_least`` requests wait in the account's budget queue: a
    loaded machine may take longer than a fixed sleep to send them all."""
    budget = proxy.app[SERVICES].budget
    assert budget is not None
    for _ in range(500):
        if budget.accounts[account].waiting >= at_least:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {at_least} requests queued")
