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

from proxy.cache.entry import Entry
from proxy.cache.flight import Flight
from proxy.cache.memory import Stored
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


def _unlocks(tier: Tier, result: str) -> float:
    labels = {"op": "cache_unlock", "result": result}
    return tier.shared.get_sample_value("kounta_proxy_shared_calls_total", labels) or 0.0


async def _claimed_flight(tier: Tier) -> Flight:
    entries = tier.entries
    warm = await entries.records.claim("main", "another key")  # connected, scripts loaded
    assert warm is not None and warm.owner is not None
    await entries.records.release("main", "another key", warm.owner, b"note")
    request = ProxyRequest("GET", PATH, "", CIMultiDictProxy(CIMultiDict()), account="main")
    flight = Flight(KEY, request, entries.store.sequence)
    claim = await entries.records.claim("main", KEY)
    assert claim is not None and claim.owner is not None
    flight.claimed(claim.gen, claim.owner)
    return flight


async def test_a_304s_release_is_one_step_with_no_task_its_reply_counted(
    shared_tier: Tier,
) -> None:
    """The release is written within ``revalidated`` and nothing is left to run for it: no
    task (before: one per 304, in the flights' tasks, with a step of its own when the reply
    came); its reply is counted all the same once it comes (a callback on its future)."""
    entries = shared_tier.entries
    flight = await _claimed_flight(shared_tier)
    tasks, unlocked = asyncio.all_tasks(), _unlocks(shared_tier, "ok")
    now = time.time()
    entries.revalidated(flight, ((("If-None-Match", '"v1"'),), (("ETag", '"v1"'),), now, now))
    assert not entries.flights.tasks
    assert asyncio.all_tasks() == tasks
    lock = f"{shared_tier.space.prefix}:cache:main:lock:{digest(KEY)}"
    assert gone_within(shared_tier.space.url, lock, 0.5)
    for _ in range(200):  # the reply, read on a later turn of the loop
        if _unlocks(shared_tier, "ok") > unlocked:
            break
        await asyncio.sleep(0.005)
    assert _unlocks(shared_tier, "ok") == unlocked + 1
    assert _unlocks(shared_tier, "error") == 0


async def test_a_304s_release_with_the_store_away_is_counted_not_raised(
    shared_tier: Tier,
) -> None:
    """Redis away when the 304 comes: the release is counted as an error at once (the lock
    expires by itself), nothing raised into the flight's step, no task left."""
    entries = shared_tier.entries
    flight = await _claimed_flight(shared_tier)
    shared_tier.backend._set_state(False, "a test")
    labels = {"op": "unlock", "result": "error"}
    before = shared_tier.cache.get_sample_value("kounta_proxy_cache_shared_total", labels) or 0.0
    now = time.time()
    entries.revalidated(flight, ((("If-None-Match", '"v1"'),), (("ETag", '"v1"'),), now, now))
    assert flight.owner is None
    assert not entries.flights.tasks
    after = shared_tier.cache.get_sample_value("kounta_proxy_cache_shared_total", labels)
    assert after == before + 1


async def test_a_304_flight_settles_with_no_finish_task_one_with_an_entry_to_share_has_one(
    shared_tier: Tier,
) -> None:
    """A flight whose 304 let go of its lock already (or a waiter's, which holds none), with
    nothing to store in Redis, settles with no task of its own (before: a finish task per
    flight, whatever it had to do); one with an entry to share still stores it, in a task."""
    entries = shared_tier.entries
    flight = await _claimed_flight(shared_tier)
    now = time.time()
    entries.revalidated(flight, ((("If-None-Match", '"v1"'),), (("ETag", '"v1"'),), now, now))
    entries.flights.settle(flight, entries.finish)
    assert not entries.flights.tasks
    sharing = await _claimed_flight(shared_tier)
    entry = Entry(
        200, (("ETag", '"v2"'),), "main", PATH, now, now, 0.0, 3600.0, 0.0, 0.0, False, (), 4,
    )  # fmt: skip
    sharing.to_share(Stored(entry, b"body"))
    entries.flights.settle(sharing, entries.finish)
    assert len(entries.flights.tasks) == 1
    await asyncio.gather(*entries.flights.tasks)
    found = await entries.records.get("main", KEY)
    assert found is not None and found.body == b"body"
