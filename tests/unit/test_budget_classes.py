"""Budget classes in the account's queue, on a clock that moves only when the test says."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.errors import RateLimited
from proxy.pipeline.bucket import Bucket, Rate
from proxy.pipeline.budget import AccountBudget
from proxy.pipeline.gates import LocalGate
from proxy.pipeline.metrics import PipelineMetrics
from proxy.settings import BudgetSettings, ClassWeights, ConfigError, load

FAR = 1e9  # a limit no test reaches


class ManualClock:
    """Monotonic time that moves only in :meth:`advance`; sleepers wake when their time comes."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.t + max(0.0, seconds), future))
        await future

    async def advance(self, seconds: float) -> None:
        target = self.t + seconds
        while True:
            await settle()
            due = [s for s in self.sleepers if s[0] <= target and not s[1].done()]
            if not due:
                break
            at, future = min(due, key=lambda s: s[0])
            self.t = max(self.t, at)
            future.set_result(None)
        self.t = target
        self.sleepers = [s for s in self.sleepers if not s[1].done()]
        await settle()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def budget(
    clock: ManualClock,
    per_window: int = 60,
    burst: int = 1,
    shares: dict[str, float] | None = None,
    **settings: object,
) -> AccountBudget:
    rate = Rate(per_window, burst, 60.0, 0.0)  # one token a second
    options: dict[str, object] = {"max_wait": FAR, "queue_size": 10_000, **settings}
    return AccountBudget(
        "main",
        rate,
        BudgetSettings(**options),  # type: ignore[arg-type]
        clock,
        PipelineMetrics(CollectorRegistry()),
        shares=lambda caller: (shares or {}).get(caller, 1.0),
    )


class Served:
    """Starts requests and notes the order they get their tokens in."""

    def __init__(self, account: AccountBudget) -> None:
        self.account = account
        self.order: list[str] = []
        self.waits: dict[str, list[float]] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, caller: str, klass: str, n: int = 1) -> None:
        for _ in range(n):
            self.tasks.append(asyncio.create_task(self._one(caller, klass)))

    async def _one(self, caller: str, klass: str) -> None:
        waited = await self.account.acquire(caller, FAR, klass)
        self.order.append(klass)
        self.waits.setdefault(klass, []).append(waited)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.account.close()


async def test_an_interactive_request_goes_before_a_queued_batch_walk() -> None:
    clock = ManualClock()
    served = Served(budget(clock))
    served.start("sync", "batch", 10)  # the first takes the token, nine wait
    await settle()
    served.start("till", "interactive")
    await settle()
    await clock.advance(1.0)
    assert served.order == ["batch", "interactive"]
    assert served.waits["interactive"] == [pytest.approx(1.0)]
    await served.close()


@pytest.mark.no_cover  # a simulated minute of tokens: coverage's tracing would triple the time
async def test_competing_classes_share_tokens_by_weight() -> None:
    clock = ManualClock()
    served = Served(budget(clock))
    served.start("warm", "standard")  # takes the one token at hand
    await settle()
    for klass in ("batch", "standard", "interactive"):
        served.start(klass, klass, 60)
    await settle()
    served.order.clear()
    await clock.advance(20.0)
    assert Counter(served.order) == {"interactive": 12, "standard": 6, "batch": 2}
    await served.close()


async def test_a_lone_batch_job_gets_the_whole_rate() -> None:
    clock = ManualClock()
    served = Served(budget(clock))
    served.start("sync", "batch", 10)
    await clock.advance(9.0)
    assert served.order == ["batch"] * 10
    await served.close()


@pytest.mark.parametrize(("reserve", "batch_now", "interactive_wait"), [(0.2, 8, 0.0), (0, 10, 1)])
async def test_the_reserve_keeps_tokens_for_interactive(
    reserve: float, batch_now: int, interactive_wait: float
) -> None:
    """Burst 10, reserve 0.2 (no headroom): a batch walk takes 8 tokens at once and leaves 2,
    so a till arriving right after finds one at hand (without the reserve it waits for the
    refill)."""
    clock = ManualClock()
    served = Served(budget(clock, burst=10, reserve=reserve, headroom=0))
    served.start("sync", "batch", 20)
    await settle()
    assert served.order == ["batch"] * batch_now
    served.start("till", "interactive")
    await clock.advance(1.0)
    assert served.waits["interactive"] == [pytest.approx(interactive_wait)]
    await served.close()


