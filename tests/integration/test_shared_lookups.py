"""Lookups of one key at once share one read of Redis (:meth:`RedisEntries._read`), on a real
redis-server: one round trip answers every lookup that came while it was out, the record it
read is verified (MAC, key, size, CRC32) in that read and on every later read, and a read
that fails (a tampered record, Redis stalled, its caller gone) fails or frees every lookup
waiting on it, never hangs one. A lookup after an invalidation never shares a read sent
before it."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from proxy.cache import records
from proxy.cache.entry import Entry
from proxy.cache.flight import Flights
from proxy.cache.invalidation import Invalidation
from proxy.cache.keys import cache_key
from proxy.cache.memory import Stored
from proxy.cache.metrics import CacheMetrics
from proxy.cache.records import digest
from proxy.cache.redis_records import RedisRecords
from proxy.cache.store import CacheStore
from proxy.cache.tiers import RedisEntries
from proxy.shared.redis_backend import RedisBackend
from tests.replicas import RedisSpace

PATH = "/v1/products/1"
KEY = cache_key("main", PATH, "", {})
BODY = b'{"id": 1, "name": "' + b"x" * 8000 + b'"}'


@dataclass
class Tier:
    entries: RedisEntries
    backend: RedisBackend
    space: RedisSpace
    shared: CollectorRegistry  # the backend's: its round trips
    cache: CollectorRegistry  # the cache's: hits, joined, bad records

    def trips(self, result: str = "ok") -> float:
        labels = {"op": "cache_get", "result": result}
        return self.shared.get_sample_value("kounta_proxy_shared_calls_total", labels) or 0.0

    def counted(self, result: str) -> float:
        labels = {"op": "get", "result": result}
        return self.cache.get_sample_value("kounta_proxy_cache_shared_total", labels) or 0.0

    def redis_key(self) -> str:
        return f"{self.space.prefix}:cache:main:e:{digest(KEY)}"

    async def store(self) -> None:
        now = time.time()
        entry = Entry(
            200, (("ETag", '"v1"'),), "main", PATH, now, now, 0.0, 3600.0, 0.0, 0.0, False, (),
            len(BODY),
        )  # fmt: skip
        claim = await self.entries.records.claim("main", KEY)
        assert claim is not None
        await self.entries.records.put(KEY, Stored(entry, BODY), claim.gen, now)


async def tier(
    space: RedisSpace, tmp_path: Path, redis_timeout: float = 2.0
) -> AsyncIterator[Tier]:
    shared, cache = CollectorRegistry(), CollectorRegistry()
    metrics = CacheMetrics(cache)
    # No memory tier: every lookup reads Redis (as the bench's Redis-hit proxy does).
    store = await CacheStore.open(tmp_path / "cache", 10**8, 0, metrics)
    try:
        async with space.backend(shared, timeout=redis_timeout) as backend:
            records = RedisRecords(
                backend, metrics, max_entry_size=1 << 20, stale_if_error=0.0, lock_ttl=5.0,
                accounts=("main",),
            )  # fmt: skip
            entries = RedisEntries(store, Flights(), metrics, records, time.time, 1.0)
            yield Tier(entries, backend, space, shared, cache)
    finally:
        await store.close()


@pytest.fixture
async def shared_tier(redis_space: RedisSpace, tmp_path: Path) -> AsyncIterator[Tier]:
    async for made in tier(redis_space, tmp_path):
        yield made


async def test_lookups_of_one_key_at_once_share_one_verified_read(shared_tier: Tier) -> None:
    await shared_tier.store()
    found = await asyncio.gather(*(shared_tier.entries.lookup("main", KEY) for _ in range(10)))
    assert all(f is not None and f.body == BODY and f.entry.path == PATH for f in found)
    assert shared_tier.trips() == 1  # one round trip for the ten
    assert (shared_tier.counted("hit"), shared_tier.counted("joined")) == (1, 9)
    # Lookups one after the other each read (and verify) again.
    for _ in range(3):
        assert await shared_tier.entries.lookup("main", KEY) is not None
    assert shared_tier.trips() == 4


async def test_a_tampered_record_is_refused_for_every_lookup_sharing_its_read(
    shared_tier: Tier,
) -> None:
    await shared_tier.store()
    assert await shared_tier.entries.lookup("main", KEY) is not None  # read and verified once
    async with shared_tier.space.client() as raw:
        sealed = bytearray(await raw.get(shared_tier.redis_key()))
        sealed[-10] ^= 1  # one bit of the body: the MAC (and the CRC32) no longer match
        await raw.set(shared_tier.redis_key(), bytes(sealed), px=60_000)
        found = await asyncio.gather(*(shared_tier.entries.lookup("main", KEY) for _ in range(5)))
        assert found == [None] * 5  # refused for all, not remembered from the read before
        assert shared_tier.counted("bad_record") == 1 and shared_tier.counted("joined") == 4
        assert await raw.exists(shared_tier.redis_key()) == 0  # dropped


async def test_a_stalled_read_fails_every_lookup_sharing_it_within_the_timeout(
    own_redis_space: RedisSpace, tmp_path: Path
) -> None:
    async for shared in tier(own_redis_space, tmp_path, redis_timeout=0.3):
        await shared.store()
        assert await shared.entries.lookup("main", KEY) is not None  # connected
        async with shared.space.client() as raw:
            await raw.execute_command("CLIENT", "PAUSE", "1500", "ALL")
            began = time.monotonic()
            found = await asyncio.wait_for(
                asyncio.gather(*(shared.entries.lookup("main", KEY) for _ in range(5))), 1.2
            )
            assert found == [None] * 5 and time.monotonic() - began < 1.0  # none hangs
            assert shared.counted("error") == 1 and shared.counted("joined") == 4
            await raw.execute_command("CLIENT", "UNPAUSE")

        async def answered() -> bool:
            return await shared.entries.lookup("main", KEY) is not None

        deadline = time.monotonic() + 5
        while not await answered():  # once the backend is back up
            assert time.monotonic() < deadline, "lookups never answered again"
            await asyncio.sleep(0.05)


async def test_waiters_of_a_read_whose_caller_left_read_on_their_own(shared_tier: Tier) -> None:
    await shared_tier.store()
    assert await shared_tier.entries.lookup("main", KEY) is not None  # connected
    first = asyncio.ensure_future(shared_tier.entries.lookup("main", KEY))
    await asyncio.sleep(0)  # its read is out
    waiters = [asyncio.ensure_future(shared_tier.entries.lookup("main", KEY)) for _ in range(3)]
    await asyncio.sleep(0)  # each waits for the first's read
    first.cancel()
    found = await asyncio.gather(*waiters)
    assert all(f is not None and f.body == BODY for f in found)
    with pytest.raises(asyncio.CancelledError):
        await first
    # The three read once more, sharing that read among themselves (the first's read was
    # given up: not counted as answered).
    assert shared_tier.counted("joined") == 2 and shared_tier.counted("hit") == 2
    assert shared_tier.trips() == 2


async def test_a_waiter_that_leaves_leaves_the_others_answered(shared_tier: Tier) -> None:
    await shared_tier.store()
    lookups = [asyncio.ensure_future(shared_tier.entries.lookup("main", KEY)) for _ in range(3)]
    await asyncio.sleep(0)
    lookups[1].cancel()
    first, _, last = await asyncio.gather(*lookups, return_exceptions=True)
    assert isinstance(first, Stored) and isinstance(last, Stored) and first is last
    assert shared_tier.trips() == 1


async def test_a_lookup_after_an_invalidation_does_not_share_a_read_sent_before_it(
    shared_tier: Tier,
) -> None:
    await shared_tier.store()
    before = asyncio.ensure_future(shared_tier.entries.lookup("main", KEY))
    await asyncio.sleep(0)  # its read is out
    shared_tier.entries.store.invalidate(Invalidation("main", frozenset({PATH})))
    after = await shared_tier.entries.lookup("main", KEY)  # still in Redis: read again
    assert after is not None and after.body == BODY
    assert await before is None  # read before the invalidation: not answered from Redis
    assert shared_tier.trips() == 2 and shared_tier.counted("joined") == 0


async def test_a_record_read_again_is_verified_again_but_its_crc32_computed_once(
    shared_tier: Tier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record read again under the MAC tag that verified it before is those bytes: its
    body's CRC32 (and header) are not checked again; its MAC is, on every read."""
    await shared_tier.store()
    crcs: list[int] = []

    def crc32(data: bytes, start: int = 0) -> int:
        crcs.append(len(data))
        return zlib.crc32(data, start)

    monkeypatch.setattr(records, "zlib", SimpleNamespace(crc32=crc32))
    for _ in range(3):
        found = await shared_tier.entries.lookup("main", KEY)
        assert found is not None and found.body == BODY and found.crc == zlib.crc32(BODY)
    assert crcs == [len(BODY)]  # three reads, one CRC32
    async with shared_tier.space.client() as raw:  # the same header and tag, another body
        sealed = bytearray(await raw.get(shared_tier.redis_key()))
        sealed[-10] ^= 1
        await raw.set(shared_tier.redis_key(), bytes(sealed), px=60_000)
    assert await shared_tier.entries.lookup("main", KEY) is None  # the MAC still decides
    assert shared_tier.counted("bad_record") == 1


async def test_a_record_sealed_over_a_body_of_the_wrong_crc32_is_refused_on_every_read(
    shared_tier: Tier,
) -> None:
    """A record whose MAC verifies (sealed by a replica holding the key) but whose body does
    not match its CRC32 is never remembered as verified: refused each time it is read."""
    await shared_tier.store()
    async with shared_tier.space.client() as raw:
        key = shared_tier.redis_key()
        payload = shared_tier.backend.records.open(key.encode(), await raw.get(key))
        wrong = payload[:-1] + bytes([payload[-1] ^ 1])
        for _ in range(2):
            await raw.set(key, shared_tier.backend.records.seal(key.encode(), wrong), px=60_000)
            assert await shared_tier.entries.lookup("main", KEY) is None
    assert shared_tier.counted("bad_record") == 2
