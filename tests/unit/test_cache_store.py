"""The cache store on a real diskcache directory: memory bounds and damaged records."""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy.cache.invalidation import Invalidation
from proxy.cache.memory import HotEntries, Stored, intact, upgraded
from proxy.cache.metrics import CacheMetrics
from proxy.cache.policy import Entry, cache_key
from proxy.cache.store import CacheStore


def stored(path: str, body: bytes = b"[]", account: str = "main") -> tuple[str, Stored]:
    entry = Entry(200, (("ETag", '"a"'),), account, path, 0, 0, 0, 60, 0, 0, False, (), len(body))
    return cache_key(account, path, "", {}), Stored(entry, body)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def store(tmp_path: Path, registry: CollectorRegistry) -> AsyncIterator[CacheStore]:
    opened = await CacheStore.open(tmp_path / "cache", 10**8, 10**6, CacheMetrics(registry))
    yield opened
    await opened.close()


def test_memory_lru_counts_entries_not_only_body_bytes() -> None:
    hot = HotEntries(max_bytes=20_000)
    for i in range(1000):
        hot.put(*stored(f"/v1/x/{i}", body=b""))  # empty bodies cost memory too
    assert 0 < len(hot.items) < 50
    assert hot.bytes <= 20_000


async def test_path_index_is_bounded_and_removals_still_reach_unindexed_keys(
    store: CacheStore,
) -> None:
    store.index_limit = 3
    for i in range(10):
        store.put(*stored(f"/v1/companies/5/customers/{i}"))
    store.put(*stored("/v1/companies/5/customers/9", account="other"))
    assert store.indexed == 3
    assert sum(len(keys) for keys in store.paths.values()) == 3
    assert not store.index_complete
    await store.flush()
    store.hot.clear()
    inv = Invalidation("main", frozenset({"/v1/companies/5/customers/8"}), frozenset())
    store.invalidate(inv)
    await store.flush()
    assert await store.get(stored("/v1/companies/5/customers/8")[0]) is None
    assert await store.get(stored("/v1/companies/5/customers/7")[0]) is not None
    assert await store.get(stored("/v1/companies/5/customers/9", account="other")[0])
    assert await store.purge("/v1/companies/5/customers/", "main") == 9
    assert await store.get(stored("/v1/companies/5/customers/0")[0]) is None


async def test_a_corrupt_record_is_a_miss_and_is_removed(
    store: CacheStore, registry: CollectorRegistry
) -> None:
    key, good = stored("/v1/x")
    await store._run(store.disk.set, key, "not a record")
    assert await store.get(key) is None
    for op, count in (("read", 1), ("write", 0), ("delete", 0)):
        sample = registry.get_sample_value("kounta_proxy_cache_store_errors_total", {"op": op})
        assert (sample or 0) == count, op
    assert await store._run(store.disk.get, key) is None  # healed, not failing forever
    store.put(key, good)
    await store.flush()
    store.hot.clear()
    again = await store.get(key)
    assert again is not None
    assert again.body == b"[]"


def test_a_record_from_before_body_checksums_is_still_read() -> None:
    record = Stored(
        Entry(200, (), "main", "/v1/x", 0.0, 0.0, 0.0, 60.0, 0.0, 0.0, False, (), 10),
        None,
        "body:x",
    )
    old = pickle.loads(pickle.dumps(record))
    object.__delattr__(old, "crc")  # as unpickled from a version without the field
    assert not hasattr(old, "crc")
    value = upgraded(old)
    assert isinstance(value, Stored) and intact(value) and value.crc is None
