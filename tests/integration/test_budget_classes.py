"""Budget classes through the real proxy and the sandbox (compressed window, as test_budget)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import aiohttp

from proxy.edge.services import SERVICES
from proxy.ops.admin import create_admin_app
from tests.conftest import MakeProxy, Sandbox, serve
from tests.integration.test_budget import (
    CUSTOMERS,
    LIMIT,
    budget_settings,
    caller_key,
    customer_ids,
    fast_sandbox,
    fetch,
    queued,
    sandbox_config,
)

__all__ = ["fast_sandbox", "sandbox_config"]  # the fixtures, shared with test_budget


async def test_an_unknown_priority_is_a_400_naming_the_header(
    make_proxy: MakeProxy, fast_sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(budget_settings(fast_sandbox.url, tmp_path))
    url = f"{proxy.url}{CUSTOMERS}.json"
    status, body, _ = await fetch(client, url, headers={"X-Proxy-Priority": "urgent"})
    assert status == 400
    assert body["error"] == "invalid_priority"
    assert "X-Proxy-Priority" in body["error_description"]
    assert fast_sandbox.state.served("GET") == 0
    for value in ("batch", "Interactive", " standard "):
        status, _, _ = await fetch(client, url, headers={"X-Proxy-Priority": value})
        assert status == 200, value


async def test_interactive_callers_go_before_a_batch_caller_queued_first(
    make_proxy: MakeProxy, fast_sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    settings = budget_settings(fast_sandbox.url, tmp_path, rate=LIMIT // 4, burst=1, callers=3)
    callers = dict(settings.callers)
    callers["caller1"] = replace(callers["caller1"], priority="interactive")
    proxy = await make_proxy(replace(settings, callers=callers))
    ids = customer_ids(fast_sandbox)
    done: dict[str, list[float]] = {"batch": [], "interactive": [], "lowered": []}
    started = time.monotonic()

    async def one(kind: str, caller: int, n: int, **headers: str) -> None:
        url = f"{proxy.url}{CUSTOMERS}/{ids[n]}.json"
        status, _, _ = await fetch(client, url, caller=caller, headers=headers)
        assert status == 200
        done[kind].append(time.monotonic() - started)

    # caller0 (standard) asks for batch on 30 requests; caller2 stays standard.
    batch = [
        asyncio.create_task(one("batch", 0, n, **{"X-Proxy-Priority": "batch"}))
        for n in range(1, 31)
    ]
    await queued(proxy, 15)  # the batch requests are queued first
    await asyncio.gather(
        *(one("interactive", 1, 100 + i) for i in range(3)),
        # An interactive caller may lower its own request: this one waits with the batch.
        one("lowered", 1, 200, **{"X-Proxy-Priority": "batch"}),
        *batch,
    )
    batch_times = sorted(done["batch"])
    assert max(done["interactive"]) < batch_times[6], (done, batch_times)
    # Lowered, it waits behind the interactive ones (round robin with caller0 in batch).
    assert done["lowered"][0] > max(done["interactive"]), done


async def test_budget_and_metrics_show_the_classes(
    make_proxy: MakeProxy, fast_sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    """An all-pages walk is batch, a plain read standard: GET /budget and the metrics say so
    per class, and every class's series exists (at 0) before any request of it."""
    proxy = await make_proxy(budget_settings(fast_sandbox.url, tmp_path, rate=100 * LIMIT))
    sample = proxy.registry.get_sample_value
    for klass in ("interactive", "standard", "batch"):
        labels = {"account": "main", "class": klass}
        assert sample("kounta_proxy_budget_served_total", labels) == 0
        assert sample("kounta_proxy_budget_refused_total", labels) == 0
        assert sample("kounta_proxy_budget_wait_seconds_count", labels) == 0
    async with client.get(
        f"{proxy.url}{CUSTOMERS}.json",
        headers={"X-Proxy-Key": caller_key(0), "X-Proxy-All-Pages": "1"},
    ) as r:
        assert r.status == 200
        await r.read()
    status, _, _ = await fetch(
        client, f"{proxy.url}{CUSTOMERS}/{customer_ids(fast_sandbox)[0]}.json"
    )
    assert status == 200
    pages = fast_sandbox.state.served("GET") - 1
    assert (
        sample("kounta_proxy_budget_served_total", {"account": "main", "class": "batch"}) == pages
    )
    assert sample("kounta_proxy_budget_served_total", {"account": "main", "class": "standard"}) == 1
    runner, port = await serve(create_admin_app(proxy.app[SERVICES]))
    try:
        async with client.get(f"http://127.0.0.1:{port}/budget") as r:
            classes = (await r.json())["accounts"]["main"]["classes"]
    finally:
        await runner.cleanup()
    assert classes["batch"]["served"] == pages and classes["standard"]["served"] == 1
    assert classes["interactive"] == {
        "weight": 6.0, "waiting": 0, "served": 0, "refused": 0,
        "wait_p50": 0.0, "wait_p99": 0.0, "share": 0.0,
    }  # fmt: skip
    assert classes["batch"]["share"] == round(pages / (pages + 1), 3)
    assert classes["batch"]["wait_p99"] >= classes["batch"]["wait_p50"] >= 0
