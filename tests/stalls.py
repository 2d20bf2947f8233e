"""A stalled test fails, naming what it waits for, instead of hanging the whole run.

Every phase of a test (setup, call, teardown) gets :data:`LIMIT` seconds
(``KP_TEST_STALL_SECONDS`` overrides it). When it runs out, SIGALRM interrupts the main
thread. If an event loop is running there (an async test or fixture), the stack of every task
on it is written to stderr (where a plain thread dump would only show the loop's ``select``)
and the tasks are cancelled, so fixtures still tear down; the phase then fails with a line
that says so. Without a loop, or when cancelling does not end the phase within
:data:`GRACE` seconds, the alarm raises where the main thread is.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import signal
import sys
from collections.abc import Generator
from types import FrameType
from typing import Any

import pytest

LIMIT = float(os.environ.get("KP_TEST_STALL_SECONDS", "150"))
GRACE = 20.0
FRAMES = ("cr_frame", "gi_frame", "ag_frame")
AWAITS = ("cr_await", "gi_yieldfrom", "ag_await")


class Stalled(Exception):
    """Raised by the alarm where cancelling the loop's tasks was not enough."""


class _Watch:
    def __init__(self, what: str) -> None:
        self.what = what
        self.fired = False

    def alarm(self, signum: int, frame: FrameType | None) -> None:
        loop = asyncio.events._get_running_loop()
        if self.fired or loop is None:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            raise Stalled(f"{self.what}: no end after {LIMIT:.0f}s (stacks in stderr)")
        self.fired = True
        tasks = asyncio.all_tasks(loop)
        print(f"\n--- {self.what} stalled for {LIMIT:.0f}s; {len(tasks)} tasks:", file=sys.stderr)
        for task in tasks:
            print(f"{task.get_name()}: {_awaiting(task.get_coro())}", file=sys.stderr)
        # A future no task resolves may wait on a thread (an executor's, the cache's store).
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        # From a signal handler: through the loop's self-pipe, which also wakes its select.
        for task in tasks:
            loop.call_soon_threadsafe(task.cancel, f"stalled for {LIMIT:.0f}s")
        signal.setitimer(signal.ITIMER_REAL, GRACE)


def _awaiting(coro: Any) -> str:
    """Where a suspended coroutine waits, down its chain of awaits (a task's own stack shows
    only its outermost frame)."""
    where = []
    while coro is not None:
        frame = next((getattr(coro, a) for a in FRAMES if getattr(coro, a, None)), None)
        if frame is None:
            # An async generator's __anext__ (a fixture's teardown) names its generator only
            # among its referents; a future or a finished coroutine ends the chain.
            inner = [r for r in gc.get_referents(coro) if getattr(r, "ag_frame", None)]
            if inner:
                coro = inner[0]
                continue
            futures = [r for r in gc.get_referents(coro) if isinstance(r, asyncio.Future)]
            where.append(repr(futures[0] if futures else coro)[:300])
            break
        where.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})")
        coro = next((getattr(coro, a) for a in AWAITS if getattr(coro, a, None)), None)
    return "\n    -> ".join(where)


def _watched(what: str) -> Generator[None, Any, Any]:
    watch = _Watch(what)
    previous = signal.signal(signal.SIGALRM, watch.alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT)
    try:
        result = yield
    except BaseException as e:
        if watch.fired:
            pytest.fail(f"{what} stalled for {LIMIT:.0f}s: tasks cancelled ({e!r})")
        raise
    else:
        if watch.fired:  # it went on once the loop's tasks were cancelled: still a stall
            pytest.fail(f"{what} stalled for {LIMIT:.0f}s: tasks cancelled")
        return result
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _watched(f"setup of {item.nodeid}"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _watched(item.nodeid))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _watched(f"teardown of {item.nodeid}"))