def test_batch_never_takes_the_reserved_part_of_the_window() -> None:
    """Rate 10 a window, burst 10, reserve 0.2: batch sends 8 in a window; the rest of the
    window (2) is left for the other classes."""
    bucket = Bucket(Rate(10, 10, 60.0, 0.0), now=0.0)
    now = 0.0
    for _ in range(8):
        now = bucket.ready_at(now, 0.2)
        bucket.take(now)
    assert now < 60
    assert bucket.ready_at(now, 0.2) >= 60.0  # the window's cap for batch
    assert bucket.ready_at(now) < 60.0  # the others still have room


async def test_max_share_lets_the_other_callers_of_the_class_through() -> None:
    clock = ManualClock()
    served = Served(budget(clock, shares={"big": 0.5}))
    order: list[str] = []

    async def one(caller: str) -> None:
        await served.account.acquire(caller, FAR, "batch")
        order.append(caller)

    tasks = [asyncio.create_task(one("big")) for _ in range(20)]
    await clock.advance(9.0)  # "big" alone: ten tokens
    tasks += [asyncio.create_task(one("small")) for _ in range(3)]
    await settle()
    order.clear()
    await clock.advance(4.0)
    assert order == ["small", "small", "small", "big"]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await served.close()


async def test_a_deep_batch_queue_refuses_a_batch_request_but_not_an_interactive_one() -> None:
    """The 429-at-once decision counts the requests served before this one: for an
    interactive request the batch queue is (nearly) not ahead of it."""
    clock = ManualClock()
    account = budget(clock, max_wait=5.0)
    served = Served(account)
    served.start("sync", "batch", 5)
    await settle()
    with pytest.raises(Exception, match="leaves no room"):
        await account.acquire("sync", clock.now() + 3.0, "batch")
    served.start("till", "interactive")
    await clock.advance(1.0)
    assert served.order[-1] == "interactive"
    await served.close()


def test_weights_and_priorities_are_checked(tmp_path: object) -> None:
    assert BudgetSettings().weights == ClassWeights(6.0, 3.0, 1.0)
    with pytest.raises(ConfigError, match=r"budget\.weights\.batch\): must not be negative"):
        load(env={"KOUNTA_PROXY_BUDGET__WEIGHTS__BATCH": "-1"})
    with pytest.raises(ConfigError, match=r"budget\.weights\.interactive\): at least one"):
        load(
            env={
                "KOUNTA_PROXY_BUDGET__WEIGHTS__INTERACTIVE": "0",
                "KOUNTA_PROXY_BUDGET__WEIGHTS__STANDARD": "0",
                "KOUNTA_PROXY_BUDGET__WEIGHTS__BATCH": "0",
            }
        )
    with pytest.raises(ConfigError, match=r"budget\.reserve\): must be at least 0 and below 1"):
        load(env={"KOUNTA_PROXY_BUDGET__RESERVE": "1"})
    key = "KOUNTA_PROXY_CALLERS__TILL__KEY"
    with pytest.raises(ConfigError, match=r"callers\.till\.priority\): must be one of"):
        load(env={key: "k" * 20, "KOUNTA_PROXY_CALLERS__TILL__PRIORITY": "urgent"})
    with pytest.raises(ConfigError, match=r"callers\.till\.max_share\): must be above 0"):
        load(env={key: "k" * 20, "KOUNTA_PROXY_CALLERS__TILL__MAX_SHARE": "1.5"})


