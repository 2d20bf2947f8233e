"""What a request waiting in its connection's protocol (proxy.answering, proxy.edge.parked)
costs: aiohttp's keep-alive timer (proxy.compat.aiohttp.hold_keepalive / release_keepalive):
the connection's close put off without cancelling the timer or arming a new one per park,
and closed again once idle for ``keepalive_timeout`` after the answer; a joiner's trace
(proxy.edge.parked.joining): no context copied per joiner unless debug lines are written,
its access line and debug lines as before."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

import aiohttp
import pytest

from proxy.edge import fast, parked
from proxy.logs import Trace
from tests.integration.test_fast_joiners import PATH as JOINED
from tests.integration.test_fast_joiners import (
    Setup,
    access_lines,
    one_flight,
    server_settings,  # noqa: F401 (a fixture)
    setup,  # noqa: F401 (a fixture)
)
from tests.integration.test_fast_path import get
from tests.integration.test_fast_protocol import GZIP, answer, ask, connect, field


def protocol_of(s: Setup, writer: asyncio.StreamWriter) -> Any:
    """The proxy's protocol serving the raw connection ``writer`` writes to."""
    ours = writer.get_extra_info("sockname")
    server: Any = s.proxy.runner.server
    (found,) = [
        c
        for c in server.connections
        if c.transport is not None and c.transport.get_extra_info("peername") == ours
    ]
    return found


async def joined(
    s: Setup, client: aiohttp.ClientSession, writer: asyncio.StreamWriter, rid: str
) -> asyncio.Future[Any]:
    """A revalidation held at the upstream (its starter a client request) and ``rid`` on the
    raw connection parked as its joiner; the starter's answer."""
    starter = asyncio.ensure_future(get(client, s.hold()))
    await asyncio.wait_for(s.origin.asked.wait(), 10)
    writer.write(ask(rid, GZIP, path=JOINED))
    await s.waiting(2)
    return starter


async def revalidated(s: Setup, client: aiohttp.ClientSession, count: int) -> list[dict[str, str]]:
    """One flight with ``count`` joiners (X-Request-ID j0, j1, ...), every answer revalidated;
    the joiners' headers."""
    joiners = [{"X-Request-ID": f"j{i}"} for i in range(count)]
    starter, answers = await one_flight(s, client, joiners)
    for status, headers, _ in [starter, *answers]:
        assert (status, headers["X-Cache"]) == (200, "REVALIDATED")
    return joiners


