"""The rate budget shared on a real Redis by three proxies in front of one sandbox.

The sandbox's window and the proxies' ``budget.window`` are both shortened to a few real
seconds (Redis keeps real time, so the clock cannot be sped up as tests/test_budget.py does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import MonotonicClock
from proxy.edge.services import SERVICES
from proxy.errors import RateLimited
from proxy.ops.admin import create_admin_app
from proxy.pipeline.bucket import Rate
from proxy.pipeline.budget import AccountBudget
from proxy.pipeline.gates import SharedGate
from proxy.pipeline.metrics import PipelineMetrics
from proxy.sandbox import SandboxConfig
from proxy.settings import BudgetSettings, CacheSettings, Settings
from proxy.shared import RedisBackend
from proxy.shared.base import ClassedAsk
from tests.conftest import TOKEN, Proxy, Sandbox, serve
from tests.integration.test_budget import budget_settings, fetch
from tests.replicas import RedisSpace, Replicas

WINDOW = 2.0  # real seconds standing for Kounta's minute
LIMIT = 30  # requests per window, in the sandbox and the proxies alike
ME = "/v1/companies/me.json"
RUN_SECONDS = 3.0


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(
        bearer_tokens=(TOKEN,),
        rate_per_minute_bearer=LIMIT,
        rate_per_minute_basic=LIMIT,
        rate_window=WINDOW,
    )


def shared_settings(sandbox: Sandbox, replicas: Replicas, **shared: Any) -> Settings:
    """One of three replicas sharing the budget on ``replicas``' space (``shared`` changes
    its ``[shared]`` section)."""
    return budget_settings(
        sandbox.url,
        replicas.tmp_path,
        rate=LIMIT,
        callers=20,
        cache=CacheSettings(enabled=False),  # every request goes upstream
        budget=BudgetSettings(window=WINDOW, window_margin=0.1, max_wait=1.0, backoff_initial=1),
        shared=replicas.space.settings(replicas=3, **shared),
    )


async def three(replicas: Replicas, settings: Settings) -> list[Proxy]:
    return await replicas.start(settings, settings, settings, listening=False)


async def hammer(
    proxies: list[Proxy], client: aiohttp.ClientSession, seconds: float
) -> Counter[int]:
    """20 callers, each as fast as answers come, spread over the replicas, for ``seconds``."""
    stop = time.monotonic() + seconds
    statuses: Counter[int] = Counter()

    async def caller(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            proxy = proxies[(i + n) % len(proxies)]
            status, _, _ = await fetch(client, proxy.url + ME, caller=i)
            statuses[status] += 1
            n += 1

    await asyncio.gather(*(caller(i) for i in range(20)))
    return statuses


def window_counts(sandbox: Sandbox) -> int:
    return sandbox.state.served("GET", ME)


async def test_three_replicas_stay_under_the_limit_together(
    replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession, steady_heap: None
) -> None:
    proxies = await three(replicas, shared_settings(sandbox, replicas))
    statuses = await hammer(proxies, client, RUN_SECONDS)
    # No window on the sandbox's side ever saw more than its limit: it never said 429.
    assert sandbox.state.limiter.refused == {}
    assert 429 not in sandbox.state.statuses()
    sent = window_counts(sandbox)
    # ... and the budget was used, not starved: about LIMIT per (window + margin).
    assert sent >= LIMIT * RUN_SECONDS / (WINDOW + 0.1) * 0.7
    assert sent <= LIMIT * (RUN_SECONDS / WINDOW + 1)
    # Callers were told to come back (429 JSON from the proxy), not left hanging.
    assert statuses[200] == sent and statuses[429] > 0
    assert set(statuses) <= {200, 429}
    for proxy in proxies:
        status = proxy.app[SERVICES].budget.account("main").status()
        assert status["mode"] == "shared"


async def test_three_local_replicas_overrun_the_limit(
    replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """The control: the same load through three unshared budgets collects Kounta's 429s."""
    settings = shared_settings(sandbox, replicas, backend="local", url="redis://127.0.0.1:1/0")
    proxies = await three(replicas, settings)
    # A whole window: three paces of about LIMIT / WINDOW each send about three times the
    # limit, enough to overrun it even on a loaded machine (half a window once was not).
    await hammer(proxies, client, WINDOW)
    assert sum(sandbox.state.limiter.refused.values()) > 0


