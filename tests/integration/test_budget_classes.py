"""Budget classes through the real proxy and the sandbox (compressed window, as test_budget)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import aiohttp

from tests.conftest import MakeProxy, Sandbox
from tests.integration.test_budget import (
    CUSTOMERS,
    budget_settings,
    customer_ids,
    fast_sandbox,
    fetch,
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
    settings = budget_settings(fast_sandbox.url, tmp_path, burst=1, callers=3)
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
    await asyncio.sleep(0.05)
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
