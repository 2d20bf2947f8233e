"""Budget classes fleet-wide: three replicas (three backends, each its own replica id) on a
real redis-server share one account's slots by class."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import MonotonicClock
from proxy.errors import RateLimited
from proxy.pipeline.bucket import Rate
from proxy.pipeline.budget import AccountBudget
from proxy.pipeline.gates import SharedGate
from proxy.pipeline.metrics import PipelineMetrics
from proxy.settings import BudgetSettings
from proxy.shared import RedisBackend
from proxy.shared.base import ClassedAsk
from tests.replicas import RedisSpace

RATE = Rate(per_window=20, burst=1, window=2.0, margin=0.1)  # a slot every 0.105 s
FAR = 60.0


@pytest.fixture
async def backends(redis_space: RedisSpace) -> AsyncIterator[list[RedisBackend]]:
    async with (
        redis_space.backend() as a,
        redis_space.backend() as b,
        redis_space.backend() as c,
    ):
        yield [a, b, c]


def replica(backend: RedisBackend, rate: Rate = RATE, **settings: float) -> AccountBudget:
    clock = MonotonicClock()
    gate = SharedGate("main", rate, backend, backend, 3, clock.now(), 60.0)
    options = {"max_wait": FAR, **settings}
    return AccountBudget(
        "main",
        rate,
        BudgetSettings(**options),
        clock,
        PipelineMetrics(CollectorRegistry()),
        gate,  # type: ignore[arg-type]
    )


async def test_a_replica_with_interactive_requests_gets_the_interactive_share(
    backends: list[RedisBackend],
) -> None:
    """Two replicas with deep batch queues, one with a deep interactive queue: the slots go
    6 : 1 by class across the fleet (replica-blind, each would get a third)."""
    budgets = [replica(b) for b in backends]
    served: Counter[str] = Counter()
    deadline = time.monotonic() + FAR

    async def one(budget: AccountBudget, klass: str) -> None:
        await budget.acquire(klass, budget.clock.now() + FAR, klass)
        if time.monotonic() < deadline:
            served[klass] += 1

    tasks = [
        asyncio.create_task(one(budgets[i], "batch" if i < 2 else "interactive"))
        for i in range(3)
        for _ in range(40)
    ]
    await asyncio.sleep(3.5)  # about 33 slots
    deadline = 0.0
    assert sum(served.values()) >= 20, served
    assert served["interactive"] >= 0.7 * sum(served.values()), served
    assert served["batch"] >= 1, served  # weight 1: not starved
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for budget in budgets:
        await budget.close()


async def test_a_dead_replicas_demand_expires(backends: list[RedisBackend]) -> None:
    dead, alive = backends[0], backends[1]
    weights = (6.0, 3.0, 1.0)
    # A replica registers five interactive requests, takes one slot, and is never heard again.
    taken = await dead.take_classed(
        "main", 20, 1, 2.1, ClassedAsk("interactive", (5, 0, 0), 0.0, weights, 0.5)
    )
    assert taken.wait == 0.0 and taken.fleet == (4, 0, 0)
    batch = ClassedAsk("batch", (0, 0, 1), 0.0, weights, 0.5)
    await asyncio.sleep(0.2)  # a slot is free again, but it is interactive's
    refused = await alive.take_classed("main", 20, 1, 2.1, batch)
    assert refused.wait > 0 and refused.fleet == (4, 0, 1)
    await asyncio.sleep(0.5)  # the dead replica's demand has expired
    later = await alive.take_classed("main", 20, 1, 2.1, batch)
    assert later.wait == 0.0 and later.fleet[0] == 0


async def test_the_429_at_once_counts_the_fleets_queue(backends: list[RedisBackend]) -> None:
    """Replica A holds a deep batch queue; replica B's own queue is empty. A batch request on B
    whose turn behind the fleet's queue comes after its limit is refused at once; an
    interactive one with the same limit goes ahead of the batch queue and is served."""
    a, b = replica(backends[0]), replica(backends[1])
    waiting = [
        asyncio.create_task(a.acquire("sync", a.clock.now() + FAR, "batch")) for _ in range(15)
    ]
    await asyncio.sleep(0.3)  # A's dispatcher has told Redis about its queue
    started = time.monotonic()
    with pytest.raises(RateLimited):
        await b.acquire("export", b.clock.now() + 0.6, "batch")
    assert time.monotonic() - started < 0.3  # at once, not at its limit
    assert await b.acquire("till", b.clock.now() + 0.6, "interactive") < 0.6
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await a.close()
    await b.close()


async def test_the_expected_wait_counts_the_fleets_queue(backends: list[RedisBackend]) -> None:
    """Stale-while-busy's estimate: replica B's own queue is empty and it has taken nothing,
    but it reads the fleet's state (one read, kept for a short time): a batch request on B
    expects to wait behind A's batch queue, an interactive one does not. The plain estimate
    (no round trip) counts the fleet as the last read or take said."""
    a, b = replica(backends[0]), replica(backends[1])
    waiting = [
        asyncio.create_task(a.acquire("sync", a.clock.now() + FAR, "batch")) for _ in range(15)
    ]
    await asyncio.sleep(0.3)  # A's dispatcher has told Redis about its queue
    assert await b.estimate("export", "batch") > 1.0  # behind ~14 batch slots of 0.105 s
    assert b.gate.fleet[2] >= 10  # type: ignore[attr-defined]
    assert await b.estimate("till", "interactive") < 0.25
    await b.acquire("till", b.clock.now() + 0.6, "interactive")  # ahead of A's batch queue
    assert b.expected_wait("export", "batch") > 1.0
    assert b.expected_wait("till", "interactive") < 0.25
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await a.close()
    await b.close()


async def test_a_replica_asks_for_the_class_the_fleet_serves_when_its_own_order_differs(
    backends: list[RedisBackend],
) -> None:
    """The replica's own discipline puts its batch request first, the fleet's (Redis) its
    standard one: the replica asks for the class the fleet serves instead of asking for batch
    until the standard request's limit passes (and leaving the slots unused meanwhile)."""
    a = replica(backends[0])
    await a.acquire("warm", a.clock.now() + FAR, "standard")  # the burst's one token
    a.starts["standard"] = 50.0  # this replica's own order: batch before standard
    batch = asyncio.create_task(a.acquire("sync", a.clock.now() + FAR, "batch"))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    await a.acquire("till", a.clock.now() + 2.0, "standard")
    assert time.monotonic() - started < 1.0
    assert await batch < 2.0
    await a.close()