async def test_a_429_seen_by_one_replica_pauses_all(
    replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    settings = shared_settings(sandbox, replicas)
    # Room to wait out a 1 s pause (the other tests answer 429 after 1 s).
    settings = dataclasses.replace(
        settings, budget=dataclasses.replace(settings.budget, max_wait=5.0)
    )
    proxies = await three(replicas, settings)
    sandbox.state.inject_status(429, count=1, headers={"Retry-After": "1"}, body=b"Limit exceeded")
    # A POST is never resent: replica A answers Kounta's 429 and shares the pause.
    status, body, _ = await fetch(client, proxies[0].url + ME, method="POST", json={})
    assert status == 429, body
    started = time.monotonic()
    status, _, _ = await fetch(client, proxies[1].url + ME, caller=1)
    assert status == 200
    assert time.monotonic() - started >= 0.8  # replica B waited out A's pause


async def test_redis_away_degrades_and_comes_back(
    own_replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    settings = shared_settings(sandbox, own_replicas, timeout=0.2)
    proxy = await own_replicas.make_proxy(settings)
    redis = own_replicas.space.server
    services = proxy.app[SERVICES]
    admin_runner, admin_port = await serve(create_admin_app(services))
    readyz = f"http://127.0.0.1:{admin_port}/readyz"
    try:
        assert (await fetch(client, proxy.url + ME))[0] == 200
        redis.stop()
        # Serving on the local fallback (rate / replicas), ready, with a detail saying so.
        statuses = Counter([(await fetch(client, proxy.url + ME, caller=i))[0] for i in range(5)])
        assert statuses[200] >= LIMIT // 3 // 20 + 1 and set(statuses) <= {200, 429}
        assert services.budget.account("main").status()["mode"] == "degraded"
        assert services.metric_groups.shared.shared_degraded._value.get() == 1
        async with client.get(readyz) as r:
            body = await r.json()
            assert r.status == 200, body
            assert body["details"] == {"shared": "degraded"}
        fallback = services.budget.account("main").bucket.rate.per_window
        assert fallback == LIMIT // 3
        # /budget and the gauge say what the replica may send now, and why.
        assert await effective(client, admin_port, proxy) == (LIMIT, LIMIT // 3, LIMIT // 3)
        redis.start()
        deadline = time.monotonic() + 5
        while services.metric_groups.shared.shared_backend_up._value.get() != 1:
            assert time.monotonic() < deadline, "did not return to the shared budget"
            await asyncio.sleep(0.1)
        assert (await fetch(client, proxy.url + ME, caller=7))[0] == 200
        assert services.budget.account("main").status()["mode"] == "shared"
        async with client.get(readyz) as r:
            assert (await r.json())["details"] == {}
        assert await effective(client, admin_port, proxy) == (LIMIT, LIMIT, LIMIT)
    finally:
        await admin_runner.cleanup()


async def effective(
    client: aiohttp.ClientSession, admin_port: int, proxy: Any
) -> tuple[int, int, float | None]:
    """/budget's configured and effective rate for "main", and the effective-rate gauge."""
    async with client.get(f"http://127.0.0.1:{admin_port}/budget") as r:
        main = (await r.json())["accounts"]["main"]
    why = main["effective_reason"]
    assert why and (main["effective_rate"] == main["rate"] or "replicas" in why), main
    gauge = proxy.registry.get_sample_value(
        "kounta_proxy_budget_effective_per_minute", {"account": "main"}
    )
    return main["rate"], main["effective_rate"], gauge


async def test_a_shared_pause_is_cut_to_retry_after_max(
    replicas: Replicas, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Kounta's ``Retry-After: 999999999`` reaches Redis as ``budget.retry_after_max``: one
    answer must not stop every replica for years."""
    settings = shared_settings(sandbox, replicas)
    budget = dataclasses.replace(settings.budget, max_wait=5.0, retry_after_max=1.0)
    proxies = await three(replicas, dataclasses.replace(settings, budget=budget))
    sandbox.state.inject_status(
        429, count=1, headers={"Retry-After": "999999999"}, body=b"Limit exceeded"
    )
    status, body, _ = await fetch(client, proxies[0].url + ME, method="POST", json={})
    assert status == 429, body
    assert body["error"] == "rate_limited" and "retry after 1s" in body["error_description"]
    started = time.monotonic()
    status, _, _ = await fetch(client, proxies[1].url + ME, caller=1)
    assert status == 200  # replica B waited out the capped pause, not 999999999 s
    assert 0.5 <= time.monotonic() - started < 3.0


@pytest.fixture
async def backend(redis_space: RedisSpace) -> AsyncIterator[RedisBackend]:
    async with redis_space.backend() as started:
        yield started


def gate_budget(backend: RedisBackend, rate: Rate, longest: float = 60.0) -> AccountBudget:
    clock = MonotonicClock()
    gate = SharedGate("main", rate, backend, backend, 1, clock.now(), longest)
    metrics = PipelineMetrics(CollectorRegistry())
    return AccountBudget("main", rate, BudgetSettings(), clock, metrics, gate)


async def test_a_pause_another_replica_set_is_read_back_capped(backend: RedisBackend) -> None:
    rate = Rate(per_window=60, burst=3, window=60.0, margin=1.0)
    # Another replica (a longer retry_after_max, or an older version) paused for 100 s.
    assert await backend.pause("main", 100.0, 60, 3, 61.0) > 99
    gate = gate_budget(backend, rate, longest=2.0).gate
    now = MonotonicClock().now()
    assert await gate.pause(now, 0.5) == 2.0
    assert gate.ready_at(now) <= now + 2.0


async def test_the_queue_ahead_counts_with_the_shared_gate(backend: RedisBackend) -> None:
    """A request whose turn (after the queue ahead of it) comes past its limit is refused at
    once, as with the local bucket; the shared turn is estimated from the account's pace."""
    rate = Rate(per_window=4, burst=1, window=2.0, margin=0.1)  # a slot every 0.525 s
    budget = gate_budget(backend, rate)
    now = budget.clock.now()
    assert await budget.acquire("a", now + 5) == 0.0  # the burst
    first = asyncio.create_task(budget.acquire("a", now + 5))  # queued for the next slot
    await asyncio.sleep(0.05)
    assert budget.waiting == 1
    started = time.monotonic()
    # Its turn comes after "a"'s: about 1.05 s away, past this limit of 0.8 s.
    with pytest.raises(RateLimited) as refused:
        await budget.acquire("b", budget.clock.now() + 0.8)
    assert time.monotonic() - started < 0.3  # told now, not at its limit
    assert refused.value.retry_after in (1, 2)  # about 1 s: whole seconds
    assert budget.status()["mode"] == "shared"
    assert await first > 0.3
    await budget.close()


@pytest.mark.parametrize("classed", [False, True])
async def test_a_shared_burst_is_paid_back_by_a_slower_pace_not_a_stall(
    backend: RedisBackend, classed: bool
) -> None:
    """As the local bucket (tests/unit/test_budget.py): under constant demand, the window
    after a burst brings no stall of ``burst`` intervals (0.5 s here), and no window holds
    more than the rate."""
    per_window, burst, period = 20, 10, 1.0  # a slot every 0.05 s
    ask = ClassedAsk("standard", (0, 1, 0), 0.0, (6.0, 3.0, 1.0), 2.0)
    sent: list[float] = []
    waits: list[float] = []  # what Redis said to wait, once the burst was spent
    stop = time.monotonic() + 2.5 * period
    while time.monotonic() < stop:
        if classed:
            wait = (await backend.take_classed("main", per_window, burst, period, ask)).wait
        else:
            wait = await backend.take("main", per_window, burst, period)
        if wait <= 0:
            sent.append(time.monotonic())
        else:
            if len(sent) >= burst:
                waits.append(wait)
            await asyncio.sleep(wait)
    # No stall was asked for: each wait about a pace (0.05 s), never the burst's 0.5 s. (The
    # waits the script said, not the gaps between sends: a loaded machine oversleeps.)
    assert len(sent) > 2 * burst and max(waits) < 0.3, (len(sent), max(waits))
    for i, t in enumerate(sent):
        assert sum(1 for s in sent[i:] if s < t + period - 0.01) <= per_window
