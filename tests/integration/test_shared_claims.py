"""A flight's fetch lock over a large entry in a real Redis: the lock's claim reads only the
head of the record stored under the key (its entry, not its body) and reads the whole of it
only when that entry may answer the flight (fresh, or fetched since the flight began)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from proxy.edge.services import SERVICES
from proxy.settings import CacheSettings
from tests.conftest import serve_handler
from tests.integration.test_cache import get
from tests.integration.test_shared_entries import shared_op
from tests.replicas import Replicas, caching, until

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BODY = b'{"pad":"' + b"x" * 500_000 + b'"}'


async def large_v1(request: web.Request) -> web.Response:
    """An upstream of one 500 KB entry, ETag "v1", 304 on a matching If-None-Match."""
    if request.headers.get("If-None-Match") == '"v1"':
        return web.Response(status=304, headers={"ETag": '"v1"'})
    return web.Response(body=BODY, headers={"ETag": '"v1"', "Content-Type": "application/json"})


async def sent_bytes(redis: aioredis.Redis) -> int:
    return int((await redis.info("stats"))["total_net_output_bytes"])


async def test_a_revalidating_flight_does_not_read_the_large_body_it_holds_from_redis(
    own_replicas: Replicas, client: aiohttp.ClientSession
) -> None:
    # No freshness: every request revalidates (one flight each, sequential). Each flight takes
    # the fetch lock; the 500 KB record under the key is this replica's own, stale, and no
    # answer for the flight: Redis sends its head, not 500 KB per flight.
    runner, upstream = await serve_handler(large_v1)
    try:
        space = own_replicas.space
        settings = caching(upstream, own_replicas.tmp_path / "r0", space.settings())
        (p,) = await own_replicas.start(dataclasses.replace(settings, cache=CacheSettings()))
        cache = p.app[SERVICES].cache
        assert cache is not None
        url = p.url + "/v1/things.json"
        status, headers, body = await get(client, url)
        assert (status, headers["X-Cache"], body == BODY) == (200, "MISS", True)
        await until(lambda: not cache.tasks, what="the flight's finish")
        assert shared_op(p, "put", "ok") == 1
        async with space.client() as redis:
            before = await sent_bytes(redis)
            for _ in range(4):
                status, headers, body = await get(client, url)
                assert (status, headers["X-Cache"], body == BODY) == (200, "REVALIDATED", True)
                await until(lambda: not cache.tasks, what="the flight's finish")
            sent = await sent_bytes(redis) - before
        assert (shared_op(p, "lock", "taken"), shared_op(p, "lock", "peeked")) == (5, 4)
        assert sent < 4 * 64 * 1024, sent  # was 4 x 500 KB: the whole record per claim
    finally:
        await runner.cleanup()


def fresh_from_the_second(served: list[str], body: bytes) -> Handler:
    """An upstream of one entry, ETag "v1", 304 on a matching If-None-Match: not fresh when
    first served, fresh (max-age=600) from the second request on; ``served`` gets each
    request's If-None-Match."""

    async def handler(request: web.Request) -> web.Response:
        served.append(request.headers.get("If-None-Match", ""))
        headers = {
            "ETag": '"v1"',
            "Cache-Control": "max-age=0" if len(served) == 1 else "max-age=600",
        }
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers={**headers, "Content-Type": "application/json"})

    return handler


async def test_a_large_entry_another_replica_made_fresh_answers_the_flight_whole(
    replicas: Replicas, client: aiohttp.ClientSession
) -> None:
    # A stores the entry not fresh; B's revalidation makes it fresh (max-age=600) and stores
    # it in Redis at once; A's next flight finds B's entry fresh under the lock (from the
    # record's head), reads it whole and answers from it: no upstream request.
    served: list[str] = []
    runner, upstream = await serve_handler(fresh_from_the_second(served, BODY))
    try:
        a, b = await replicas.without_rules(upstream)
        url = "/v1/things.json"
        first = await get(client, a.url + url)
        assert (first[1]["X-Cache"], first[2] == BODY) == ("MISS", True)
        for p in (a, b):
            cache = p.app[SERVICES].cache
            assert cache is not None
            await until(lambda c=cache: not c.tasks, what="the flight's finish")  # type: ignore[misc]
        second = await get(client, b.url + url)
        assert second[1]["X-Cache"] == "REVALIDATED"
        cache_b = b.app[SERVICES].cache
        assert cache_b is not None
        await until(lambda: not cache_b.tasks, what="B's finish")
        third = await get(client, a.url + url)
        assert (third[0], third[2] == BODY) == (200, True)
        assert served == ["", '"v1"']  # A answered from B's entry
    finally:
        await runner.cleanup()
