"""Joiners of a revalidation in flight on the fast path (proxy.edge.fast.FastPath.join).

An upstream of the test's own holds each revalidation until the test lets it answer, so
requests can be made to join it: some plain (the fast path), some with an unknown Pragma
(the long way, joining the same flight). Both kinds must give the same answers, counts and
access lines, and the upstream must be asked once per flight whatever way the joiners took.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.cache.fastlook import Pending
from proxy.cache.flight import Flight
from proxy.settings import CacheSettings, RetrySettings, ServerSettings
from tests.conftest import MakeProxy, Proxy, proxy_settings, serve_handler
from tests.integration.test_fast_path import LongWay, get, steady

PATH = "/v1/things.json"
ROUTE = "other"  # not a Kounta route the proxy knows
Answer = tuple[int, CIMultiDictProxy[str], bytes]


@dataclass
class Origin:
    """ETag ``etag``, no freshness (every request revalidates); a revalidation waits for
    ``gate``. ``reply`` overrides the answer to a revalidation (status, ETag)."""

    url: str = ""
    etag: str = '"v1"'
    body: bytes = b'{"things": [' + b'"thing", ' * 400 + b'"last"]}'
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    asked: asyncio.Event = field(default_factory=asyncio.Event)
    reply: tuple[int, str] | None = None
    served: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # X-Request-ID of each request
    coding: str | None = None  # the body's Content-Encoding

    async def handle(self, request: web.Request) -> web.Response:
        self.served.append(request.headers.get("If-None-Match", "-"))
        self.ids.append(request.headers.get("X-Request-ID", "-"))
        headers = {"ETag": self.etag, "Content-Type": "application/json", "X-Next-Page": ""}
        headers["X-Next-Page"] = f"{self.url}{PATH}?page=2"
        if self.coding is not None:
            headers["Content-Encoding"] = self.coding
        if request.headers.get("If-None-Match") is None:
            return web.Response(body=self.body, headers=headers)
        self.asked.set()
        await self.gate.wait()
        if self.reply is not None:
            status, etag = self.reply
            headers["ETag"] = etag
            body = b'{"error": "busy"}' if status >= 500 else self.body.replace(b"last", b"new")
            return web.Response(status=status, body=body, headers=headers)
        if request.headers["If-None-Match"] == self.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, headers=headers)


@dataclass
class Setup:
    proxy: Proxy
    origin: Origin
    long_way: LongWay

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.proxy.registry.get_sample_value(name, labels or {}) or 0.0

    def hold(self, path: str = PATH) -> str:
        """The next revalidation waits at the upstream until ``origin.gate`` is set; the URL."""
        self.origin.gate.clear()
        self.origin.asked.clear()
        return self.proxy.url + path

    async def waiting(self, count: int) -> None:
        """Until ``count`` requests are in flight (each waiting, the fast way or the long)."""
        in_flight = "kounta_proxy_requests_in_flight"
        for _ in range(500):
            if self.sample(in_flight) == count:
                break
            await asyncio.sleep(0.01)
        assert self.sample(in_flight) == count


@pytest.fixture
def server_settings() -> dict[str, Any]:
    """The proxy's ``[server]`` settings beyond the defaults (a test parametrizes it)."""
    return {}


@pytest.fixture
async def setup(
    make_proxy: MakeProxy,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    server_settings: dict[str, Any],
) -> AsyncIterator[Setup]:
    origin = Origin()
    runner, origin.url = await serve_handler(origin.handle)
    server = ServerSettings(host="127.0.0.1", port=0, **server_settings)
    settings = proxy_settings(
        origin.url, tmp_path, cache=CacheSettings(), retry=RetrySettings(attempts=1), server=server
    )
    p = await make_proxy(settings)
    long_way = LongWay(p)
    status, headers, _ = await get(client, p.url + PATH)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    yield Setup(p, origin, long_way)
    origin.gate.set()
    await runner.cleanup()