async def answered_once(
    s: Setup, client: aiohttp.ClientSession
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection whose first request joined a revalidation and was answered (so
    aiohttp's keep-alive timer is armed)."""
    reader, writer = await connect(s.proxy)
    starter = await joined(s, client, writer, "first")
    s.origin.gate.set()
    assert field(await answer(reader), b"X-Cache") == b"REVALIDATED"
    assert (await starter)[0] == 200
    return reader, writer


async def test_a_parked_joiner_keeps_the_connections_keepalive_timer(
    setup: Setup,  # noqa: F811
    client: aiohttp.ClientSession,
) -> None:
    s = setup
    reader, writer = await answered_once(s, client)
    protocol = protocol_of(s, writer)
    armed = protocol._keepalive_handle  # by the first answer
    assert armed is not None and not armed.cancelled()
    starter = await joined(s, client, writer, "k2")
    # Parked: the same timer, not cancelled (a cancelled one stays in asyncio's heap).
    assert protocol._keepalive_handle is armed and not armed.cancelled()
    s.origin.gate.set()
    got = await answer(reader)
    assert (field(got, b"X-Request-ID"), field(got, b"X-Cache")) == (b"k2", b"REVALIDATED")
    assert (await starter)[0] == 200
    # Answered: still that timer, its close time now a keep-alive timeout from the answer.
    assert protocol._keepalive_handle is armed and not armed.cancelled()
    loop = asyncio.get_running_loop()
    timeout = protocol._keepalive_timeout
    assert loop.time() < protocol._next_keepalive_close_time <= loop.time() + timeout
    writer.close()


async def test_a_park_leading_its_feed_records_no_answer(
    setup: Setup,  # noqa: F811
    client: aiohttp.ClientSession,
) -> None:
    """A connection's first request parked as a joiner: nothing is answered yet, so no
    answer is recorded for the connection (its last answer time, the server's count) while
    it waits; its answer records one. The timer aiohttp armed when the connection came is
    the one kept throughout."""
    s = setup
    reader, writer = await connect(s.proxy)
    protocol = protocol_of(s, writer)
    armed = protocol._keepalive_handle  # aiohttp's, from the connection's start
    starter = await joined(s, client, writer, "p1")
    assert protocol.parked()
    assert protocol._answered_at == 0.0
    counted = protocol.server.requests_count
    s.origin.gate.set()
    got = await answer(reader)
    assert (field(got, b"X-Request-ID"), field(got, b"X-Cache")) == (b"p1", b"REVALIDATED")
    assert (await starter)[0] == 200
    assert protocol._answered_at > 0
    assert protocol.server.requests_count >= counted + 1
    assert protocol._keepalive_handle is armed and not armed.cancelled()
    writer.close()


@pytest.mark.parametrize("server_settings", [{"keepalive_timeout": 0.3}])
@pytest.mark.parametrize("changed", [False, True], ids=["answered", "handed_over"])
async def test_a_keepalive_timer_firing_during_a_park_closes_the_connection_once_idle(
    setup: Setup,  # noqa: F811
    client: aiohttp.ClientSession,
    changed: bool,
) -> None:
    """The timer armed by the connection's previous answer fires while its next request is
    parked (three timeouts): not closed then; answered (in the protocol, or handed to the
    long way when the flight brings a changed body), then idle: closed by the timeout."""
    s = setup
    reader, writer = await answered_once(s, client)
    starter = await joined(s, client, writer, "t2")
    if changed:
        s.origin.reply = (200, '"v2"')
    await asyncio.sleep(0.9)  # the timer fired, the flight still out
    s.origin.gate.set()
    got = await answer(reader)
    assert field(got, b"X-Request-ID") == b"t2"
    assert field(got, b"X-Cache") == (b"MISS" if changed else b"REVALIDATED")
    assert (await starter)[0] == 200
    assert await asyncio.wait_for(reader.read(), 5) == b""  # idle: closed again
    writer.close()


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO, logging.DEBUG])
async def test_a_parked_joiner_has_a_context_of_its_own_only_for_debug_lines(
    setup: Setup,  # noqa: F811
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    level: int,
) -> None:
    made: list[str] = []  # contexts
    kept: list[str] = []  # a joiner's trace made on its own (Parked.noted)
    traced = parked.traced

    def counted(request_id: str) -> tuple[contextvars.Context, Trace]:
        made.append(request_id)
        return traced(request_id)

    class Counted(Trace):
        def __init__(self, request_id: str = "") -> None:
            kept.append(request_id)
            super().__init__(request_id)

    monkeypatch.setattr(parked, "traced", counted)
    monkeypatch.setattr(fast, "traced", counted)
    monkeypatch.setattr(parked, "Trace", Counted)
    caplog.set_level(level, logger="kounta_proxy")
    joiners = await revalidated(setup, client, 3)
    # The starter's context is its flight's (budget wait, retries); a joiner's only when
    # debug lines read the current trace. Below info no access line is written, so nothing
    # reads a joiner's trace (fetched_by): none is made then.
    assert made == (
        ["the-starter", "j0", "j1", "j2"] if level == logging.DEBUG else ["the-starter"]
    )
    assert sorted(kept) == (["j0", "j1", "j2"] if level == logging.INFO else [])
    fields = [getattr(r, "fields", {}) for r in caplog.records]
    lines = access_lines(caplog)
    assert len(lines) == (0 if level == logging.WARNING else 4)
    for joiner in joiners if lines else []:
        rid = joiner["X-Request-ID"]
        assert lines[rid]["fetched_by"] == "the-starter"
        assert lines[rid]["cache"] == "REVALIDATED"
    assert not lines or lines["the-starter"]["fetched_by"] is None
    looked = [
        f["request_id"]
        for f, r in zip(fields, caplog.records)
        if r.getMessage() == "cache_lookup" and f["result"] == "revalidated"
    ]
    assert sorted(looked) == (["j0", "j1", "j2", "the-starter"] if level == logging.DEBUG else [])


