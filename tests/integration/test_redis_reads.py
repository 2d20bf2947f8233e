"""The Redis tier's reads (:mod:`proxy.shared.reads`) on a real redis-server: one round trip of
plain commands on one pipelined connection, every record still verified (a tampered, copied,
empty or foreign value is a bad record), and a Redis that drops or stalls the connection
failing the reads at once (degraded), not hanging them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy.settings import Secret
from proxy.shared import SharedUnavailable
from proxy.shared.metrics import SharedMetrics
from proxy.shared.reads import HEAD
from proxy.shared.records import BadRecord
from proxy.shared.redis_backend import RedisBackend
from tests.redis_server import RedisServer
from tests.replicas import RedisSpace, until


def calls(registry: CollectorRegistry, result: str = "ok") -> float:
    labels = {"op": "cache_get", "result": result}
    return registry.get_sample_value("kounta_proxy_shared_calls_total", labels) or 0.0


async def clients(space: RedisSpace) -> int:
    async with space.client() as raw:
        return len(await raw.client_list()) - 1  # not this one


async def test_reads_are_one_round_trip_of_plain_commands_on_one_connection(
    own_redis_space: RedisSpace,
) -> None:
    """200 reads at once (20 records, 5 missing keys): each gets its own key's record, one
    counted round trip each, no script (EVALSHA) and no connection per read."""
    registry = CollectorRegistry()
    async with own_redis_space.backend(registry) as backend, own_redis_space.client() as raw:
        for i in range(20):
            assert await backend.cache_put("main", f"d{i}", f"/v1/{i}", b"record %d" % i, 60, "0")
        await raw.config_resetstat()
        before = await clients(own_redis_space)
        found = await asyncio.gather(
            *(backend.cache_get("main", f"d{i % 25}", 1000) for i in range(200))
        )
        assert found == [b"record %d" % (i % 25) if i % 25 < 20 else None for i in range(200)]
        assert calls(registry) == 200
        stats = await raw.info("commandstats")
        assert "cmdstat_evalsha" not in stats and "cmdstat_eval" not in stats
        assert stats["cmdstat_getrange"]["calls"] == 200
        assert await clients(own_redis_space) <= before + 1  # the reads' one connection


async def test_every_kind_of_bad_value_is_refused_among_good_reads(
    redis_space: RedisSpace,
) -> None:
    """Pipelined with good reads, in one gather: a record whose body, tag or key was changed,
    an empty value, a list, a value over the limit: each a bad record; the good ones (one
    small, one longer than a first read takes) come back whole, in their own places."""
    registry = CollectorRegistry()
    async with redis_space.backend(registry) as backend, redis_space.client() as raw:

        def name(digest: str) -> str:
            return f"{redis_space.prefix}:cache:main:e:{digest}"

        large = bytes(range(256)) * (HEAD // 128)  # twice a first read
        assert await backend.cache_put("main", "good", "/v1/g", b"small record", 60, "0")
        assert await backend.cache_put("main", "large", "/v1/l", large, 60, "0")
        sealed = bytes(await raw.get(name("good")))
        await raw.set(name("body"), sealed[:-1] + b"X", px=60_000)
        tampered = sealed[:10] + bytes([sealed[10] ^ 1]) + sealed[11:]
        await raw.set(name("tag"), tampered, px=60_000)
        await raw.set(name("copied"), sealed, px=60_000)  # sealed for another key
        await raw.set(name("empty"), b"", px=60_000)
        await raw.rpush(name("list"), b"a", b"b")
        await raw.set(name("huge"), b"x" * (HEAD + 10), px=60_000)
        digests = ["good", "body", "large", "tag", "copied", "empty", "list", "good", "huge"]
        found = await asyncio.gather(
            *(backend.cache_get("main", d, 2 * HEAD) for d in digests[:-1]),
            backend.cache_get("main", "huge", 10 - backend.OVERHEAD),  # a limit of 10 bytes
            return_exceptions=True,
        )
        want = {"good": b"small record", "large": large}
        for digest, got in zip(digests, found, strict=True):
            if digest in want:
                assert got == want[digest], digest
            else:
                assert isinstance(got, BadRecord), (digest, got)
        # One round trip each; two for the large record (its whole read is the script's).
        assert calls(registry) == len(digests) + 1
        assert backend.up


async def test_a_dropped_connection_fails_its_reads_and_a_later_one_connects_again(
    own_redis_space: RedisSpace,
) -> None:
    async with own_redis_space.backend(timeout=0.3) as backend, own_redis_space.client() as raw:
        assert await backend.cache_put("main", "d1", "/v1/a", b"one", 60, "0")
        assert await backend.cache_get("main", "d1", 100) == b"one"
        await raw.client_kill_filter(_type="normal", skipme=True)  # every other client
        for _ in range(3):  # failed (written before the close was seen) or answered again
            with contextlib.suppress(SharedUnavailable):
                assert await asyncio.wait_for(backend.cache_get("main", "d1", 100), 2) == b"one"
            await asyncio.sleep(0.05)
        await until(lambda: backend.up, within=5.0, what="back up after the kill")
        assert await backend.cache_get("main", "d1", 100) == b"one"


async def test_a_stalled_redis_fails_reads_within_the_timeout(
    own_redis_space: RedisSpace,
) -> None:
    """CLIENT PAUSE: replies stop; every read waiting fails after shared.timeout (the
    connection is dropped: later replies would be out of order), none hangs."""
    async with own_redis_space.backend(timeout=0.3) as backend, own_redis_space.client() as raw:
        assert await backend.cache_put("main", "d1", "/v1/a", b"one", 60, "0")
        assert await backend.cache_get("main", "d1", 100) == b"one"
        await raw.execute_command("CLIENT", "PAUSE", 800, "ALL")
        began = time.monotonic()
        results = await asyncio.gather(
            *(backend.cache_get("main", "d1", 100) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, SharedUnavailable) for r in results), results
        assert time.monotonic() - began < 1.0  # shared.timeout (0.3 s) and a little
        assert not backend.up
        await raw.execute_command("CLIENT", "UNPAUSE")
        await until(lambda: backend.up, within=5.0, what="back up after the pause")
        assert await backend.cache_get("main", "d1", 100) == b"one"


async def test_closing_fails_a_read_in_flight(own_redis_space: RedisSpace) -> None:
    backend = RedisBackend(own_redis_space.settings(), SharedMetrics(CollectorRegistry()))
    await backend.start()
    async with own_redis_space.client() as raw:
        assert await backend.cache_get("main", "d1", 100) is None  # connected
        await raw.execute_command("CLIENT", "PAUSE", 400, "ALL")
        read = asyncio.ensure_future(backend.cache_get("main", "d1", 100))
        await asyncio.sleep(0.05)
        await backend.close()
        with pytest.raises(SharedUnavailable):
            await asyncio.wait_for(read, 2.0)
        await raw.execute_command("CLIENT", "UNPAUSE")


async def test_reads_connect_as_the_pool_does_with_a_password(tmp_path: Path) -> None:
    """The reads' connection is the data pool's: authenticated like every other call."""
    server = RedisServer(tmp_path / "redis", password="s3cret pass")
    server.start()
    try:
        space = RedisSpace(server, "pw")
        async with space.backend(password=Secret("s3cret pass")) as backend:
            assert backend.up
            assert await backend.cache_put("main", "d1", "/v1/a", b"one", 60, "0")
            assert await backend.cache_get("main", "d1", 100) == b"one"
            assert await backend.cache_get("main", "d2", 100) is None
    finally:
        server.stop()
