"""Closing the services cancels their background loops and waits for them to end, even a loop
that swallowed a cancel (Python 3.11's asyncio.timeout can, when the cancel lands as the
timeout expires)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.edge import services


async def test_a_loop_that_swallows_a_cancel_is_cancelled_again_until_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(services, "RECANCEL_SECONDS", 0.05, raising=False)
    ticks = 0

    async def swallows_one() -> None:
        nonlocal ticks
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True  # as a timeout that expired at the same moment does
            ticks += 1

    task = asyncio.create_task(swallows_one())
    await asyncio.sleep(0.03)
    closing = asyncio.create_task(services._cancel(task))
    done, _ = await asyncio.wait([closing], timeout=2.0)
    try:
        assert closing in done, f"still waiting on a loop that went on ({ticks} ticks)"
        assert task.cancelled()
    finally:
        task.cancel()  # the loop's second cancel ends it if the close did not
        closing.cancel()
        await asyncio.wait([task, closing])


async def test_a_loop_that_failed_is_reported_not_hidden() -> None:
    async def fails() -> None:
        raise RuntimeError("the loop broke")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="the loop broke"):
        await services._cancel(task)