async def test_a_class_joining_a_replicas_queue_reaches_the_fleet_before_the_next_slot(
    backends: list[RedisBackend],
) -> None:
    """Replica A's dispatcher sleeps until the next slot (a second off) for its batch request;
    an interactive request joins A's queue. The fleet hears of it at once (the first of its
    class wakes the dispatcher), not when that sleep ends: meanwhile another replica's later
    request, or batch, would get the slot that is interactive's."""
    slow = Rate(per_window=4, burst=1, window=4.0, margin=0.0)  # a slot a second
    a = replica(backends[0], slow)
    await a.acquire("warm", a.clock.now() + FAR, "standard")  # the burst's one token
    batch = asyncio.create_task(a.acquire("sync", a.clock.now() + FAR, "batch"))
    await asyncio.sleep(0.05)  # queued; the dispatcher sleeps until the next slot
    till = asyncio.create_task(a.acquire("till", a.clock.now() + FAR, "interactive"))
    await asyncio.sleep(0.2)
    room = await backends[1].room("main", slow.per_window, slow.burst, slow.window)
    assert room.fleet[0] == 1, room
    assert await till < 1.2
    for task in (batch, till):
        task.cancel()
    await asyncio.gather(batch, till, return_exceptions=True)
    await a.close()


async def test_a_queue_asks_redis_again_as_soon_as_it_is_back(
    own_redis_space: RedisSpace,
) -> None:
    """Redis goes away while this replica's fallback share is spent (its Redis sends count in
    it), so a queued request's fallback turn is seconds off. Redis is back within a second:
    the request is served from the shared bucket then, not when the fallback's window frees
    (its dispatcher asks again at least once a second while degraded)."""
    rate = Rate(per_window=30, burst=30, window=6.0, margin=0.0)  # fallback: 10 per 6 s
    async with own_redis_space.backend(timeout=0.2) as backend:
        a = replica(backend, rate)
        for _ in range(10):  # through Redis; they fill the fallback's window too
            await a.acquire("warm", a.clock.now() + FAR, "standard")
        own_redis_space.server.stop()
        till = asyncio.create_task(a.acquire("till", a.clock.now() + FAR, "interactive"))
        await asyncio.sleep(0.3)
        assert a.gate.mode() == "degraded" and not till.done()
        own_redis_space.server.start()
        assert await till < 4.0  # the fallback's turn: about 6 s
        await a.close()


async def test_a_slot_goes_to_the_oldest_request_of_its_class_in_the_fleet(
    backends: list[RedisBackend],
) -> None:
    """Within a class the fleet is first come, first served: replica B's interactive request
    came 20 ms before replica A's (less than half a pacing interval). A asks first when the
    slot frees and is told to ask again shortly; B, asking next, gets the slot. (A margin of
    half an interval gave it to the younger request: the older one waited a whole slot more,
    the 3-replica interactive tail.)"""
    a, b, c = backends
    weights = (6.0, 3.0, 1.0)
    per_window, burst, period = RATE.per_window, RATE.burst, RATE.window + RATE.margin

    def ask(age: float) -> ClassedAsk:
        return ClassedAsk("interactive", (1, 0, 0), 0.0, weights, 2.0, (age, 0.0, 0.0))

    warm = ClassedAsk("standard", (0, 1, 0), 0.0, weights, 2.0)
    assert (await c.take_classed("main", per_window, burst, period, warm)).wait == 0.0
    started = time.monotonic()
    told = await b.take_classed("main", per_window, burst, period, ask(0.0))
    assert told.wait > 0.05  # the next slot is a pace off; B's request is registered
    await asyncio.sleep(told.wait + 0.01)
    younger = await a.take_classed(
        "main", per_window, burst, period, ask(time.monotonic() - started - 0.02)
    )
    assert younger.wait > 0 and younger.fleet[0] == 2, younger
    older = await b.take_classed("main", per_window, burst, period, ask(time.monotonic() - started))
    assert older.wait == 0.0, older