async def test_a_parked_joiner_handed_to_the_long_way_gets_its_trace_there(
    setup: Setup,  # noqa: F811
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A flight whose answer the fast path cannot give (changed: a 200 with a new body) hands
    # its parked joiners to the long way, which goes on with the trace made then.
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    s = setup
    s.origin.reply = (200, '"v2"')
    joiners = [{"X-Request-ID": f"h{i}"} for i in range(2)]
    starter, answers = await one_flight(s, client, joiners)
    assert starter[0] == 200 and [a[0] for a in answers] == [200, 200]
    assert answers[0][2] == answers[1][2] == starter[2]
    assert [access_lines(caplog)[f"h{i}"]["fetched_by"] for i in range(2)] == ["the-starter"] * 2


async def test_parked_joiners_are_plain_entries_of_their_flight_answered_in_one_call(
    setup: Setup,  # noqa: F811
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each joiner waiting in its connection's protocol is a plain entry of its flight's
    wake-up list (a tuple its protocol holds: no Parked object, no call chain of its own),
    and the flight's wake-up answers them all in one call (Joiners.woken), passing over one
    whose caller left meanwhile (its 499 logged when it left). Same answers and counts."""
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    s = setup
    url = s.hold()
    starter = asyncio.ensure_future(get(client, url, **{"X-Request-ID": "the-starter"}))
    await asyncio.wait_for(s.origin.asked.wait(), 10)
    joiners = [
        asyncio.ensure_future(get(client, url, **{"X-Request-ID": f"j{i}"})) for i in range(3)
    ]
    _, writer = await connect(s.proxy)
    writer.write(ask("leaver", GZIP, path=JOINED))
    await s.waiting(5)
    fast_path = s.long_way.fast
    (flight,) = list(fast_path.cache.fast.flights)
    waiting = [w for _, w in flight._waiting]
    assert len(waiting) == 4 and all(type(w) is tuple for w in waiting), waiting
    for protocol, entry in waiting:
        assert protocol.parked_on(entry) and entry[0] is fast_path.joiners
    calls: list[list[str]] = []
    answer = flight._answer

    def counted(entries: list[Any]) -> None:
        calls.append([e[2].request_id for _, e in entries])
        answer(entries)

    flight._answer = counted
    writer.close()  # the leaver's caller hangs up while parked
    await s.waiting(4)
    assert access_lines(caplog)["leaver"]["status"] == 499
    s.origin.gate.set()
    for status, headers, _ in [await starter, *await asyncio.gather(*joiners)]:
        assert (status, headers["X-Cache"]) == (200, "REVALIDATED")
    assert [sorted(c) for c in calls] == [["j0", "j1", "j2", "leaver"]]  # one call
    assert s.sample("kounta_proxy_cache_coalesced_total", {"outcome": "shared"}) == 3
    assert s.sample("kounta_proxy_requests_in_flight") == 0
    lines = access_lines(caplog)
    assert [lines[f"j{i}"]["fetched_by"] for i in range(3)] == ["the-starter"] * 3


@pytest.mark.parametrize("lead", ["starter", "joiner"])
async def test_a_park_leading_a_long_pipeline_answers_all_of_it_in_order(
    setup: Setup,  # noqa: F811
    client: aiohttp.ClientSession,
    lead: str,
) -> None:
    """More requests in one write than aiohttp's parser gives at once (its queue limit, 32),
    the first parked in the protocol as its flight's starter or as a joiner (a plain entry):
    the rest wait behind it in order and what the parser kept is parsed once it is answered
    (before, each request the parser gave next took the parked one's place, and what it kept
    was never parsed: the connection hung)."""
    s = setup
    reader, writer = await connect(s.proxy)
    count = 80
    pipeline = b"".join(ask(f"p{n}", GZIP, path=JOINED) for n in range(count))
    starter = None
    if lead == "joiner":  # a client's flight out, held at the upstream: the first joins it
        starter = asyncio.ensure_future(get(client, s.hold()))
        await asyncio.wait_for(s.origin.asked.wait(), 10)
    else:  # the first starts the flight, held at the upstream
        s.hold()
    writer.write(pipeline)
    await asyncio.wait_for(s.origin.asked.wait(), 10)
    await asyncio.sleep(0.05)  # (the pipeline read and parsed as far as the parser goes)
    assert protocol_of(s, writer).parked()
    s.origin.gate.set()
    if starter is not None:
        assert (await starter)[0] == 200
    got = [await asyncio.wait_for(answer(reader), 10) for _ in range(count)]
    assert [field(a, b"X-Request-ID") for a in got] == [b"p%d" % n for n in range(count)]
    assert {field(a, b"X-Cache") for a in got} <= {b"REVALIDATED", b"HIT"}
    await s.waiting(0)
    writer.close()
