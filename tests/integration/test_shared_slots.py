"""A flight's budget slot asked with its fetch lock's claim, on a real redis-server: one round
trip for the two (the slot's script written right behind the claim's on the pipelined
connection), a slot taken only by the replica that got the lock, and a slot taken with the
lock but not sent (the flight answered from another replica's entry) given back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from proxy.edge.services import SERVICES
from proxy.settings import CacheSettings
from tests.conftest import serve_handler
from tests.integration.test_cache import get
from tests.integration.test_shared_claims import fresh_from_the_second
from tests.replicas import RedisSpace, Replicas, caching, until


class Relay:
    """A TCP relay in front of Redis that counts, per connection, the client's turns: bytes
    from the client after Redis answered (or first), however many chunks they come in. A
    command written behind another in the same write shares its turn; one written after the
    other's reply makes a turn of its own (one more round trip)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.turns: dict[int, int] = {}  # connection -> the client's turns
        self.scripts: set[int] = set()  # connections that carried EVALSHA
        self._tasks: set[asyncio.Task[None]] = set()

    async def _pipe(
        self, conn: int, src: asyncio.StreamReader, dst: asyncio.StreamWriter, client: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                if client:
                    if self._answered.get(conn, True):
                        self.turns[conn] = self.turns.get(conn, 0) + 1
                    self._answered[conn] = False
                    if b"EVALSHA" in data or b"EVAL" in data:
                        self.scripts.add(conn)
                else:
                    self._answered[conn] = True
                dst.write(data)
                await dst.drain()
        dst.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = id(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        await asyncio.gather(
            self._pipe(conn, reader, up_writer, True), self._pipe(conn, up_reader, writer, False)
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        self._answered: dict[int, bool] = {}
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.close()

    def script_turns(self) -> int:
        return sum(self.turns.get(c, 0) for c in self.scripts)


async def v1(request: web.Request) -> web.Response:
    """An upstream of one entry, ETag "v1", never fresh: 304 on a matching If-None-Match."""
    if request.headers.get("If-None-Match") == '"v1"':
        return web.Response(status=304, headers={"ETag": '"v1"'})
    return web.json_response({"id": 1}, headers={"ETag": '"v1"'})


async def test_a_flight_asks_its_budget_slot_with_its_fetch_lock_in_one_round_trip(
    own_replicas: Replicas, client: aiohttp.ClientSession
) -> None:
    # Sequential revalidations, one flight each: the claim and the budget's slot go in one
    # write and come back in one answer; the release is the flight's other round trip. Before,
    # the slot was asked once the claim had answered: three round trips a flight.
    runner, upstream = await serve_handler(v1)
    relay = Relay(own_replicas.space.server.port)
    try:
        async with relay.running() as url:
            space = own_replicas.space
            settings = caching(upstream, own_replicas.tmp_path / "r0", space.settings(url=url))
            (p,) = await own_replicas.start(dataclasses.replace(settings, cache=CacheSettings()))
            cache = p.app[SERVICES].cache
            assert cache is not None
            first = await get(client, p.url + "/v1/things.json")
            assert first[1]["X-Cache"] == "MISS"
            await until(lambda: not cache.tasks, what="the flight's finish")
            before = relay.script_turns()
            for _ in range(5):
                status, headers, _ = await get(client, p.url + "/v1/things.json")
                assert (status, headers["X-Cache"]) == (200, "REVALIDATED")
                await until(lambda: not cache.tasks, what="the flight's finish")
            turns = relay.script_turns() - before
            budget = p.app[SERVICES].budget.account("main")
        assert budget.status()["mode"] == "shared"
        assert turns <= 2 * 5 + 1, turns  # was 3 a flight: claim, then slot, then release
    finally:
        await runner.cleanup()


def slot() -> Any:
    from proxy.shared.base import ClassedAsk, SlotAsk  # (new: the old code fails at the call)

    ask = ClassedAsk("standard", (0, 1, 0), 0.0, (6.0, 3.0, 1.0), 5.0)
    return SlotAsk("main", 100, 10, 61.0, ask)


async def test_only_the_replica_that_gets_the_lock_takes_a_slot(redis_space: RedisSpace) -> None:
    # B asks a slot with its claim while A holds the lock: B is told A's token, no slot is
    # logged and no demand of B's told; once A let go, B's claim takes lock and slot at once.
    log = f"{redis_space.prefix}:budget:main:log"
    demand = f"{redis_space.prefix}:budget:main:demand"
    async with (
        redis_space.backend() as a,
        redis_space.backend() as b,
        redis_space.client() as raw,
    ):
        held = await a.cache_claim("main", "d1", "owner-a", 5.0, 1000)
        assert held.owner == "owner-a"
        waiting = await b.cache_claim("main", "d1", "owner-b", 5.0, 1000, slot=slot())
        assert (waiting.owner, waiting.holder, waiting.taken) == (None, "owner-a", None)
        assert await raw.zcard(log) == 0
        assert await raw.hlen(demand) == 0
        await a.cache_release("main", "d1", "owner-a")
        got = await b.cache_claim("main", "d1", "owner-b", 5.0, 1000, slot=slot())
        assert got.owner == "owner-b"
        assert got.taken is not None and got.taken.wait == 0.0 and got.taken.member
        assert await raw.zcard(log) == 1
        assert await raw.zscore(log, got.taken.member) is not None


async def test_a_slot_taken_with_the_lock_and_not_sent_goes_back(
    replicas: Replicas, client: aiohttp.ClientSession
) -> None:
    # B's revalidation makes the entry fresh in Redis; A's next flight takes the lock (and a
    # slot with it), finds B's entry fresh and answers from it: no upstream request, and the
    # slot goes back to the fleet (the window's log as it was before A's flight).
    served: list[str] = []
    runner, upstream = await serve_handler(fresh_from_the_second(served, b'{"id": 1}'))
    try:
        space = replicas.space
        a, b = await replicas.without_rules(upstream)
        caches = [p.app[SERVICES].cache for p in (a, b)]
        url = "/v1/things.json"

        async def settled() -> None:
            for c in caches:
                assert c is not None
                await until(lambda c=c: not c.tasks, what="the flights' finish")  # type: ignore[misc]

        assert (await get(client, a.url + url))[1]["X-Cache"] == "MISS"
        await settled()
        assert (await get(client, b.url + url))[1]["X-Cache"] == "REVALIDATED"
        await settled()
        log = f"{space.prefix}:budget:main:log"
        async with space.client() as raw:
            sent = await raw.zcard(log)
            third = await get(client, a.url + url)
            assert third[0] == 200
            await settled()
            await until(lambda: not a.app[SERVICES].budget.account("main")._giving, what="give")
            assert await raw.zcard(log) == sent  # the slot A's claim took went back
        assert served == ["", '"v1"']  # A answered from B's entry
    finally:
        await runner.cleanup()
