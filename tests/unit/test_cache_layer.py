"""The cache layer alone: a scripted inner layer below it, a real store on a temporary
directory, and a wall clock the test moves. No sockets: what it sends down and answers up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.cache.fastlook import Startable, Unheld, webhook_rule
from proxy.cache.keys import parse_key
from proxy.cache.layer import Cache
from proxy.cache.metrics import CacheMetrics
from proxy.cache.store import CacheStore
from proxy.errors import UpstreamUnreachable
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.settings import CacheRule, Settings

LIST = "/v1/companies/5/customers.json"


@dataclass
class Clock:
    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Scripted:
    """The layer below: answers from a script, records what it was sent."""

    answers: list[ProxyResponse | Exception] = field(default_factory=list)
    sent: list[ProxyRequest] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        self.sent.append(request)
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def answer(status: int = 200, body: bytes = b"[1]", **headers: str) -> ProxyResponse:
    items = CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()})
    items.setdefault("Content-Length", str(len(body)))
    return ProxyResponse(status=status, headers=items, body=body, upstream_status=status)


def request(method: str = "GET", path: str = LIST, **headers: str) -> ProxyRequest:
    items = CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()})
    return ProxyRequest(method, path, "", CIMultiDictProxy(items), account="main")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CacheStore]:
    opened = await CacheStore.open(tmp_path / "cache", 10**8, 10**7)
    yield opened
    await opened.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def inner() -> Scripted:
    return Scripted()


@pytest.fixture
async def cache(store: CacheStore, inner: Scripted, clock: Clock) -> AsyncIterator[Cache]:
    layer = Cache(inner, store, Settings(), CacheMetrics(CollectorRegistry()), clock)
    yield layer
    await layer.close()


async def body_of(response: ProxyResponse) -> bytes:
    return await response.read()


async def test_a_fresh_answer_is_served_without_asking_below(
    cache: Cache, inner: Scripted, clock: Clock
) -> None:
    inner.answers = [answer(Cache_Control="max-age=60", ETag='"a"')]
    first = await cache.send(request())
    assert (first.cache_status, await body_of(first)) == ("MISS", b"[1]")
    clock.now += 30
    second = await cache.send(request())
    assert (second.cache_status, await body_of(second), second.age) == ("HIT", b"[1]", 30)
    assert len(inner.sent) == 1


async def test_a_stale_answer_is_revalidated_with_its_etag(
    cache: Cache, inner: Scripted, clock: Clock
) -> None:
    inner.answers = [answer(ETag='"a"'), answer(304, b"", ETag='"a"')]
    await body_of(await cache.send(request()))
    clock.now += 5
    again = await cache.send(request())
    assert again.cache_status == "REVALIDATED"
    assert await body_of(again) == b"[1]"
    assert inner.sent[1].headers["If-None-Match"] == '"a"'


async def test_a_flight_on_the_local_tier_leaves_no_task_behind(
    cache: Cache, inner: Scripted, clock: Clock
) -> None:
    """Nothing follows a flight here (no Redis to store in, no fetch lock to let go): once it
    is over no task is spawned for it (one per revalidation, on a hot key)."""
    inner.answers = [answer(ETag='"a"'), answer(304, b"", ETag='"a"')]
    await body_of(await cache.send(request()))
    clock.now += 5
    again = await cache.send(request())
    assert (again.cache_status, await body_of(again)) == ("REVALIDATED", b"[1]")
    assert not cache.tasks


async def test_a_304_for_another_representation_fetches_it_whole(
    cache: Cache, inner: Scripted
) -> None:
    inner.answers = [
        answer(ETag='"a"'),
        answer(304, b"", ETag='"b"'),
        answer(body=b"[2]", ETag='"b"'),
    ]
    await body_of(await cache.send(request()))
    again = await cache.send(request())
    assert await body_of(again) == b"[2]"
    assert "If-None-Match" not in inner.sent[2].headers


async def test_concurrent_misses_share_one_request_below(cache: Cache, inner: Scripted) -> None:
    inner.gate = asyncio.Event()
    inner.answers = [answer(ETag='"a"')]
    waiting = [asyncio.ensure_future(cache.send(request())) for _ in range(5)]
    await asyncio.sleep(0.01)
    inner.gate.set()
    answers = await asyncio.gather(*waiting)
    assert [await body_of(a) for a in answers] == [b"[1]"] * 5
    assert len(inner.sent) == 1


async def test_a_write_invalidates_the_url_and_its_collection(
    cache: Cache, inner: Scripted
) -> None:
    item = "/v1/companies/5/customers/7.json"
    inner.answers = [
        answer(Cache_Control="max-age=60"),
        answer(Cache_Control="max-age=60"),
        answer(body=b"{}"),
        answer(Cache_Control="max-age=60"),
        answer(Cache_Control="max-age=60"),
    ]
    await body_of(await cache.send(request(path=item)))
    await body_of(await cache.send(request()))
    written = await cache.send(request("PUT", item))
    assert written.cache_status == "BYPASS"
    assert (await cache.send(request(path=item))).cache_status == "MISS"
    assert (await cache.send(request())).cache_status == "MISS"
    assert len(inner.sent) == 5


async def test_an_unreachable_origin_gets_the_stored_answer_when_allowed(
    cache: Cache, inner: Scripted, clock: Clock
) -> None:
    inner.answers = [
        answer(Cache_Control="max-age=1, stale-if-error=60"),
        UpstreamUnreachable("refused"),
    ]
    await body_of(await cache.send(request()))
    clock.now += 10
    stale = await cache.send(request())
    assert (stale.cache_status, await body_of(stale)) == ("STALE", b"[1]")


async def test_no_store_answers_are_never_reused(cache: Cache, inner: Scripted) -> None:
    inner.answers = [answer(Cache_Control="no-store"), answer(Cache_Control="no-store")]
    for _ in range(2):  # BYPASS: not a cacheable answer (docs/cache.md)
        assert (await cache.send(request())).cache_status == "BYPASS"
    assert len(inner.sent) == 2


async def test_an_error_answer_is_passed_on_and_not_stored(cache: Cache, inner: Scripted) -> None:
    inner.answers = [answer(503, b"down"), answer(ETag='"a"')]
    failed = await cache.send(request())
    assert (failed.status, await body_of(failed)) == (503, b"down")
    assert (await cache.send(request())).status == 200
    assert len(inner.sent) == 2


async def test_a_304_freshens_memory_at_once_and_the_disk_record_once_a_second(
    cache: Cache, store: CacheStore, inner: Scripted, clock: Clock
) -> None:
    # A key revalidated on every request: each 304 from Kounta freshens the entry in memory
    # at once, its disk record at most once a second (proxy.cache.freshen); answers unchanged.
    ticks = [0.0]
    cache.entries.freshen.clock = lambda: ticks[0]  # the throttle's own monotonic clock
    inner.answers = [answer(ETag='"a"'), *(answer(304, b"", ETag='"a"') for _ in range(4))]
    assert await body_of(await cache.send(request())) == b"[1]"
    [key] = store.hot.items
    body = store.hot.items[key].body

    async def on_disk() -> float:
        await store.flush()
        return (await store._run(store.disk.get, key)).entry.response_time

    stored_at = clock.now
    assert await on_disk() == stored_at
    for seconds in (0.0, 0.5, 0.9, 1.0):  # three 304s within a second, then one a second on
        ticks[0] = seconds
        clock.now += 5
        again = await cache.send(request())
        assert (again.status, await body_of(again)) == (200, b"[1]")
        assert again.cache_status == "REVALIDATED"
        assert store.hot.items[key].entry.response_time == clock.now  # memory: every 304
        assert store.hot.items[key].body is body  # its metadata only: the body kept as is
        if seconds in (0.0, 1.0):
            stored_at = clock.now
        assert await on_disk() == stored_at, seconds  # disk: the first, then a second later
    assert len(inner.sent) == 5  # every request still asked Kounta


async def test_a_freshened_entry_not_held_in_memory_is_written_through(
    tmp_path: Path, inner: Scripted, clock: Clock
) -> None:
    # No memory tier: the disk is the only copy, so every 304 reaches it (never a staler
    # record answering while a fresher one was dropped).
    store = await CacheStore.open(tmp_path / "nomem", 10**8, 0)
    cache = Cache(inner, store, Settings(), CacheMetrics(CollectorRegistry()), clock)
    try:
        inner.answers = [answer(ETag='"a"'), *(answer(304, b"", ETag='"a"') for _ in range(2))]
        await body_of(await cache.send(request()))
        for _ in range(2):
            clock.now += 5
            assert await body_of(await cache.send(request())) == b"[1]"
            await store.flush()
            keys = await store._run(lambda: list(store.disk.iterkeys()))
            [key] = [k for k in keys if isinstance(k, str) and parse_key(k)]
            assert (await store._run(store.disk.get, key)).entry.response_time == clock.now
    finally:
        await cache.close()
        await store.close()


async def test_a_flight_started_at_the_edge_is_sent_below_before_start_returns(
    cache: Cache, inner: Scripted, clock: Clock
) -> None:
    """The fast path's starter (FastLook.start) is called while the loop handles the requests
    it read in one turn: its flight's first step runs within that call (an eager task), so its
    request is out below before the others are looked at (they join it meanwhile), and the
    task is the current one for that step (aiohttp's timeouts cancel current_task())."""
    inner.answers = [answer(ETag='"a"'), answer(304, b"", ETag='"a"')]
    await body_of(await cache.send(request()))
    clock.now += 5
    seen: list[asyncio.Task[object] | None] = []
    send = inner.send

    async def noting(sent: ProxyRequest) -> ProxyResponse:
        seen.append(asyncio.current_task())
        return await send(sent)

    inner.send = noting  # type: ignore[method-assign]
    inner.gate = asyncio.Event()
    found = cache.fast.find("main", LIST, "", CIMultiDictProxy(CIMultiDict()))
    assert isinstance(found, Startable)
    pending = cache.fast.start(found, request())
    assert [r.headers.get("If-None-Match") for r in inner.sent] == [None, '"a"']  # at once
    assert seen == [t for t in cache.tasks if t in seen] and len(seen) == 1
    assert seen[0] is not None and seen[0] is not asyncio.current_task()
    inner.gate.set()
    outcome = await cache.fast.wait(pending)
    assert not isinstance(outcome, Exception) and outcome.cache_status == "REVALIDATED"
    assert len(inner.sent) == 2


async def test_the_key_made_from_the_selecting_values_read_is_the_headers_key(
    cache: Cache, inner: Scripted
) -> None:
    """FastLook.find given the selecting headers' values (read by the fast path's one pass
    over the headers) finds what the headers' own key finds, without reading them again."""
    inner.answers = [answer(Cache_Control="max-age=60", ETag='"a"')]
    await body_of(await cache.send(request(Accept="application/json", X_Page="2")))
    bare = CIMultiDictProxy(CIMultiDict())
    found = cache.fast.find("main", LIST, "", bare, None, ("application/json", None, "2"))
    assert isinstance(found, tuple) and found[2] == b"[1]"
    assert isinstance(cache.fast.find("main", LIST, "", bare), Unheld)  # the headers' key
    other = cache.fast.find("main", LIST, "", bare, None, ("application/json", None, None))
    assert isinstance(other, Unheld)


async def test_a_paths_webhook_rule_is_looked_up_once_per_rules(
    cache: Cache, inner: Scripted
) -> None:
    """Whether a fast hit's path has a webhook rule is remembered per path while the rules
    stay the same object (no hashing of the rules per request); new rules (a reload) are
    asked again."""
    inner.answers = [answer(Cache_Control="max-age=60", ETag='"a"')]
    await body_of(await cache.send(request()))
    bare = CIMultiDictProxy(CIMultiDict())
    assert isinstance(cache.fast.find("main", LIST, "", bare), tuple)
    asked = webhook_rule.cache_info()
    assert isinstance(cache.fast.find("main", LIST, "", bare), tuple)
    assert webhook_rule.cache_info() == asked
    hooked = (CacheRule(path="/v1/companies/*/customers", webhooks=True),)
    cache.fast.rules = lambda: hooked
    assert cache.fast.find("main", LIST, "", bare) is None  # the long way: the feed decides
    plain = (CacheRule(path="/v1/companies/*/customers"),)
    cache.fast.rules = lambda: plain
    assert isinstance(cache.fast.find("main", LIST, "", bare), tuple)
