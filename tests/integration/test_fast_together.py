"""Every fast answer from a flight's outcome made by one mechanism (proxy.edge.together): a
wake-up's joiners together, and one request as a wake-up of one (the flight's starter, a
joiner answered in a request's task), at info and at debug level (each joiner's
``cache_lookup`` line in its own context); the same answers, counts and lines as before."""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
from typing import Any

import aiohttp
import pytest

from proxy.edge.together import Together
from tests.integration.test_fast_joiners import (
    PATH,
    SLOW,
    Setup,
    access_lines,
    one_flight,
    server_settings,  # noqa: F401 (a fixture)
    setup,  # noqa: F401 (a fixture)
)
from tests.integration.test_fast_path import get
from tests.integration.test_fast_protocol import GZIP, Handlers, answer, ask, connect, field
from tests.integration.test_fast_protocol import steady as steady_bytes


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["info", "debug"])
async def test_every_answer_from_a_flight_is_a_wake_ups_answer(
    level: int,
    setup: Setup,  # noqa: F811
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(level, logger="kounta_proxy")
    s, etag = setup, setup.origin.etag
    answered: list[str] = []
    together = Together.answer

    def recording(self: Any, head: Any, asked: Any, noted: Any) -> Any:
        answered.append(asked.request_id)
        return together(self, head, asked, noted)

    monkeypatch.setattr(Together, "answer", recording)
    looked = s.long_way.fast.cache.fast
    clock, reads = looked.clock, []

    def counting() -> float:
        reads.append(now := clock())
        return now

    url = s.hold()
    starter = asyncio.ensure_future(get(client, url, **{"X-Request-ID": "the-starter"}))
    await asyncio.wait_for(s.origin.asked.wait(), 10)
    inm = {"If-None-Match": etag}
    joiners = [
        asyncio.ensure_future(get(client, url, **{"X-Request-ID": f"j{i}", **h}))
        for i, h in enumerate(({}, inm, {}))
    ]
    # A joiner queued behind another request on its connection: answered in its task (a
    # web.Response), its wait in the handler (FastPath.join).
    handlers = Handlers(s.proxy)
    reader, writer = await connect(s.proxy)
    writer.write(ask("first", GZIP, path=f"{PATH}?other=1") + ask("in-task", GZIP, path=PATH))
    assert field(await answer(reader), b"X-Cache") == b"MISS"
    await s.waiting(5)
    monkeypatch.setattr(looked, "clock", counting)
    s.origin.gate.set()
    mine = await answer(reader)
    first = await starter
    answers = list(await asyncio.gather(*joiners))
    assert handlers.count == 2  # "first" and "in-task" in the handler's task
    assert s.origin.served == ["-", etag, "-"]  # one revalidation ("first" a miss of its own)
    assert [first[0], *(a[0] for a in answers)] == [200, 200, 304, 200]
    assert mine.startswith(b"HTTP/1.1 200 OK\r\n")
    assert all(a[1]["X-Cache"] == "REVALIDATED" for a in [first, *answers])
    assert field(mine, b"X-Cache") == b"REVALIDATED"
    # The clock read once per wake-up: the starter's, the three parked joiners' (at debug
    # level too: was once a joiner), the task's joiner's; each of the five answers made by
    # the one mechanism, once.
    assert len(reads) == 3
    assert sorted(answered) == ["in-task", "j0", "j1", "j2", "the-starter"]
    # Counted as the long way counts: a revalidated lookup each, the joiners coalesced.
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 4
    revalidated = {"result": "revalidated", "reason": "not_modified"}
    assert s.sample("kounta_proxy_cache_lookups_total", revalidated) == 5
    assert s.sample("kounta_proxy_requests_in_flight") == 0
    lines = access_lines(caplog)
    assert lines["the-starter"]["fetched_by"] is None
    for rid in ("j0", "j1", "j2", "in-task"):
        assert (lines[rid]["fetched_by"], lines[rid]["cache"]) == ("the-starter", "REVALIDATED")
    looked_up = sorted(
        r.fields["request_id"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "cache_lookup" and r.fields["result"] == "revalidated"  # type: ignore[attr-defined]
    )
    expected = ["in-task", "j0", "j1", "j2", "the-starter"] if level == logging.DEBUG else []
    assert looked_up == expected  # each debug line names its own request
    # The long way's answers, byte for byte but for Date, Age and the request id.
    slow = [await get(client, url, **{**SLOW, **h}) for h in ({}, inm)]
    for fast, theirs in ((first, slow[0]), (answers[0], slow[0]), (answers[1], slow[1])):
        assert (fast[0], fast[2]) == (theirs[0], theirs[2])
        assert steady(fast[1]) == steady(theirs[1])
    writer.write(ask("in-task-slow", GZIP, "Pragma: x\r\n", path=PATH))
    assert steady_bytes(await answer(reader)) == steady_bytes(mine)
    writer.close()


def steady(headers: Any) -> list[tuple[str, str]]:
    per_answer = {"date", "age", "x-request-id"}
    return [(k.lower(), v) for k, v in headers.items() if k.lower() not in per_answer]


BIG = "/v1/big.json"


@pytest.mark.parametrize(
    ("size", "coding"),
    [(500_000, None), (600_000, "gzip"), (1_500_000, "gzip")],
    ids=["500KB", "gzip-inflated-here", "gzip-inflated-past-1MiB"],
)
async def test_large_bodies_of_either_coding_are_answered_as_the_long_way_answers(
    setup: Setup,  # noqa: F811
    client: aiohttp.ClientSession,
    size: int,
    coding: str | None,
) -> None:
    # The starter (not taking gzip) and joiners (taking it, not, a caller's 304) of a flight
    # over a large stored body: the plain body inflated once (Together._plain), or, past
    # 1 MiB, that caller handed to the long way, which streams it inflated.
    s, etag = setup, setup.origin.etag
    text = b'{"things": "' + os.urandom(size // 2).hex().encode() + b'"}'
    s.origin.body = gzip.compress(text) if coding else text
    s.origin.coding = coding
    status, headers, _ = await get(client, s.proxy.url + BIG)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    plain, inm = {"Accept-Encoding": "identity"}, {"If-None-Match": etag}
    shapes = [{}, plain, inm, {}]
    before = s.long_way.count
    starter, answers = await one_flight(s, client, shapes, {**plain, "X-Request-ID": "s"}, BIG)
    handed = s.long_way.count - before
    assert handed == (2 if size > 1024 * 1024 else 0)  # the two callers not taking gzip
    assert s.origin.served[-1] == etag and s.origin.served.count(etag) == 1
    assert [starter[0], *(a[0] for a in answers)] == [200, 200, 200, 304, 200]
    slow = [await get(client, s.proxy.url + BIG, **{**SLOW, **h}) for h in ({}, plain, inm)]
    for mine, theirs in zip([starter, *answers], [slow[1], *slow, slow[0]], strict=True):
        assert (mine[0], mine[2]) == (theirs[0], theirs[2])
        assert steady(mine[1]) == steady(theirs[1])
        assert mine[1]["X-Cache"] == "REVALIDATED"
    assert starter[2] == answers[0][2] == text
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 4
    assert s.sample("kounta_proxy_requests_in_flight") == 0
