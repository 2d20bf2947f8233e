"""Spare budget on Redis (background work: the webhook verifier and refetch): the fleet's
view, the shared bucket's tokens and every replica's waiting requests, not this replica's
fallback bucket (which Redis' grants never empty). A real redis-server, two replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import MonotonicClock
from proxy.pipeline.bucket import Rate
from proxy.pipeline.gates import SharedGate
from proxy.settings import Secret, SharedSettings
from proxy.shared import RedisBackend
from proxy.shared.base import ClassedAsk
from proxy.shared.metrics import SharedMetrics
from tests.redis_server import TOKEN_KEY, RedisServer

RATE = Rate(per_window=40, burst=4, window=60.0, margin=1.0)  # slow refill: ~0.65/s


@pytest.fixture
async def two(redis_server: RedisServer, redis_prefix: str) -> AsyncIterator[list[RedisBackend]]:
    made = []
    for _ in range(2):
        settings = SharedSettings(
            backend="redis", url=redis_server.url, key_prefix=redis_prefix,
            token_key=Secret(TOKEN_KEY),
        )  # fmt: skip
        backend = RedisBackend(settings, SharedMetrics(CollectorRegistry()))
        await backend.start()
        made.append(backend)
    yield made
    for backend in made:
        await backend.close()


def gate(backend: RedisBackend) -> SharedGate:
    return SharedGate("main", RATE, backend, backend, 2, MonotonicClock().now(), 60.0)


async def test_spare_budget_is_the_fleets_tokens_not_the_local_fallback(
    two: list[RedisBackend],
) -> None:
    a, b = gate(two[0]), gate(two[1])
    now = MonotonicClock().now()
    assert await b.spare(now, 2.0)  # 4 tokens in Redis, nobody waiting
    for _ in range(3):  # replica a spends three of the four
        assert await a.try_take(now) == 0.0
    # b's own fallback bucket is full (Redis granted a's sends, not b's) ...
    assert b.bucket.available(now) >= 2
    # ... but the fleet has about one token left: no spare budget.
    assert not await b.spare(now, 2.0)
    room = await two[1].room("main", RATE.per_window, RATE.burst, b.period)
    assert 0.9 <= room.tokens < 2


async def test_a_request_waiting_on_another_replica_means_no_spare_budget(
    two: list[RedisBackend],
) -> None:
    b = gate(two[1])
    now = MonotonicClock().now()
    assert await b.spare(now, 2.0)
    # Replica a registers two interactive requests waiting (a batch ask held back by a
    # reserve that leaves it nothing: nothing is taken, the demand stands).
    ask = ClassedAsk("batch", (2, 0, 1), 0.99, (6.0, 3.0, 1.0), 5.0)
    taken = await two[0].take_classed("main", RATE.per_window, RATE.burst, b.period, ask)
    assert taken.wait > 0 and taken.fleet == (2, 0, 1)
    room = await two[1].room("main", RATE.per_window, RATE.burst, b.period)
    assert room.tokens >= 3 and room.fleet == (2, 0, 1)
    assert not await b.spare(now, 2.0)


async def test_without_redis_the_fallback_share_decides(unused_tcp_port: int) -> None:
    settings = SharedSettings(
        backend="redis", url=f"redis://127.0.0.1:{unused_tcp_port}", timeout=0.2,
        token_key=Secret(TOKEN_KEY),
    )  # fmt: skip
    away = RedisBackend(settings, SharedMetrics(CollectorRegistry()))
    await away.start()
    try:
        b = gate(away)
        assert b.mode() == "degraded"
        now = MonotonicClock().now()
        assert await b.spare(now, 2.0)  # the fallback share: burst 4 / 2 replicas = 2 tokens
        assert await b.try_take(now) == 0.0
        assert not await b.spare(now, 2.0)
    finally:
        await away.close()


async def test_the_room_says_when_the_next_slot_comes(two: list[RedisBackend]) -> None:
    """The read-only view names the next slot as a take would meet it: at hand, a pace
    interval off once the burst is spent, and the window's oldest send's end at the cap."""
    rate = Rate(per_window=3, burst=2, window=2.0, margin=0.0)  # a slot every 0.667 s
    a = SharedGate("main", rate, two[0], two[0], 2, MonotonicClock().now(), 60.0)
    assert (await two[1].room("main", 3, 2, a.period)).ready_in == 0.0
    now = MonotonicClock().now()
    for _ in range(2):
        assert await a.try_take(now) == 0.0
    paced = (await two[1].room("main", 3, 2, a.period)).ready_in
    assert 0.5 < paced <= 0.67
    # Read with a cap of two a window (and a large burst: no pace wait), the window is full:
    # the next slot comes when the first send leaves it.
    capped = await two[1].room("main", 2, 100, a.period)
    assert 1.5 < capped.ready_in <= 2.0