async def one_flight(
    s: Setup,
    client: aiohttp.ClientSession,
    joiners: list[dict[str, str]],
    starter_headers: dict[str, str] | None = None,
    path: str = PATH,
) -> tuple[Answer, list[Answer]]:
    """A starter's revalidation held at the upstream, ``joiners`` sent meanwhile and all
    waiting, then the upstream lets it answer: the starter's answer and theirs."""
    url = s.hold(path)
    sent = {"X-Request-ID": "the-starter"} if starter_headers is None else starter_headers
    starter = asyncio.ensure_future(get(client, url, **sent))
    await asyncio.wait_for(s.origin.asked.wait(), 10)
    waiting: list[Awaitable[Answer]] = [get(client, url, **h) for h in joiners]
    tasks = [asyncio.ensure_future(w) for w in waiting]
    await s.waiting(1 + len(joiners))
    s.origin.gate.set()
    return await starter, list(await asyncio.gather(*tasks))


def access_lines(caplog: pytest.LogCaptureFixture) -> dict[str, dict[str, Any]]:
    """The access lines logged so far, by request id."""
    return {
        r.fields["request_id"]: r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "request"
    }


SLOW = {"Pragma": "x-whatever"}  # changes nothing but the way the request takes


async def test_joiners_of_a_revalidation_skip_the_long_way_and_answer_the_same(
    setup: Setup, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    s, etag = setup, setup.origin.etag
    inm = {"If-None-Match": etag}
    plain_gzip = {"Accept-Encoding": "identity"}
    joiners = [{}, {}, inm, plain_gzip, {**SLOW}, {**SLOW, **inm}, {**SLOW, **plain_gzip}]
    before = s.long_way.count
    starter, answers = await one_flight(s, client, joiners)
    # The three Pragma joiners went the long way; the plain starter and joiners not.
    assert s.long_way.count - before == 3
    assert s.origin.served == ["-", etag]  # one revalidation for all eight
    fast, slow = answers[:4], answers[4:]
    assert starter[0] == 200 and starter[2] == s.origin.body
    for status, headers, body in [starter, *answers]:
        assert headers["X-Cache"] == "REVALIDATED"
        assert headers["Cache-Status"] == "kounta-proxy; fwd=stale; fwd-status=304"
        assert headers["Server"] == "kounta-proxy"
        assert headers["X-Next-Page"] == f"{s.proxy.url}{PATH}?page=2"  # onto the proxy
        assert int(headers["Age"]) >= 0
        assert body == (b"" if status == 304 else s.origin.body)
    # Same status, body and headers (same order), the fast way and the long way.
    for (fast_status, fast_headers, fast_body), (status, headers, body) in zip(
        [fast[1], fast[2], fast[3]], slow, strict=True
    ):
        assert (fast_status, fast_body) == (status, body)
        assert steady(fast_headers) == steady(headers)
    assert steady(fast[0][1]) == steady(starter[1])
    assert [a[0] for a in answers] == [200, 200, 304, 200, 200, 304, 200]
    assert fast[2][1]["ETag"] == etag and "Content-Type" not in fast[2][1]
    # Counted as the long way counts a joiner: coalesced, a revalidated lookup each.
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 7
    lookups = {"result": "revalidated", "reason": "not_modified"}
    assert s.sample("kounta_proxy_cache_lookups_total", lookups) == 8
    labels = {"method": "GET", "route": ROUTE, "cache": "REVALIDATED", "account": "main"}
    assert s.sample("kounta_proxy_requests_total", {**labels, "status_class": "2xx"}) == 6
    assert s.sample("kounta_proxy_requests_total", {**labels, "status_class": "3xx"}) == 2
    assert s.sample("kounta_proxy_requests_in_flight") == 0
    lines = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    by_id = {line["request_id"]: line for line in lines}
    starter_line = by_id["the-starter"]
    assert starter_line["fetched_by"] is None and starter_line["upstream_ms"] is not None
    for _, headers, body in answers:
        line = by_id[headers["X-Request-ID"]]
        assert (line["cache"], line["upstream_status"]) == ("REVALIDATED", 304)
        assert line["fetched_by"] == "the-starter"
        assert line["upstream_ms"] == starter_line["upstream_ms"]
        assert (line["bytes"], line["route"]) == (len(body), ROUTE)
        assert line["ms"] > 0


async def test_the_starter_of_a_revalidation_skips_the_long_way_and_answers_the_same(
    setup: Setup, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # Four flights, each started by the first request (a plain one, then its Pragma twin:
    # the long way) and joined by a plain one; the 200 twice, then the caller's 304 twice.
    s, etag = setup, setup.origin.etag
    inm = {"If-None-Match": etag}
    starts = [{}, {**SLOW}, {**inm}, {**SLOW, **inm}]
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    went, answered = [], []
    for number, headers in enumerate(starts):
        before = s.long_way.count
        rid = f"starter-{number}"
        starter, joiners = await one_flight(s, client, [{}], {"X-Request-ID": rid, **headers})
        went.append(s.long_way.count - before)
        answered.append(starter)
        assert joiners[0][0] == 200 and joiners[0][1]["X-Cache"] == "REVALIDATED"
    assert went == [0, 1, 0, 1]  # only the Pragma starters went the long way
    assert s.origin.served == ["-"] + [etag] * 4  # one revalidation per flight
    assert [a[0] for a in answered] == [200, 200, 304, 304]
    for (fast_status, fast_headers, fast_body), (status, headers, body) in (
        (answered[0], answered[1]),
        (answered[2], answered[3]),
    ):
        assert (fast_status, fast_body) == (status, body)
        assert steady(fast_headers) == steady(headers)  # same headers, same order
        assert headers["X-Cache"] == "REVALIDATED"
        assert headers["Cache-Status"] == "kounta-proxy; fwd=stale; fwd-status=304"
        assert int(headers["Age"]) >= 0
    assert answered[0][2] == s.origin.body and answered[2][2] == b""
    assert answered[2][1]["ETag"] == etag
    # Counted as the long way counts a starter: a revalidated lookup, nothing coalesced
    # but the joiners.
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 4
    lookups = {"result": "revalidated", "reason": "not_modified"}
    assert s.sample("kounta_proxy_cache_lookups_total", lookups) == 8
    assert s.sample("kounta_proxy_requests_in_flight") == 0
    lines = access_lines(caplog)
    fast_200, slow_200, fast_304, slow_304 = (lines[f"starter-{n}"] for n in range(4))
    for fast, slow in ((fast_200, slow_200), (fast_304, slow_304)):
        for name in ("status", "cache", "upstream_status", "bytes", "route", "fetched_by"):
            assert fast[name] == slow[name], name
        assert fast["fetched_by"] is None and fast["upstream_ms"] is not None
        assert (fast["cache"], fast["upstream_status"]) == ("REVALIDATED", 304)
    assert s.origin.ids[1:] == [f"starter-{n}" for n in range(4)]


@pytest.mark.parametrize(
    ("reply", "expected", "reason"),
    [((200, '"v2"'), (200, "MISS"), "changed"), ((503, '"v1"'), (503, "MISS"), "upstream_503")],
    ids=["changed", "failed"],
)
async def test_a_flight_that_did_not_freshen_hands_its_starter_and_joiners_to_the_long_way(
    setup: Setup,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    reply: tuple[int, str],
    expected: tuple[int, str],
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    s = setup
    s.origin.reply = reply
    before = s.long_way.count
    starter, answers = await one_flight(s, client, [{}, {}, {**SLOW}], starter_headers={})
    # Each went the long way once (the plain ones after waiting at the edge), and the
    # upstream was asked once: nobody fetched again after the flight.
    assert s.long_way.count - before == 4
    assert s.origin.served == ["-", s.origin.etag]
    for status, headers, _ in [starter, *answers]:
        assert (status, headers["X-Cache"]) == expected
    (status, headers, body), slow = answers[0], answers[2]
    assert (status, body) == (slow[0], slow[2])
    assert steady(headers) == steady(slow[1])
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 3
    lookups = {"result": "miss", "reason": reason}
    assert s.sample("kounta_proxy_cache_lookups_total", lookups) == 4
    assert s.sample("kounta_proxy_requests_in_flight") == 0
    # The starter (no X-Request-ID of its own) keeps one id: the one Kounta saw, answered
    # and logged as its own fetch.
    rid = starter[1]["X-Request-ID"]
    assert s.origin.ids[-1] == rid
    lines = access_lines(caplog)
    line = lines[rid]
    assert (line["status"], line["upstream_status"], line["fetched_by"]) == (status, reply[0], None)
    assert line["upstream_ms"] is not None
    for _, joiner, _ in answers:
        assert lines[joiner["X-Request-ID"]]["fetched_by"] == rid


async def test_a_joiner_that_gives_up_waits_once(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    origin = Origin()
    runner, origin.url = await serve_handler(origin.handle)
    try:
        cache = CacheSettings(coalesce_wait=0.3)
        settings = proxy_settings(
            origin.url, tmp_path, cache=cache, retry=RetrySettings(attempts=1)
        )
        p = await make_proxy(settings)
        await get(client, p.url + PATH)
        s = Setup(p, origin, LongWay(p))
        url = p.url + PATH
        starter = asyncio.ensure_future(get(client, url))
        await asyncio.wait_for(origin.asked.wait(), 10)
        loop = asyncio.get_running_loop()
        began = loop.time()
        # Its wait times out; it goes alone (a second revalidation, also held) once.
        joiner = asyncio.ensure_future(get(client, url))
        for _ in range(500):
            if len(origin.served) == 3:
                break
            await asyncio.sleep(0.01)
        gave_up = loop.time() - began
        assert len(origin.served) == 3
        assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "gave_up"}) == 1
        assert gave_up < 0.3 * 2  # one coalesce_wait, not one at the edge and another
        origin.gate.set()
        for status, headers, _ in (await starter, await joiner):
            assert (status, headers["X-Cache"]) == (200, "REVALIDATED")
        assert s.long_way.count == 1  # the joiner after its one wait (the starter: fast)
    finally:
        origin.gate.set()
        await runner.cleanup()


async def test_a_joiner_whose_caller_hangs_up_is_a_499_either_way(
    setup: Setup, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    s = setup
    url = s.hold()
    starter = asyncio.ensure_future(get(client, url))
    await asyncio.wait_for(s.origin.asked.wait(), 10)
    before = s.long_way.count
    leaving = [
        asyncio.ensure_future(get(client, url, **{"X-Request-ID": rid, **headers}))
        for rid, headers in (("fast-leaver", {}), ("slow-leaver", SLOW))
    ]
    await s.waiting(3)  # both wait with the starter
    for task in leaving:
        task.cancel()
    await asyncio.gather(*leaving, return_exceptions=True)
    loop = asyncio.get_running_loop()
    began = loop.time()
    while s.sample("kounta_proxy_requests_in_flight") > 1:  # the starter's still waits
        assert loop.time() - began < 5
        await asyncio.sleep(0.01)
    s.origin.gate.set()
    status, headers, _ = await starter
    assert (status, headers["X-Cache"]) == (200, "REVALIDATED")
    assert s.long_way.count - before == 1  # the slow one; the fast one never went there
    labels = {"method": "GET", "route": ROUTE, "cache": "-", "account": "main"}
    assert s.sample("kounta_proxy_requests_total", {**labels, "status_class": "4xx"}) == 2
    lines = access_lines(caplog)
    for rid in ("fast-leaver", "slow-leaver"):
        assert (lines[rid]["status"], lines[rid]["cache"]) == (499, "-")
    assert s.origin.served == ["-", s.origin.etag]
    assert s.sample("kounta_proxy_requests_in_flight") == 0


async def test_a_starter_whose_caller_hangs_up_is_a_499_and_its_flight_goes_on(
    setup: Setup, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    s, url = setup, setup.hold()
    before = s.long_way.count
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    leaver = asyncio.ensure_future(get(client, url, **{"X-Request-ID": "leaver"}))
    await asyncio.wait_for(s.origin.asked.wait(), 10)
    joiner = asyncio.ensure_future(get(client, url))  # joins the leaver's flight
    await s.waiting(2)
    leaver.cancel()
    await asyncio.gather(leaver, return_exceptions=True)
    s.origin.gate.set()
    status, headers, body = await joiner  # the flight went on without its starter
    assert (status, headers["X-Cache"], body) == (200, "REVALIDATED", s.origin.body)
    assert s.origin.served == ["-", s.origin.etag]
    assert s.long_way.count == before
    loop = asyncio.get_running_loop()
    began = loop.time()
    while "leaver" not in access_lines(caplog):
        assert loop.time() - began < 5
        await asyncio.sleep(0.01)
    line = access_lines(caplog)["leaver"]
    assert (line["status"], line["cache"]) == (499, "-")
    assert s.sample("kounta_proxy_requests_in_flight") == 0


async def test_a_failure_starting_at_the_edge_leaves_the_starter_to_the_long_way(
    setup: Setup, client: aiohttp.ClientSession
) -> None:
    s = setup
    s.origin.gate.set()

    def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    s.long_way.fast.cache.fast.start = broken  # type: ignore[method-assign]
    before = s.long_way.count
    status, headers, body = await get(client, s.proxy.url + PATH)
    assert (status, headers["X-Cache"], body) == (200, "REVALIDATED", s.origin.body)
    assert s.long_way.count - before == 1
    assert s.origin.served == ["-", s.origin.etag]  # asked once, by the long way


async def raw_answer(url: str, *lines: str) -> bytes:
    """The whole answer, as sent, to a GET of PATH with these header lines (then closed)."""
    host = url.removeprefix("http://")
    address, port = host.split(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    head = "".join(f"{line}\r\n" for line in (f"Host: {host}", *lines, "Connection: close"))
    writer.write(f"GET {PATH} HTTP/1.1\r\n{head}\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def masked(answer: bytes) -> bytes:
    """``answer`` with the values that differ per answer (Date, Age) blanked."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = [
        line.split(b":")[0] + b": -" if line.lower().startswith((b"date:", b"age:")) else line
        for line in head.split(b"\r\n")
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def test_a_starters_304_is_the_long_ways_byte_for_byte(setup: Setup) -> None:
    s = setup
    s.origin.gate.set()
    stored = await raw_answer(s.proxy.url)  # its own key (no Accept): stored
    assert b"\r\nX-Cache: MISS\r\n" in stored
    lines = (f"If-None-Match: {s.origin.etag}", "X-Request-ID: same-id")
    before = s.long_way.count
    fast = await raw_answer(s.proxy.url, *lines)  # starts its flight at the edge
    assert s.long_way.count == before
    slow = await raw_answer(s.proxy.url, *lines, "Pragma: x-whatever")  # the long way's
    assert s.long_way.count == before + 1
    assert fast.startswith(b"HTTP/1.1 304 Not Modified\r\n")
    assert fast.endswith(b"\r\n\r\n")  # no body
    assert masked(fast) == masked(slow)
    assert b"\r\nX-Cache: REVALIDATED\r\n" in fast
    assert s.origin.served == ["-", "-", s.origin.etag, s.origin.etag]  # one revalidation each


async def test_joiners_share_one_start_and_answer_the_same_with_the_access_log_off(
    setup: Setup, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # The access line's record is made only when it is written; the joiners' lookup and
    # decision once per flight (Flight.joining): same answers and counts as the long way's.
    caplog.set_level(logging.WARNING, logger="kounta_proxy")
    s, etag = setup, setup.origin.etag
    fast = s.long_way.fast
    seen: list[Pending] = []
    park = fast._park

    def recording(head: Any, asked: Any, pending: Pending) -> Any:
        seen.append(pending)  # joiners wait in the protocol (Parked)
        return park(head, asked, pending)

    fast._park = recording  # type: ignore[method-assign]
    inm = {"If-None-Match": etag}
    starter, answers = await one_flight(s, client, [{}, inm, {}, {**SLOW}, {**SLOW, **inm}])
    assert len(seen) == 3 and all(p is seen[0] for p in seen)
    assert not seen[0].starter and seen[0].flight.joining is seen[0]
    assert s.origin.served == ["-", etag]
    assert [a[0] for a in answers] == [200, 304, 200, 200, 304]
    for (status, headers, body), (slow_status, slow_headers, slow_body) in (
        (answers[0], answers[3]),
        (answers[1], answers[4]),
    ):
        assert (status, body) == (slow_status, slow_body)
        assert steady(headers) == steady(slow_headers)
    assert steady(answers[0][1]) == steady(starter[1])
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 5
    lookups = {"result": "revalidated", "reason": "not_modified"}
    assert s.sample("kounta_proxy_cache_lookups_total", lookups) == 6
    assert s.sample("kounta_proxy_requests_in_flight") == 0
    assert not access_lines(caplog)


def awaited_from(coro: Any) -> list[str]:
    """The coroutines a task's coroutine awaits through, outermost first."""
    chain = []
    while asyncio.iscoroutine(coro):
        chain.append(coro.cr_code.co_qualname)
        coro = coro.cr_await
    return chain


async def test_a_joiner_and_the_starter_wait_in_no_task(
    setup: Setup, client: aiohttp.ClientSession
) -> None:
    # Most requests of a revalidated key are joiners: each waits in its connection's
    # protocol (FastPath.answer_now, Parked) for the flight's wake-up, and the starter for
    # the flight's head, with no task or coroutine of their own. Same answers.
    s = setup
    url = s.hold()
    starter = asyncio.ensure_future(get(client, url))
    await asyncio.wait_for(s.origin.asked.wait(), 10)
    joiner = asyncio.ensure_future(get(client, url))
    await s.waiting(2)
    chains = [awaited_from(task.get_coro()) for task in asyncio.all_tasks()]
    assert not [c for c in chains if "FastPath._settle" in c or "FastPath.start" in c], chains
    s.origin.gate.set()
    for status, headers, _ in (await starter, await joiner):
        assert (status, headers["X-Cache"]) == (200, "REVALIDATED")
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 1
    assert s.origin.served == ["-", s.origin.etag]


async def test_parked_joiners_are_called_by_their_flight_with_no_future_each(
    setup: Setup, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A joiner waiting in its connection's protocol is called back by its flight's wake-up
    # itself (Flight.call): no future of its own (Flight.waiter) to make, resolve and hear
    # back from a turn later. Same answers and counts.
    made: list[float] = []
    waiter = Flight.waiter

    def counted(flight: Flight, patience: float) -> asyncio.Future[None]:
        made.append(patience)
        return waiter(flight, patience)

    monkeypatch.setattr(Flight, "waiter", counted)
    s = setup
    before = s.long_way.count
    starter, joiners = await one_flight(s, client, [{}, {}, {}])
    for status, headers, _ in [starter, *joiners]:
        assert (status, headers["X-Cache"]) == (200, "REVALIDATED")
    assert made == []
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 3
    assert s.origin.served == ["-", s.origin.etag]
    assert s.long_way.count == before


async def test_a_flights_joiners_share_what_their_answers_have_in_common(
    setup: Setup,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FastLook.joined: whether the outcome can be answered here, the lookups' count and a
    # caller's 304 headers are made once per flight (Flight.answering), not once a joiner;
    # the answers, counts and access lines as before.
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    s, etag = setup, setup.origin.etag
    looked = s.long_way.fast.cache.fast
    lookups = looked.answers.metrics.cache_lookups
    asked: list[tuple[object, ...]] = []
    labels = lookups.labels

    def counting(*values: object) -> Any:
        asked.append(values)
        return labels(*values)

    monkeypatch.setattr(lookups, "labels", counting)
    inm = {"If-None-Match": etag}
    joiners = [{"X-Request-ID": f"j{i}", **(inm if i % 2 else {})} for i in range(4)]
    starter, answers = await one_flight(s, client, joiners)
    assert s.origin.served == ["-", etag]
    assert starter[0] == 200 and [a[0] for a in answers] == [200, 304, 200, 304]
    assert all(a[1]["X-Cache"] == "REVALIDATED" for a in [starter, *answers])
    assert answers[0][2] == answers[2][2] == starter[2] and answers[1][2] == b""
    assert answers[1][1]["ETag"] == answers[3][1]["ETag"] == etag
    assert asked.count(("revalidated", "not_modified")) == 1  # was one an answer (5)
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 4
    revalidated = {"result": "revalidated", "reason": "not_modified"}
    assert s.sample("kounta_proxy_cache_lookups_total", revalidated) == 5
    lines = access_lines(caplog)
    assert [lines[f"j{i}"]["fetched_by"] for i in range(4)] == ["the-starter"] * 4
    assert lines["the-starter"]["fetched_by"] is None


async def test_a_wake_ups_joiners_are_answered_from_what_they_share_worked_out_once(
    setup: Setup,
    monkeypatch: pytest.MonkeyPatch,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # proxy.edge.together: the clock (Age), Date, Cache-Status member and each shape's head
    # are worked out once per wake-up, not once a joiner; joiners of different shapes (a
    # 200 taking gzip, one not, a caller's 304) in one flight answer as the long way does.
    s, etag = setup, setup.origin.etag
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    reads: list[float] = []
    looked = s.long_way.fast.cache.fast
    clock = looked.clock

    def counting() -> float:
        now = clock()
        reads.append(now)
        return now

    inm = {"If-None-Match": etag}
    plain = {"Accept-Encoding": "identity"}
    shapes: list[dict[str, str]] = [{}, inm, plain, {}, inm, plain]
    joiners = [{"X-Request-ID": f"j{i}", **h} for i, h in enumerate(shapes)]
    url = s.hold()
    starter = asyncio.ensure_future(get(client, url, **{"X-Request-ID": "the-starter"}))
    await asyncio.wait_for(s.origin.asked.wait(), 10)
    tasks = [asyncio.ensure_future(get(client, url, **h)) for h in joiners]
    await s.waiting(1 + len(joiners))
    monkeypatch.setattr(looked, "clock", counting)
    s.origin.gate.set()
    first = await starter
    answers = list(await asyncio.gather(*tasks))
    # the starter's answer reads the clock once, the six joiners' wake-up once (was 7)
    assert len(reads) == 2
    assert [a[0] for a in answers] == [200, 304, 200, 200, 304, 200]
    assert all(a[1]["X-Cache"] == "REVALIDATED" for a in [first, *answers])
    assert len({a[1]["Age"] for a in answers}) == 1
    assert len({a[1]["Date"] for a in answers}) <= 2  # a second may turn
    assert [a[1]["X-Request-ID"] for a in answers] == [f"j{i}" for i in range(6)]
    slow = [await get(client, url, **{**SLOW, **h}) for h in ({}, inm, plain)]
    for i, (status, headers, body) in enumerate(slow):
        for mine in (answers[i], answers[i + 3]):
            assert (mine[0], mine[2]) == (status, body)
            assert steady(mine[1]) == steady(headers)
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 6
    lines = access_lines(caplog)
    assert [lines[f"j{i}"]["fetched_by"] for i in range(6)] == ["the-starter"] * 6
    assert [lines[f"j{i}"]["status"] for i in range(6)] == [200, 304, 200, 200, 304, 200]
    assert s.sample("kounta_proxy_requests_in_flight") == 0


async def test_a_wake_ups_shape_without_a_template_is_rendered_the_long_way(
    setup: Setup, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shape with no template (a stored header holding a slot's text: edge.rendered) is
    # rendered by FastPath._respond for each joiner of the wake-up: the same answers.
    import proxy.edge.together

    monkeypatch.setattr(proxy.edge.together, "template", lambda *_: None)
    s, inm = setup, {"If-None-Match": setup.origin.etag}
    fast = s.long_way.fast
    rendered: list[int] = []
    respond = fast._respond

    def recording(head: Any, asked: Any, answer: Any, *rest: Any) -> Any:
        rendered.append(answer[0])
        return respond(head, asked, answer, *rest)

    monkeypatch.setattr(fast, "_respond", recording)
    _, answers = await one_flight(s, client, [{}, inm, {}])
    assert [a[0] for a in answers] == [200, 304, 200]
    assert sorted(rendered) == [200, 200, 200, 304]  # the starter's too (FastPath._joined)
    slow = [await get(client, s.proxy.url + PATH, **{**SLOW, **h}) for h in ({}, inm)]
    for mine, theirs in ((answers[0], slow[0]), (answers[1], slow[1]), (answers[2], slow[0])):
        assert (mine[0], mine[2]) == (theirs[0], theirs[2])
        assert steady(mine[1]) == steady(theirs[1])
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 3
    assert s.sample("kounta_proxy_requests_in_flight") == 0
