"""BodyDeadline: only the time spent waiting for the caller counts."""

from __future__ import annotations

import asyncio

import pytest

from proxy.edge.inbound import BodyDeadline
from proxy.errors import BodyTimeout


async def test_time_the_proxy_spends_elsewhere_does_not_count() -> None:
    content = asyncio.StreamReader()
    deadline = BodyDeadline(timeout=0.5, min_rate=0)
    content.feed_data(b"a" * 10)
    await asyncio.sleep(0.7)  # busy elsewhere (a budget queue) past the whole timeout
    assert await deadline.read(content) == b"a" * 10  # the bytes were there: no wait
    content.feed_eof()
    assert await deadline.read(content) == b""
    assert deadline.waited < 0.1 and not deadline.timed_out


async def test_the_whole_wait_is_bounded() -> None:
    content = asyncio.StreamReader()
    deadline = BodyDeadline(timeout=0.6, min_rate=0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(2):  # two waits of 0.25 s: within the deadline
        loop.call_later(0.25, content.feed_data, b"x")
        assert await deadline.read(content) == b"x"
    with pytest.raises(BodyTimeout) as info:
        await deadline.read(content)  # the last 0.1 s or so, then 408
    assert 0.55 < loop.time() - started < 0.9
    assert (info.value.status, info.value.code) == (408, "request_timeout")
    assert deadline.timed_out


@pytest.mark.parametrize(("received", "allowed"), [(0, 1.0), (50, 1.5), (1000, 11.0), (10**6, 30)])
def test_the_pace_past_the_first_second(received: int, allowed: float) -> None:
    """min_rate bytes for every second waited past the first; never past the timeout."""
    deadline = BodyDeadline(timeout=30, min_rate=100)
    deadline.received = received
    assert deadline._allowed() == pytest.approx(allowed)
    deadline.waited = 0.4
    assert deadline._allowed() == pytest.approx(allowed - 0.4)