async def test_the_expected_wait_counts_the_queue_the_class_would_meet() -> None:
    """What stale-while-busy asks: no token taken, the discipline's order counted."""
    clock = ManualClock()
    account = budget(clock)
    assert account.expected_wait("till", "interactive") == 0.0  # a token at hand
    served = Served(account)
    served.start("sync", "batch", 6)  # the first takes the token, five wait
    await settle()
    assert account.expected_wait("till", "interactive") == pytest.approx(1.0)
    assert account.expected_wait("other", "batch") == pytest.approx(2.0)  # round robin
    assert account.expected_wait("sync", "batch") == pytest.approx(6.0)  # behind its own five
    assert account.waiting == 5 and served.order == ["batch"]  # nothing taken by asking
    await served.close()


async def test_a_background_request_no_longer_wanted_is_dropped_and_its_turn_passes_on() -> None:
    clock = ManualClock()
    account = budget(clock)
    served = Served(account)
    served.start("warm", "standard")  # takes the one token at hand
    await settle()
    useful = [True]
    background = asyncio.create_task(
        account.acquire("cache-refresh", FAR, "batch", lambda: useful[0])
    )
    served.start("sync", "batch")
    await settle()
    useful[0] = False  # e.g. the entry was replaced meanwhile
    await clock.advance(1.0)
    with pytest.raises(RateLimited):
        await background
    assert served.order == ["standard", "batch"]  # the walker had the token at 1 s
    assert account.rejected == 0  # nobody heard a refusal: not counted as one
    assert account.stats.refused["batch"] == 0
    await served.close()


async def test_a_background_request_that_cannot_be_served_in_time_is_dropped_uncounted() -> None:
    clock = ManualClock()
    account = budget(clock)
    served = Served(account)
    served.start("sync", "batch", 5)
    await settle()
    with pytest.raises(RateLimited):
        await account.acquire("cache-refresh", clock.now() + 2.0, "batch", lambda: True)
    assert account.rejected == 0
    with pytest.raises(RateLimited):  # a caller's request is refused and counted
        await account.acquire("till", clock.now() + 2.0, "batch")
    assert account.rejected == 1
    await served.close()


async def test_a_refunded_token_goes_to_the_next_request_not_to_waste() -> None:
    """A background refresh took its token ahead and did not spend it: the next waiting
    request gets it at once; with none waiting, the next request within a pacing interval
    (the bucket untouched), and later none (it lapses)."""
    clock = ManualClock()
    account = budget(clock)  # a token a second, burst 1
    served = Served(account)
    served.start("sync", "batch", 2)  # the first takes the token, the second waits a second
    await settle()
    assert served.order == ["batch"]
    account.refund()
    await settle()
    assert served.order == ["batch", "batch"] and account.waiting == 0
    await clock.advance(2.0)  # the bucket's token is back
    account.refund()
    tokens = account.available()
    assert await account.acquire("till", clock.now() + FAR, "interactive") == 0.0
    assert account.available() == tokens  # the refunded token, not the bucket's
    account.refund()
    await clock.advance(1.5)  # past a pacing interval: lapsed
    assert await account.acquire("till", clock.now() + FAR, "interactive") == 0.0
    assert account.available() < tokens
    await served.close()


@pytest.mark.parametrize(
    ("settings", "klass", "batch_at_once", "at_hand"),
    [
        ({}, "interactive", 1, 3),  # the default: batch leaves three tokens of the burst
        ({}, "standard", 1, 3),  # for every class above batch
        ({"headroom": 0}, "interactive", 4, 0),
        ({"headroom": 2}, "interactive", 2, 2),
        ({"headroom": 1}, "interactive", 3, 1),
        ({"headroom": 3}, "interactive", 1, 3),
        ({"headroom": 9}, "interactive", 1, 3),  # at most all but one token of the burst
        ({"weights": ClassWeights(6.0, 3.0, 2.0), "headroom": 2}, "interactive", 2, 2),
    ],
)
async def test_batch_leaves_the_headroom_at_hand_for_the_other_classes(
    settings: dict[str, object], klass: str, batch_at_once: int, at_hand: int
) -> None:
    """Burst 4, a token a second: a batch walk takes the burst less the headroom at once and
    then keeps the bucket spent at that level; requests of a higher class arriving ten
    seconds later find the headroom's tokens at hand, and the next waits for the pace."""
    clock = ManualClock()
    served = Served(budget(clock, burst=4, **settings))
    served.start("sync", "batch", 40)
    await settle()
    assert served.order == ["batch"] * batch_at_once
    await clock.advance(10.0)
    assert "interactive" not in served.order and len(served.order) >= 7
    served.order.clear()
    served.start("till", klass, at_hand + 1)
    await settle()
    assert served.order == [klass] * at_hand
    await clock.advance(1.5)
    assert served.order[: at_hand + 1] == [klass] * (at_hand + 1)
    assert max(served.waits[klass]) > 0.5
    await served.close()


