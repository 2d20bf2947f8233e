"""The cache store on a real diskcache directory: memory bounds and damaged records."""

from __future__ import annotations

import gc
import itertools
import pickle
import sqlite3
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import diskcache  # type: ignore[import-untyped]
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.cache.disk import covered
from proxy.cache.entry import Entry
from proxy.cache.flight import Flight, Flights
from proxy.cache.invalidation import Change, Invalidation, Purge, normalise_path
from proxy.cache.keys import cache_key
from proxy.cache.memory import ENTRY_OVERHEAD, KEPT_BYTES, HotEntries, Stored, intact, upgraded
from proxy.cache.metrics import CacheMetrics
from proxy.cache.store import WRITES_BEHIND, CacheStore
from proxy.cache.tiers import LocalEntries
from proxy.messages import ProxyRequest
from proxy.settings import CacheRule

# The cache rules a reload left (a tuple of settings: tracked, alive anyway).
RULES_NOW = (CacheRule(path="/v1/companies/*/products*", fresh_for=60),)


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


async def test_invalidations_and_purges_reach_entries_only_on_disk_after_a_restart(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "cache"
    store = await CacheStore.open(directory, 10**8, 10**6)
    paths = [
        "/v1/companies/5/customers/1.json",  # the target, with the format suffix
        "/v1/companies/5/customers/2",
        "/v1/companies/5/customers",  # a list of the collection: goes with a write to it
        "/v1/companies/5/customers/complete",  # a filtered list: goes too
        "/v1/companies/5/customers/3/orders",  # another collection's list: stays
        "/v1/companies/5/sites/7/products",  # a pattern's
        "/v1/companies/5/sites/7/products/9",  # not the pattern's (an id after it)
        "/v1/companies/6/orders/1",
        "/v1/companies/6/orders/10",  # a key whose path begins with another's
    ]
    for path in paths:
        store.put(*stored(path))
        store.put(*stored(path, account="other"))
    await store.close()

    store = await CacheStore.open(directory, 10**8, 10**6)  # nothing in memory
    try:

        async def left(account: str = "main") -> list[str]:
            await store.flush()
            return [p for p in paths if await store.get(stored(p, account=account)[0])]

        store.invalidate(
            Invalidation(
                "main",
                frozenset({"/v1/companies/5/customers/1", "/v1/companies/6/orders/1"}),
                frozenset({"customers"}),
                frozenset({"/v1/companies/5/sites/*/products"}),
            )
        )
        assert await left() == [
            "/v1/companies/5/customers/2",
            "/v1/companies/5/customers/3/orders",
            "/v1/companies/5/sites/7/products/9",
            "/v1/companies/6/orders/10",
        ]
        assert await left("other") == paths  # another account's keys are never touched
        assert await store.purge("/v1/companies/5/", "main") == 3
        assert await left() == ["/v1/companies/6/orders/10"]
        assert await store.purge("/v1/companies/6/", None) == 3  # every account's
        assert await left() == [] and len(await left("other")) == len(paths) - 2
    finally:
        await store.close()


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


# How a record pickled before the cache's decisions were split (main d3a0c1d and earlier)
# names its Entry; pickle's protocol 2 names each class by module and name in plain text.
NOW_NAMED = b"cproxy.cache.entry\nEntry\n"
THEN_NAMED = b"cproxy.cache.policy\nEntry\n"


def as_pickled_before_the_split(record: Stored) -> bytes:
    data = pickle.dumps(record, protocol=2)
    assert data.count(NOW_NAMED) == 1
    return data.replace(NOW_NAMED, THEN_NAMED)


@pytest.mark.parametrize("big", [False, True], ids=["in the database", "in a file"])
async def test_a_record_pickled_before_the_split_is_still_read(tmp_path: Path, big: bool) -> None:
    """Records on disk name their classes by module: an upgrade must not lose the disk."""
    headers = (("ETag", '"a"'), ("X-Big", "x" * (40_000 if big else 10)))  # past 32 KiB: a file
    entry = Entry(200, headers, "main", "/v1/x", 0, 0, 0, 60, 0, 0, False, (), 3)
    key = cache_key("main", "/v1/x", "", {})
    store = await CacheStore.open(tmp_path / "cache", 10**8, 10**6)
    store.put(key, Stored(entry, b"[1]"))
    await store.close()
    with sqlite3.connect(tmp_path / "cache" / "cache.db") as db:
        query = "SELECT filename, value FROM Cache WHERE key = ?"
        [(filename, value)] = db.execute(query, (key,))
        assert (filename is not None) == big
        if filename is None:
            old = as_pickled_before_the_split(pickle.loads(value))
            db.execute("UPDATE Cache SET value = ? WHERE key = ?", (old, key))
        else:
            file = tmp_path / "cache" / filename
            file.write_bytes(as_pickled_before_the_split(pickle.loads(file.read_bytes())))
    store = await CacheStore.open(tmp_path / "cache", 10**8, 10**6)
    try:
        again = await store.get(key)
    finally:
        await store.close()
    assert again is not None and again.entry == entry and again.body == b"[1]"


async def test_what_the_disk_finds_for_a_change_is_what_the_change_covers(tmp_path: Path) -> None:
    """:func:`~proxy.cache.disk.covered` narrows with queries on the keys; it must find
    exactly the keys ``covers`` names, whatever the shapes of the paths around them."""
    words = ["products", "5", "a1", "complete", "products.json", "pro%64ucts", 'q"uote']
    paths = ["/" + "/".join(p) for n in (1, 2, 3) for p in itertools.product(words, repeat=n)]
    keys = {
        cache_key(account, path, query, {}): (account, path)
        for account in ("main", "mai")
        for path in paths + [p + ".json" for p in paths]
        for query in ("", "next=/products/5", "x=/products")
    }
    disk = diskcache.Cache(str(tmp_path / "disk"))
    with disk.transact():
        for key in keys:
            disk.set(key, 1)
    changes: list[Change] = [
        Invalidation("main", frozenset(), frozenset({"products"})),
        Invalidation("main", frozenset(), frozenset({"complete", "5"})),
        Invalidation("main", frozenset(), frozenset({'q"uote'})),
        Invalidation("main", frozenset({"/products/5", "/a1"}), frozenset()),
        Invalidation("main", frozenset(), frozenset(), frozenset({"/products/*/complete*"})),
        Purge("/products/5", "main"),
        Purge("/products", None),
        Purge('/q"', None),
    ]
    try:
        for change in changes:
            wanted = {k for k, (a, p) in keys.items() if change.covers(a, normalise_path(p))}
            assert wanted, change  # each change covers some keys: the test means something
            assert set(covered(disk, change)) == wanted, change
    finally:
        disk.close()


def tracked_now() -> int:
    """The objects the cyclic collector walks, after a full pass (what it can untrack, such
    as tuples of strings, untracked)."""
    gc.collect()
    return len(gc.get_objects())


async def test_what_the_memory_tier_holds_is_out_of_the_collectors_walk(tmp_path: Path) -> None:
    """Every full pass walks what the collector tracks: entries held while serving must not
    add to it, or the pauses grow with the cache (docs/performance.md, "The tail as the
    cache grows"). Held after a store, a read from disk and a 304's refresh alike."""
    store = await CacheStore.open(tmp_path / "cache", 10**8, 10**7)
    try:
        await held_out_of_the_walk(store)
    finally:
        await store.close()


async def held_out_of_the_walk(store: CacheStore) -> None:
    before = tracked_now()
    # one dict (a list of (key, Stored) pairs would be 2000 tracked tuples of its own)
    entries = dict(stored(f"/v1/companies/5/products/{i}.json", b"x" * 100) for i in range(2000))
    for key, value in entries.items():
        store.put(key, value)
    await store.flush()  # the disk's writes done (their futures and closures gone)
    assert len(store.hot.items) == 2000
    assert tracked_now() - before < 200  # three an entry (~6000) while the tier tracked them
    store.hot.clear()
    (key, value), (other, its) = list(entries.items())[:2]
    read = await store.get(key)  # from disk: unpickled, then held in memory
    assert read is not None and store.hot.items[key] is read
    store.put(other, its)
    refreshed = Stored(replace(its.entry, response_time=9.0), its.body)
    store.put(other, refreshed)  # a 304's refresh: the same body, replaced in place
    assert store.hot.items[other] is refreshed
    assert not gc.is_tracked(store.hot.items) and not gc.is_tracked(store.hot.paths)
    for held in store.hot.items.values():
        assert not gc.is_tracked(held) and not gc.is_tracked(held.entry)
    assert all(isinstance(keys, str) for keys in store.hot.paths.values()), store.hot.paths


def test_a_paths_index_holds_a_lone_key_as_a_string_and_several_in_a_set() -> None:
    """What invalidations look through: the same keys found whatever the index's shape."""
    hot = HotEntries(10**6)
    path = "/v1/companies/5/customers"
    keys = [cache_key("main", path, f"page={n}", {}) for n in range(3)]
    for key in keys:
        hot.put(key, stored(path)[1])
    where = ("main", normalise_path(path))
    assert hot.paths[where] == set(keys)
    hot.pop(keys[0])
    hot.pop(keys[1])
    assert hot.paths[where] == keys[2]
    assert not gc.is_tracked(hot.paths)  # a set's key, one string again: out of the walk
    hot.put(keys[0], stored(path)[1])
    taken = hot.take(lambda account, p: p == normalise_path(path))
    assert sorted(taken) == sorted([keys[0], keys[2]])
    assert hot.paths == {} and hot.items == {}


async def test_a_304s_refresh_skips_the_disk_while_its_writes_are_behind(tmp_path: Path) -> None:
    """304s of many keys held in memory can come faster than the disk writes them: the
    queue stays bounded (it grew by one write a 304, ~20 objects each for the collector);
    the memory tier has every refresh, and entries not held in memory are still written."""
    store = await CacheStore.open(tmp_path / "cache", 10**8, 10**7)
    entries = LocalEntries(store, Flights(), CacheMetrics(CollectorRegistry()))
    request = ProxyRequest("GET", "/v1/x", "", CIMultiDictProxy(CIMultiDict()), account="main")
    held = [stored(f"/v1/companies/5/products/{i}.json", b"x" * 100) for i in range(600)]
    for key, value in held:
        store.hot.put(key, value)
    writer = threading.Event()
    store._later(writer.wait)  # the disk's one writer busy until the end
    try:
        for key, value in held:
            refreshed = Stored(replace(value.entry, response_time=9.0), value.body)
            entries.keep(Flight(key, request, store.sequence), refreshed, freshened=True)
            assert store.hot.items[key] is refreshed
        assert len(store._pending) <= WRITES_BEHIND + 1  # 601 before
        key, value = stored("/v1/companies/5/products/new.json")
        entries.keep(Flight(key, request, store.sequence), value)  # not held: written
    finally:
        writer.set()
    await store.flush()
    assert await store._run(store.disk.get, key) is not None
    await store.close()


def test_what_the_fast_path_makes_of_an_entry_is_kept_beside_it_and_dropped_with_it() -> None:
    """One record per held entry (HotEntries.kept): the same while the entry is held, a new
    one once another entry is held under the key (a 304's refresh in place included), gone
    with the entry (popped, evicted, invalidated, cleared), out of the collector's walk."""
    hot = HotEntries(10**6)
    key, held = stored("/v1/companies/5/products/1.json", b"x" * 100)
    hot.put(key, held)
    made = hot.kept(key, held)
    made.coding, made.webhook, made.rules = "gzip", True, ()
    made.shape_of, made.shape = (200, "", "", True, "c"), (b"head", True)
    assert hot.kept(key, held) is made
    assert not gc.is_tracked(made) and not gc.is_tracked(hot.made)
    refreshed = Stored(replace(held.entry, response_time=9.0), held.body)
    hot.put(key, refreshed)  # in place: the old record (and the old Stored it holds) goes
    assert key not in hot.made
    again = hot.kept(key, refreshed)
    assert again is not made and again.coding is None and again.shape is None
    hot.pop(key)
    assert hot.made == {}
    small = HotEntries(20_000)  # room for a few entries: the rest evicted
    keys = []
    for i in range(40):
        key, held = stored(f"/v1/companies/5/products/{i}.json", b"x" * 100)
        small.put(key, held)
        small.kept(key, held)
        keys.append(key)
    assert 0 < len(small.items) < 40 and set(small.made) == set(small.items)
    small.take(lambda account, path: path.endswith(("/3.json", "/39.json")))
    assert set(small.made) == set(small.items)
    small.clear()
    assert small.made == {}


def test_the_fast_paths_records_of_held_entries_add_nothing_for_the_collector_to_walk() -> None:
    hot = HotEntries(10**8)
    entries = dict(stored(f"/v1/companies/5/products/{i}.json", b"x" * 100) for i in range(2000))
    for key, value in entries.items():
        hot.put(key, value)
    before = tracked_now()
    for key, value in entries.items():
        made = hot.kept(key, value)
        made.coding, made.rules, made.webhook = "", RULES_NOW, False
        made.shape_of, made.shape = (200, "http", "h", True, "c"), (b"head" + key.encode(), True)
    assert len(hot.made) == 2000
    assert tracked_now() - before < 200  # a record each (2,000) if they were walked


def test_the_fast_paths_records_count_against_the_memory_tiers_bound() -> None:
    """Each record (its rendered head ~1 KB) is counted while held: small entries with their
    records never hold more than the tier's bytes (uncounted, a tier of 64 MB full of small
    answers held ~100 MB of heads beside them)."""
    hot = HotEntries(200_000)
    for i in range(2000):
        key, held = stored(f"/v1/companies/5/products/{i}.json", b"x" * 10)
        hot.put(key, held)
        assert hot.get(key) is held
        hot.kept(key, held).shape = (b"h" * 900, True)
        assert key in hot.items and key in hot.made  # the one just asked stays
        assert hot.bytes <= hot.max_bytes
    assert set(hot.made) == set(hot.items) and 0 < len(hot.items) < 2000
    assert hot.bytes == sum(len(k) + 10 + ENTRY_OVERHEAD + KEPT_BYTES for k in hot.items)
    hot.pop(next(iter(hot.items)))
    assert hot.bytes == sum(len(k) + 10 + ENTRY_OVERHEAD + KEPT_BYTES for k in hot.items)