async def test_a_slot_refunded_with_none_waiting_here_goes_back_to_the_fleet(
    backends: list[RedisBackend],
) -> None:
    """Replica A takes a slot for a background refresh and does not use it (refund) while
    nothing waits on A: the slot goes back to the fleet, and replica B's next request has it
    at once, once. (Kept as A's credit for a pacing interval, it lapsed: B waited for the
    next slot, a second here, and the fleet sent one request fewer that window.)"""
    slow = Rate(per_window=4, burst=1, window=4.0, margin=0.0)  # a slot a second
    a, b = replica(backends[0], slow), replica(backends[1], slow)
    assert await a.acquire("refresh", a.clock.now() + FAR, "batch") == 0.0  # the burst's one
    given = a.refund()
    if given is not None:  # None: kept as A's own credit
        assert await given
    started = time.monotonic()
    await b.acquire("till", b.clock.now() + FAR, "interactive")
    assert time.monotonic() - started < 0.5
    assert await b.acquire("till", b.clock.now() + FAR, "interactive") > 0.5  # given once
    await a.close()
    await b.close()


async def test_requests_that_leave_unserved_stop_holding_the_fleets_slots(
    backends: list[RedisBackend],
) -> None:
    """Replica A's interactive request leaves before its slot (its caller went away): A's
    demand entry goes once nothing waits there, and replica B's batch request gets the next
    slot. (The entry stood until it expired, four pacing intervals here: the fleet kept the
    slots for interactive requests no one was asking for, and B waited seconds.)"""
    slow = Rate(per_window=4, burst=1, window=4.0, margin=0.0)  # a slot a second
    a, b = replica(backends[0], slow), replica(backends[1], slow)
    await a.acquire("warm", a.clock.now() + FAR, "standard")  # the burst's one token
    till = asyncio.create_task(a.acquire("till", a.clock.now() + FAR, "interactive"))
    await asyncio.sleep(0.1)  # A's dispatcher has told Redis of it
    till.cancel()
    await asyncio.gather(till, return_exceptions=True)
    assert await b.acquire("sync", b.clock.now() + FAR, "batch") < 1.5  # the next slot: ~0.9 s
    await a.close()
    await b.close()


async def test_batch_leaves_the_headroom_fleet_wide_and_is_owed_its_turn(
    backends: list[RedisBackend],
) -> None:
    """Burst 4, headroom 2 (``budget.headroom``), in the one script: replica A's batch walk
    takes two slots at once and then waits while B's interactive requests find the other two
    at hand. With B asking at every slot (more than the rate), a slot the weights give batch
    goes to B at once while the headroom holds batch back (not "ask again": it would stay
    unused), until the others are four batch turns ahead: then batch is owed and takes it.
    (Weights 6 : 3 : 3, so a batch turn is two interactive tokens: a short test.)"""
    a, b = backends[0], backends[1]
    w, args = (6.0, 3.0, 3.0), ("main", 20, 4, 2.1)  # a slot every 0.105 s

    def ask(klass: str, waiting: tuple[int, int, int]) -> ClassedAsk:
        return ClassedAsk(klass, waiting, 0.0, w, 2.0, headroom=2)

    assert [(await a.take_classed(*args, ask("batch", (0, 0, 9)))).wait for _ in range(2)] == [0, 0]
    assert (await a.take_classed(*args, ask("batch", (0, 0, 9)))).wait > 0  # the headroom
    assert [
        (await b.take_classed(*args, ask("interactive", (9, 0, 0)))).wait for _ in range(2)
    ] == [0, 0]
    order = ""
    end = time.monotonic() + 3.5
    while time.monotonic() < end:
        mine = await b.take_classed(*args, ask("interactive", (9, 0, 0)))
        if mine.wait == 0:
            order += "I"
            continue
        theirs = await a.take_classed(*args, ask("batch", (0, 0, 9)))
        if theirs.wait == 0:
            order += "B"
            continue
        await asyncio.sleep(min(mine.wait, theirs.wait))
    # Slots 3 to 10 of B's (after the two of its share) went to B while batch waited, not
    # left unused; then batch was owed its turn, and 2 : 1 went on. About 33 slots in all.
    assert order.count("B") >= 4 and order.index("B") >= 6, order
    assert order.count("I") >= 0.6 * len(order) and len(order) >= 20, order
