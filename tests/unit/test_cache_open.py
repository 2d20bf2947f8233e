"""Opening the store over many entries: no key walked, no record read before it is ready;
each account's share counted afterwards, while purges and invalidations miss nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diskcache  # type: ignore[import-untyped]
import pytest

from proxy.cache import store as store_module
from proxy.cache.invalidation import Invalidation
from proxy.cache.memory import ENTRY_OVERHEAD
from proxy.cache.store import CacheStore
from proxy.compat.diskcache import PrivateDisk
from tests.unit.test_cache_store import stored

BODY = b"x" * 2000
SHARES = {"a": 1.0, "b": 1.0}


async def fill(directory: Path, count: int) -> None:
    store = await CacheStore.open(directory, 10**8, 0)
    for i in range(count):
        for account in SHARES:
            store.put(*stored(f"/v1/{account}/{i}", BODY, account=account))
    await store.close()


@pytest.fixture
def records_read(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every record diskcache unpickles from now on (the epoch and bodies are not pickles)."""
    read: list[Any] = []
    fetch = PrivateDisk.fetch

    def counted(self: PrivateDisk, mode: int, *args: Any) -> Any:
        value = fetch(self, mode, *args)
        if mode == diskcache.core.MODE_PICKLE:
            read.append(value)
        return value

    monkeypatch.setattr(PrivateDisk, "fetch", counted)
    return read


async def test_opening_walks_no_key_and_reads_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, records_read: list[Any]
) -> None:
    await fill(tmp_path / "cache", 50)
    records_read.clear()

    def walked(self: diskcache.Cache, *args: Any) -> Any:
        raise AssertionError("the store walked every key")

    monkeypatch.setattr(diskcache.Cache, "iterkeys", walked)
    store = await CacheStore.open(tmp_path / "cache", 10**8, 0, shares=SHARES)
    try:
        await store.counting.done.wait()
        assert records_read == []  # not at start-up, not while counting the shares either
        share = len(stored("/v1/a/0", account="a")[0]) + len(BODY) + ENTRY_OVERHEAD
        assert 50 * share <= store.ledger.held["a"] <= 50 * (share + 1)
        assert store.ledger.held["a"] == store.ledger.held["b"]
    finally:
        await store.close()


async def test_a_purge_while_the_shares_are_counted_misses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(tmp_path / "cache", 60)
    monkeypatch.setattr(store_module, "COUNT_PAGE", 5)  # many pages: the purge comes between
    store = await CacheStore.open(tmp_path / "cache", 10**8, 0, shares=SHARES)
    try:
        assert not store.counting.done.is_set()
        assert await store.purge("/v1/a/", "a") == 60
        store.invalidate(Invalidation("b", frozenset({"/v1/b/7", "/v1/b/59"})))
        assert not store.counting.done.is_set()  # all that came while counting
        await store.counting.done.wait()
        assert store.ledger.held.get("a", 0) == 0  # nothing counted that is gone
        for i in range(60):
            assert await store.get(stored(f"/v1/a/{i}", BODY, account="a")[0]) is None
            found = await store.get(stored(f"/v1/b/{i}", BODY, account="b")[0])
            assert (found is None) == (i in (7, 59)), i
        assert len(store.ledger.keys["b"]) == 58
    finally:
        await store.close()


async def test_shares_hold_for_what_is_written_while_they_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(tmp_path / "cache", 40)  # 40 x 2.6 KB of each account
    monkeypatch.setattr(store_module, "COUNT_PAGE", 5)
    # 60 KB each: past its share, an account's oldest records go, the newest stay.
    store = await CacheStore.open(tmp_path / "cache", 120_000, 0, shares=SHARES)
    try:
        for i in range(10):
            store.put(*stored(f"/v1/a/new{i}", BODY, account="a"))
        await store.counting.done.wait()
        await store.flush()
        for account in SHARES:
            assert 0 < store.ledger.held[account] <= store.ledger.limit(account)
        kept = [i for i in range(40) if await store.get(stored(f"/v1/a/{i}", account="a")[0])]
        assert kept == list(range(40 - len(kept), 40))  # the newest of the old ones
        for i in range(10):  # written after start-up: newer than every one counted later
            assert await store.get(stored(f"/v1/a/new{i}", account="a")[0]) is not None
        for i in range(40 - len(kept)):  # evicted records are off the disk too
            assert await store._run(store.disk.get, stored(f"/v1/a/{i}", account="a")[0]) is None
    finally:
        await store.close()
