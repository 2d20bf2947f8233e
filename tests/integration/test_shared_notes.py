"""Revalidations coalesced across replicas (proxy.cache.notes): a replica whose flight waits on
another's fetch lock answers from that replica's 304 (its note) when the 304 came after its
flight began and answered the validators of its own entry; a forged note, a note for another
ETag and a note older than the flight are never used (the replica fetches on its own)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.cache.notes import Note, encode
from proxy.cache.records import digest
from proxy.edge.services import SERVICES
from proxy.settings import CacheSettings
from proxy.shared.records import BadRecord
from tests.conftest import Proxy, serve_handler
from tests.integration.test_cache import get
from tests.integration.test_shared_entries import shared_op
from tests.replicas import Replicas, caching, until

PATH = "/v1/companies/5001/things.json"


class Upstream:
    """One resource with an ETag (no freshness: every read revalidates); 304s take
    ``delay`` seconds. Counts what it answered."""

    def __init__(self) -> None:
        self.version = "v1"
        self.delay = 0.0
        self.answered: Counter[int] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        etag = f'"{self.version}"'
        if request.headers.get("If-None-Match") == etag:
            await asyncio.sleep(self.delay)
            self.answered[304] += 1
            return web.Response(status=304, headers={"ETag": etag})
        await asyncio.sleep(self.delay)
        self.answered[200] += 1
        return web.json_response({"version": self.version}, headers={"ETag": etag})


async def start(replicas: Replicas, upstream: str, count: int) -> list[Proxy]:
    """Replicas without cache rules (nothing is ever fresh: each read is revalidated)."""
    shared = replicas.space.settings()
    settings = [
        dataclasses.replace(
            caching(upstream, replicas.tmp_path / f"r{i}", shared), cache=CacheSettings()
        )
        for i in range(count)
    ]
    return await replicas.start(*settings)


async def read(client: aiohttp.ClientSession, proxy: Proxy) -> tuple[str, str]:
    status, headers, body = await get(client, proxy.url + PATH)
    assert status == 200
    return headers["X-Cache"], json.loads(body)["version"]


async def settled(*proxies: Proxy) -> None:
    for p in proxies:
        cache = p.app[SERVICES].cache
        assert cache is not None
        await until(lambda cache=cache: not cache.tasks, what="the flights' finish")


async def warmed(
    replicas: Replicas, client: aiohttp.ClientSession, url: str
) -> tuple[Proxy, Proxy]:
    """Two replicas, both holding the entry (A fetched it, B read it from Redis)."""
    a, b = await start(replicas, url, 2)
    assert await read(client, a) == ("MISS", "v1")
    await settled(a)
    assert (await read(client, b))[1] == "v1"
    await settled(b)
    return a, b


@pytest.mark.parametrize("changed", [False, True], ids=["304", "changed"])
async def test_a_replica_waiting_on_anothers_fetch_answers_from_what_it_got(
    replicas: Replicas, client: aiohttp.ClientSession, changed: bool
) -> None:
    # B's request arrives while A's fetch is out. A 304: its note freshens B's own entry.
    # Changed: the entry A stores is not fresh either (no rule), but it was fetched after
    # B's request came, so it answers B as A's own flight answers A's callers.
    upstream = Upstream()
    runner, url = await serve_handler(upstream.handle)
    try:
        a, b = await warmed(replicas, client, url)
        upstream.answered.clear()
        upstream.delay = 0.3
        if changed:
            upstream.version = "v2"
        expected = ("MISS", "v2") if changed else ("REVALIDATED", "v1")
        first = asyncio.create_task(read(client, a))
        await until(lambda: shared_op(a, "lock", "taken") >= 2, what="A's fetch lock")
        assert await read(client, b) == expected
        assert await first == expected
        await settled(a, b)
    finally:
        await runner.cleanup()
    # One upstream request for both replicas (was 2: B fetched again).
    assert upstream.answered == ({200: 1} if changed else {304: 1})
    assert shared_op(b, "note", "adopted") == (0 if changed else 1)


async def _holding(
    replicas: Replicas, client: aiohttp.ClientSession, b: Proxy
) -> tuple[str, str, str]:
    """Warm B's entry; the cache key, its digest and B's notes channel."""
    assert await read(client, b) == ("MISS", "v1")
    await settled(b)
    key = next(iter(b.app[SERVICES].store.hot.items))  # type: ignore[union-attr]
    async with replicas.space.client() as redis:
        pattern = f"{replicas.space.prefix}:cache:notes:*"
        deadline = time.monotonic() + 5
        while not (channels := await redis.pubsub_channels(pattern)):
            assert time.monotonic() < deadline, "B does not listen for notes"
            await asyncio.sleep(0.01)
    return key, digest(key), channels[0].decode()


@pytest.mark.parametrize("case", ["valid", "forged", "other_etag", "older", "other_key"])
async def test_a_note_is_used_only_when_it_may_answer_the_waiting_flight(
    replicas: Replicas, client: aiohttp.ClientSession, redis_client: aioredis.Redis, case: str
) -> None:
    # The test holds the key's fetch lock as another replica would, and lets go of it with a
    # note of its choosing while B's flight waits on it.
    upstream = Upstream()
    runner, url = await serve_handler(upstream.handle)
    try:
        (b,) = await start(replicas, url, 1)
        key, name, channel = await _holding(replicas, client, b)
        upstream.answered.clear()
        async with replicas.space.backend() as other:
            claim = await other.cache_claim("main", name, "holder", 5.0, 1 << 20)
            assert claim.owner == "holder"
            began = time.time()
            answer = asyncio.create_task(read(client, b))
            await until(lambda: shared_op(b, "lock", "waited") == 1, what="B waits on the lock")
            when = began - 5 if case == "older" else time.time()
            sent = (("If-None-Match", '"v0"' if case == "other_etag" else '"v1"'),)
            note = Note(
                "holder",
                key + "x" if case == "other_key" else key,
                "304",
                sent,
                (("ETag", sent[0][1]),),
                when,
                when,
            )
            data = encode(note)
            assert data is not None
            if case == "forged":  # sealed with another key: the MAC does not verify
                forged = b"KPR2" + b"\0" * 32 + data
                await redis_client.publish(channel, b"holder|" + forged)
                await other.cache_release("main", name, "holder")
            else:
                await other.cache_release("main", name, "holder", data)
            assert await answer == ("REVALIDATED", "v1")
        await settled(b)
    finally:
        await runner.cleanup()
    if case == "valid":
        assert upstream.answered == {}  # answered from the note's 304
        assert shared_op(b, "note", "adopted") == 1
    else:  # never from the note: B revalidated on its own
        assert upstream.answered == {304: 1}
        assert shared_op(b, "note", "adopted") == 0


async def test_a_note_sealed_for_another_key_does_not_verify(replicas: Replicas) -> None:
    async with replicas.space.backend() as a, replicas.space.backend() as b:
        await until(lambda: a.notes.subscribed and b.notes.subscribed, what="notes heard")
        claim = await a.cache_claim("main", "d1", "holder", 5.0, 10)
        assert claim.owner == "holder"
        waiting = await b.cache_claim("main", "d1", "other", 5.0, 10, wait=True)
        assert (waiting.owner, waiting.holder, waiting.noted) == (None, "holder", True)
        heard = asyncio.create_task(b.cache_note("main", "d2", "holder", 2.0))
        await a.cache_release("main", "d1", "holder", b"a note for d1")
        with pytest.raises(BadRecord):
            await heard  # opened for d2: the MAC over d1's note key does not verify
        # The same note waited for under its own key is heard and opened.
        await b.cache_claim("main", "d1", "holder2", 5.0, 10)
        await a.cache_claim("main", "d1", "other", 5.0, 10, wait=True)
        heard = asyncio.create_task(a.cache_note("main", "d1", "holder2", 2.0))
        await b.cache_release("main", "d1", "holder2", b"the note")
        assert await heard == b"the note"