@pytest.mark.no_cover  # a simulated minute of tokens: coverage's tracing would triple the time
async def test_a_class_held_back_by_the_headroom_is_owed_a_turn_not_starved() -> None:
    """Interactive requests at every token (more than the rate) and a batch walk, headroom 3:
    the headroom holds batch back while interactive goes ahead, but only by four of batch's
    turns (24 interactive tokens at 6 : 1, after the six of its share); then batch is owed its
    turn and takes it from the headroom, and the weights' 6 : 1 goes on (without that rule
    batch got nothing)."""
    clock = ManualClock()
    served = Served(budget(clock, burst=4))
    served.start("sync", "batch", 40)
    await settle()
    served.start("till", "interactive", 80)
    served.order.clear()
    await clock.advance(60.0)
    letters = "".join(k[0].upper() for k in served.order)
    assert letters[:31] == "I" * 30 + "B"
    runs = letters[31:].split("B")[:4]  # the interactive tokens between batch's from then on
    assert all(run in ("I" * 5, "I" * 6) for run in runs), letters
    await served.close()


class HeldGate(LocalGate):
    """The local bucket, whose ``try_take`` can be held like a Redis round trip in flight."""

    def __init__(self, bucket: Bucket) -> None:
        super().__init__(bucket)
        self.hold: asyncio.Event | None = None
        self.asked = asyncio.Event()

    async def try_take(self, now: float, *hold: Any) -> float:  # class, reserve, headroom
        if self.hold is not None:
            self.asked.set()
            await self.hold.wait()
        return await super().try_take(now, *hold)


@pytest.mark.parametrize("joins_meanwhile", [True, False])
async def test_a_slot_taken_for_a_caller_that_left_meanwhile_goes_to_the_next(
    joins_meanwhile: bool,
) -> None:
    """The dispatcher asks the gate for a slot for caller a (a round trip on Redis); meanwhile
    a's request leaves (its caller went away), and b's joins before the answer or after it.
    The slot goes to b at once (the dispatcher died on a KeyError, and b waited for the next
    request to start a new one; or the slot was lost, and b waited for the next)."""
    clock = ManualClock()
    gate = HeldGate(Bucket(Rate(60, 1, 60.0, 0.0), clock.now()))
    account = AccountBudget(
        "main",
        gate.bucket.rate,
        BudgetSettings(max_wait=FAR, queue_size=100),
        clock,
        PipelineMetrics(CollectorRegistry()),
        gate,
    )
    assert await account.acquire("first", FAR) == 0.0  # the one token at hand
    leaving = asyncio.create_task(account.acquire("a", FAR))
    await settle()  # a waits; the dispatcher sleeps until the next token
    gate.hold = asyncio.Event()
    await clock.advance(1.0)
    await gate.asked.wait()  # the dispatcher asks for a's slot
    leaving.cancel()
    if joins_meanwhile:
        staying = asyncio.create_task(account.acquire("b", FAR))
        await settle()
    gate.hold.set()
    gate.hold = None
    await settle()
    if not joins_meanwhile:
        staying = asyncio.create_task(account.acquire("b", FAR))
        await settle()
    assert staying.done() and staying.result() == 0.0
    await account.close()
