"""Flights.join: what a waiter of a flight gets, and what its leaving does not change.

The fast path's joiners (proxy.edge.fast) and the long way's both wait here; a waiter that
times out or is cancelled must leave the flight, its other waiters and the loop as they were.
"""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.flight import Flight, Flights, GoAlone, Outcome, settle
from proxy.messages import ProxyRequest


def flight() -> Flight:
    request = ProxyRequest("GET", "/v1/x", "", CIMultiDictProxy(CIMultiDict()), account="main")
    return Flight("key", request, 0)


OUTCOME = Outcome(200, (("ETag", '"v1"'),), "REVALIDATED", 304)


async def test_waiters_get_the_outcome_or_the_failure_it_settled_with() -> None:
    flights = Flights()
    f = flight()
    waiters = [asyncio.ensure_future(flights.join(f, 5)) for _ in range(3)]
    await asyncio.sleep(0)
    settle(f.done, OUTCOME)
    assert await asyncio.gather(*waiters) == [OUTCOME] * 3
    assert await flights.join(f, 5) is OUTCOME  # settled already: at once
    g = flight()
    waiter = asyncio.ensure_future(flights.join(g, 5))
    await asyncio.sleep(0)
    settle(g.done, GoAlone())
    with pytest.raises(GoAlone):
        await waiter


async def test_a_waiter_that_times_out_or_leaves_changes_nothing_for_the_others() -> None:
    flights = Flights()
    f = flight()
    patient = asyncio.ensure_future(flights.join(f, 5))
    leaving = asyncio.ensure_future(flights.join(f, 5))
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TimeoutError):
        await flights.join(f, 0.05)
    assert 0.05 <= loop.time() - began < 1
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert not f.done.done() and not patient.done()
    # Those that left took their callbacks with them: only the patient one's is there.
    assert len(f.done._callbacks) == 1  # type: ignore[attr-defined]
    settle(f.done, OUTCOME)
    assert await patient is OUTCOME


async def test_each_waiter_times_out_at_its_own_deadline_and_the_rest_still_get_the_outcome() -> (
    None
):
    flights = Flights()
    f = flight()
    loop = asyncio.get_running_loop()
    began = loop.time()

    async def timed(patience: float) -> float | Outcome:
        try:
            return await flights.join(f, patience)
        except TimeoutError:
            return loop.time() - began

    # A later waiter with less patience (a reload shortened coalesce_wait) goes first.
    waiters = [asyncio.ensure_future(timed(p)) for p in (0.3, 5, 0.1, 0.2, 5)]
    gone = asyncio.ensure_future(flights.join(f, 0.15))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.wait([waiters[0], waiters[2], waiters[3]], timeout=2)
    first, _, short, middle, _ = (w.result() if w.done() else None for w in waiters)
    assert isinstance(short, float) and isinstance(middle, float) and isinstance(first, float)
    assert 0.1 <= short < middle < first < 2
    assert first >= 0.3
    settle(f.done, OUTCOME)
    assert [await waiters[1], await waiters[4]] == [OUTCOME, OUTCOME]
    assert f._timer is None  # type: ignore[attr-defined]  # nothing left scheduled


async def test_plain_entries_are_answered_together_by_the_wake_up_or_at_their_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Flight.park: what a request waiting in its connection's protocol asks (no future, no
    # call of its own): the entries woken together are handed to the flight's answer in one
    # call, in order, within the wake-up; an impatient one at its own deadline; a failing
    # answer is logged and the next wake-up still answers; once done, at the next turn.
    f = flight()
    calls: list[list[tuple[object, ...]]] = []
    waiter = f.waiter(5)

    def answer(entries: list[tuple[object, ...]]) -> None:
        calls.append([(*e, f.done.done(), waiter.done()) for e in entries])
        if entries[0] == ("fails",):
            raise RuntimeError("one answer's bug")

    for name, patience in (("a", 5), ("b", 5), ("impatient", 0.05), ("c", 5)):
        f.park(patience, (name,), answer)
    await asyncio.sleep(0.2)
    assert calls == [[("impatient", False, False)]]
    settle(f.done, OUTCOME)
    await asyncio.sleep(0)  # one turn: done's callback (the wake-up) answers them at once
    # Futures resolved first, then the entries in one call.
    assert calls[1] == [("a", True, True), ("b", True, True), ("c", True, True)]
    assert len(calls) == 2 and f._waiting == []  # type: ignore[attr-defined]
    f.park(5, ("fails",), answer)  # the flight is over: at the next turn
    assert len(calls) == 2
    await asyncio.sleep(0)
    assert calls[2] == [("fails", True, True)]
    assert [r.getMessage() for r in caplog.records] == ["flight_wake_failed"]


async def test_waiters_are_woken_by_deadline_then_arrival_and_each_expires_on_time() -> None:
    # Every joiner of a flight waits as long (in order: appended, one timer for the first);
    # a shorter patience (a reload changed coalesce_wait) goes in its deadline's place. When
    # done, every waiter is woken in that order; before, each expires at its own deadline.
    f = flight()
    made: list[str] = []

    def answer(entries: list[tuple[object, ...]]) -> None:
        made.extend(str(e[0]) for e in entries)

    for name, patience in (("a", 5), ("b", 5), ("short", 0.05), ("c", 5), ("mid", 3), ("d", 5)):
        f.park(patience, (name,), answer)
    assert f._timer is not None and f._timer.when() == f._waiting[0][0]  # type: ignore[attr-defined]
    await asyncio.sleep(0.2)
    assert made == ["short"]
    timer = f._timer  # type: ignore[attr-defined]
    assert timer is not None and timer.when() == f._waiting[0][0]  # type: ignore[attr-defined]
    settle(f.done, OUTCOME)
    await asyncio.sleep(0)
    assert made == ["short", "mid", "a", "b", "c", "d"]
    assert f._timer is None and timer.cancelled()  # type: ignore[attr-defined]


async def test_a_flights_own_task_wakes_its_waiters_in_its_last_step() -> None:
    # The flight's answer settles ``done`` and wakes its waiters within the task's step (no
    # loop turn between, as ``done``'s callback would take): before anything the step left
    # for the next turn; a waiter's future and a plain entry alike, each once.
    flights = Flights()
    loop = asyncio.get_running_loop()
    made: list[str] = []
    gate = loop.create_future()

    async def fly(_: Flight) -> Outcome:
        await gate
        loop.call_soon(made.append, "next turn")
        return OUTCOME

    f = flights.start("key", flight().request, 0, fly, lambda _: None)
    f.park(5, ("entry",), lambda e: made.append(f"called, done: {f.done.done()}"))
    waiter = f.waiter(5)
    waiter.add_done_callback(lambda _: made.append("waiter resolved"))
    gate.set_result(None)
    for _ in range(4):
        await asyncio.sleep(0)
    assert made[:2] == ["called, done: True", "next turn"]
    assert sorted(made) == sorted(["called, done: True", "next turn", "waiter resolved"])
    assert waiter.result() is None and f._timer is None  # type: ignore[attr-defined]
    assert await flights.join(f, 5) is OUTCOME
    await asyncio.gather(*flights.tasks)
