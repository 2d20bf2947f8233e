"""A 304's release of the fetch lock (and its note to the replicas waiting on it) reaches
Redis within the call that lets go (:meth:`RedisEntries.revalidated`), on a real
redis-server: the rest of the flight's step (the 304 merged, the entry freshened, the flight
settled) and the loop's next turn no longer come before it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.flight import Flight
from proxy.cache.records import digest
from proxy.messages import ProxyRequest
from tests.integration.test_redis_scripts import gone_within
from tests.integration.test_shared_lookups import KEY, PATH, Tier, tier
from tests.replicas import RedisSpace


@pytest.fixture
async def shared_tier(redis_space: RedisSpace, tmp_path: Path) -> AsyncIterator[Tier]:
    async for made in tier(redis_space, tmp_path):
        yield made


async def test_a_304s_release_is_in_redis_before_the_call_that_lets_go_returns(
    shared_tier: Tier,
) -> None:
    """Nothing of the loop turns between ``revalidated`` and the check (it blocks): the lock
    is gone from Redis all the same (its note, for the waiting replicas, goes in its script).
    Before, the release was a task whose first step came on a later turn: the lock was still
    held when the call returned (here: for the whole 0.5 s the check blocks)."""
    entries = shared_tier.entries
    warm = await entries.records.claim("main", "another key")  # connected, scripts loaded
    assert warm is not None and warm.owner is not None
    await entries.records.release("main", "another key", warm.owner, b"note")
    lock = f"{shared_tier.space.prefix}:cache:main:lock:{digest(KEY)}"
    request = ProxyRequest("GET", PATH, "", CIMultiDictProxy(CIMultiDict()), account="main")
    flight = Flight(KEY, request, entries.store.sequence)
    claim = await entries.records.claim("main", KEY)
    assert claim is not None and claim.owner is not None
    flight.claimed(claim.gen, claim.owner)
    now = time.time()
    sent = (("If-None-Match", '"v1"'),)
    entries.revalidated(flight, (sent, (("ETag", '"v1"'),), now, now))
    assert flight.owner is None  # let go of, once
    released = gone_within(shared_tier.space.url, lock, 0.5)  # blocking: no loop turn
    await asyncio.gather(*entries.flights.tasks)
    assert released
    assert shared_tier.backend.up
