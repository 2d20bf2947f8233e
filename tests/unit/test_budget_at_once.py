"""A free local budget's token taken without a coroutine (``AccountBudget.taken_at_once``):
what ``acquire`` does when nothing waits, the same tokens, counts and refusals."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.errors import RateLimited
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.pipeline.bucket import Rate
from proxy.pipeline.budget import AccountBudget, Budget
from proxy.pipeline.metrics import PipelineMetrics
from proxy.settings import AccountSettings, BudgetSettings, Secret, Settings
from tests.unit.test_budget import FakeClock


def account_budget(clock: FakeClock, burst: int, **settings: float) -> AccountBudget:
    rate = Rate(60, burst, 60.0, 0.0)
    metrics = PipelineMetrics(CollectorRegistry())
    return AccountBudget("main", rate, BudgetSettings(**settings), clock, metrics)


def counted(budget: AccountBudget, klass: str) -> tuple[float, int, float]:
    """The class's served count, wait observations and their sum."""
    metrics = budget.metrics
    waits = metrics.budget_wait.labels("main", klass)
    return (metrics.budget_served.labels("main", klass).value, sum(waits.counts), waits.sum)


class Answers:
    """The inner layer: a 200 for every request, its methods noted."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        self.sent += 1
        return ProxyResponse(status=200, headers=CIMultiDict(), body=b"[]")


def request(clock: FakeClock, priority: str = "standard") -> ProxyRequest:
    return ProxyRequest(
        method="GET",
        path="/v1/companies/5001/products.json",
        query="",
        headers=CIMultiDictProxy(CIMultiDict()),
        account="main",
        priority=priority,
        deadline=clock.now() + 60.0,
    )


def layer(inner: Answers, clock: FakeClock, burst: int = 2) -> Budget:
    settings = Settings(
        accounts={"main": AccountSettings(token=Secret("t"), rate_per_minute=60, burst=burst)},
        budget=BudgetSettings(max_wait=30.0),
    )
    return Budget(inner, settings, PipelineMetrics(CollectorRegistry()), clock)


async def test_a_free_local_budgets_send_takes_its_token_without_acquire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Main: every send awaited ``acquire`` (a coroutine per request)."""
    clock = FakeClock()
    inner = Answers()
    budget = layer(inner, clock, burst=2)
    account = budget.accounts["main"]

    async def refused(*args: object, **kwargs: object) -> float:
        raise AssertionError("acquire called with a token at hand")

    monkeypatch.setattr(account, "acquire", refused)
    for _ in range(2):
        assert (await budget.send(request(clock))).status == 200
    assert inner.sent == 2
    assert account.available() == 0.0
    assert counted(account, "standard") == (2.0, 2, 0.0)
    assert account.stats.count["standard"] == 2
    # The bucket empty: the third send waits its turn through acquire, as before.
    with pytest.raises(AssertionError, match="acquire called"):
        await budget.send(request(clock))


async def test_taken_at_once_takes_what_acquire_takes_at_once_and_nothing_else() -> None:
    """Over bucket states, classes and reserves: when ``taken_at_once`` says no, ``acquire``
    on the same state waits or refuses; when yes, ``acquire`` would have taken a token at
    once, leaving the bucket and the counts as it leaves them."""
    cases = itertools.product((0, 1, 2, 3), ("interactive", "standard", "batch"), (0.0, 0.5))
    for spent, klass, reserve in cases:
        states = []
        for way in ("at_once", "acquire"):
            clock = FakeClock()
            budget = account_budget(clock, burst=3, reserve=reserve, headroom=1, max_wait=30.0)
            for _ in range(spent):
                budget.bucket.take(clock.now())
            if way == "at_once":
                took = budget.taken_at_once(klass, None)
            else:
                try:
                    waited = await asyncio.wait_for(
                        budget.acquire("a", clock.now() + 0.5, klass), timeout=0.05
                    )
                    took = waited == 0.0
                except (RateLimited, TimeoutError):
                    took = False
            states.append(
                (took, budget.available(), counted(budget, klass), budget.stats.count[klass])
            )
            if budget._dispatcher is not None:
                budget._dispatcher.cancel()
        assert states[0] == states[1], (spent, klass, reserve, states)


async def test_taken_at_once_leaves_a_queue_and_a_background_request_to_acquire() -> None:
    clock = FakeClock()
    budget = account_budget(clock, burst=1, max_wait=30.0)
    budget.bucket.take(clock.now())
    queued = asyncio.create_task(budget.acquire("first", clock.now() + 20))
    await asyncio.sleep(0)
    assert budget.waiting == 1
    clock.t += 5.0  # tokens at hand again, but someone waits for one: not jumped
    assert not budget.taken_at_once("interactive", None)
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    # A background request: acquire asks whether it is still wanted.
    assert not budget.taken_at_once("standard", lambda: True)
    assert counted(budget, "standard")[0] == 0.0


async def test_a_refunded_token_is_taken_at_once_and_only_once() -> None:
    clock = FakeClock()
    budget = account_budget(clock, burst=1)
    budget.bucket.take(clock.now())
    budget.refund()
    assert budget.taken_at_once("standard", None)  # the credit, the bucket untouched
    assert not budget.taken_at_once("standard", None)
    assert counted(budget, "standard") == (1.0, 1, 0.0)
