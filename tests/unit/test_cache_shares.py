"""Each account's share of the local cache tiers (proxy.cache.shares), alone and in the store
on a real diskcache directory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prometheus_client import CollectorRegistry

from proxy.cache.memory import HotEntries, Stored
from proxy.cache.metrics import CacheMetrics
from proxy.cache.shares import Ledger
from proxy.cache.store import CacheStore
from tests.unit.test_cache_store import stored


def test_an_account_past_its_share_evicts_its_own_least_recently_used_keys_only() -> None:
    ledger = Ledger(1000, {"a": 1, "b": 1})  # 500 bytes each
    assert ledger.add("b1", "b", 300) == []
    assert [ledger.add(f"a{i}", "a", 200) for i in range(2)] == [[], []]
    ledger.touch("a0")  # used: the least recently used of a is now a1
    assert ledger.add("a2", "a", 200) == ["a1"]
    assert ledger.held == {"a": 400, "b": 300}
    assert ledger.status()["b"] == {"bytes": 300, "share": 500}
    assert ledger.add("a3", "a", 600) == ["a0", "a2", "a3"]  # alone past its share
    assert ledger.held == {"a": 0, "b": 300}
    ledger.remove("b1")
    ledger.remove("b1")  # twice: nothing more
    assert ledger.held == {"a": 0, "b": 0}


def test_weights_set_the_shares_and_one_account_is_inactive() -> None:
    ledger = Ledger(1200, {"big": 3, "small": 1})
    assert (ledger.limit("big"), ledger.limit("small"), ledger.limit("gone")) == (900, 300, 300)
    alone = Ledger(1000, {"only": 1})
    assert not alone.active
    assert alone.add("k", "only", 10**9) == []


async def test_the_disk_share_holds_across_a_restart_with_new_weights(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    store = await CacheStore.open(directory, 10**7, 0)
    for i in range(10):
        store.put(*stored(f"/v1/a/{i}", body=b"x" * 50_000, account="a"))
    store.put(*stored("/v1/b/0", body=b"x" * 50_000, account="b"))
    await store.flush()
    await store.close()
    # Reopened with two accounts and 200 KB of disk each: a keeps its newest few, b its one.
    registry = CollectorRegistry()
    store = await CacheStore.open(
        directory, 400_000, 0, CacheMetrics(registry), shares={"a": 1, "b": 1}
    )
    try:
        await store.counting.done.wait()  # what the disk held, counted after start-up
        kept_a = [i for i in range(10) if await store.get(stored(f"/v1/a/{i}", account="a")[0])]
        assert 1 <= len(kept_a) <= 4, kept_a
        assert await store.get(stored("/v1/b/0", account="b")[0]) is not None
        for i in range(5):
            store.put(*stored(f"/v1/a/new{i}", body=b"x" * 50_000, account="a"))
        await store.flush()
        assert await store.get(stored("/v1/b/0", account="b")[0]) is not None
        evicted = registry.get_sample_value("kounta_proxy_cache_evictions_total")
        assert evicted is not None and evicted >= 5
        assert store.ledger.held["a"] <= store.ledger.limit("a")
    finally:
        await store.close()


class Gone:
    """Pickled into the cache, then removed: its record can no longer be read."""


async def test_a_corrupt_record_does_not_stop_the_shares_being_counted_at_open(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "cache"
    store = await CacheStore.open(directory, 10**7, 0)
    key, good = stored("/v1/a/0", account="a")
    store.put(key, good)
    await store.flush()
    global Gone
    await store._run(store.disk.set, stored("/v1/a/1", account="a")[0], Gone())
    await store.close()
    saved, Gone = Gone, None  # type: ignore[misc]
    try:
        reopened = await CacheStore.open(directory, 10**7, 0, shares={"a": 1, "b": 1})
    finally:
        Gone = saved
    try:
        await reopened.counting.done.wait()
        assert await reopened.get(key) is not None
        assert reopened.ledger.held["a"] > 0
    finally:
        await reopened.close()


def test_a_freshened_entry_replaced_in_memory_leaves_what_pop_and_put_would() -> None:
    """A 304 puts the same body back with new headers once per flight (issue 21): the memory
    tier replaces it in place; its order, bytes, paths and the account's ledger end as a
    pop and a put would leave them, and a body of another size still goes the long way."""
    mine, theirs = (HotEntries(10**5, Ledger(20_000, {"main": 1, "other": 1})) for _ in range(2))
    keys = []
    for i, account in enumerate(("main", "other", "main", "main")):
        key, value = stored(f"/v1/companies/1/x/{i}", b"x" * 300, account)
        keys.append(key)
        for tier in (mine, theirs):
            tier.put(key, value)
    for key, body in ((keys[0], b"y" * 300), (keys[1], b"z" * 300), (keys[2], b"w" * 900)):
        old = mine.items[key]
        fresh = Stored(replace(old.entry, response_time=5.0), body)
        mine.put(key, fresh)
        theirs.pop(key)
        theirs.put(key, fresh)
        assert mine.items[key] is fresh
    assert list(mine.items) == list(theirs.items) == [keys[3], keys[0], keys[1], keys[2]]
    assert mine.bytes == theirs.bytes
    assert mine.paths == theirs.paths
    assert mine.ledger.held == theirs.ledger.held
    assert {a: list(k) for a, k in mine.ledger.keys.items()} == {
        a: list(k) for a, k in theirs.ledger.keys.items()
    }
