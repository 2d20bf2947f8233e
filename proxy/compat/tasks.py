"""asyncio's private task bookkeeping (``asyncio.tasks._enter_task``, ``_leave_task``): a
task whose first step runs at once, within the call that makes it (:func:`eager_task`).

Python 3.12 has this as ``eager_start``; 3.11, the proxy's oldest, has none. A flight started
at the edge (:meth:`proxy.cache.flight.Flights.start`, ``eager``) writes its request to the
upstream within the call that started it, before the loop goes on to the other requests it
read in the same turn (they join the flight meanwhile): the upstream works while they are
parked instead of after. During that first step the new task is the current one, as for
any step of a task, so what asks for it (aiohttp's timeouts cancel ``current_task()``) gets
this task, not the one (if any) that made it.

:data:`PINS` lists the assumptions; ``tests/unit/test_compat.py`` checks each and names
:data:`WRITTEN_AGAINST` (the Python minor version) when one fails after an upgrade.
"""

from __future__ import annotations

import asyncio
import contextvars
from asyncio.tasks import _enter_task, _leave_task
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

WRITTEN_AGAINST = "3.11"
T = TypeVar("T")
_NOTHING: Any = object()


class _Started(Coroutine[Any, Any, T]):
    """``coro``, whose first step ran already (it yielded ``waiting``: a future, or None),
    handed to its task: the task's first step gets ``waiting``, as if it had made that step
    itself; every later step, and a cancellation even before the first, goes to ``coro``."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self.coro = coro
        self.waiting: Any = _NOTHING

    def send(self, value: Any) -> Any:
        waiting = self.waiting
        if waiting is not _NOTHING:
            self.waiting = _NOTHING
            return waiting
        return self.coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self.waiting = _NOTHING
        if val is None and tb is None:
            return self.coro.throw(typ)
        return self.coro.throw(typ, val, tb)

    def close(self) -> None:
        self.coro.close()

    def __getattr__(self, name: str) -> Any:
        """``coro``'s own (``cr_code``, ``cr_frame``, ``cr_await``, ``__qualname__``...): what
        a task's repr, its stack and a debugger read of its coroutine."""
        return getattr(self.coro, name)

    def __await__(self) -> Generator[Any, None, T]:  # not awaited: a task drives it
        raise TypeError("a started coroutine is driven by its task only")


def eager_task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task for ``coro`` whose first step (up to its first wait) runs now, in the task's own
    context, with the task as the current one; the loop drives the rest as for any task."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    started = _Started(coro)
    task: asyncio.Task[T] = loop.create_task(started, context=context)
    outer = asyncio.current_task(loop)
    if outer is not None:
        _leave_task(loop, outer)
    _enter_task(loop, task)
    try:
        started.waiting = context.run(coro.send, None)
    except StopIteration as over:
        started.coro = _returned(over.value)
    except BaseException as e:  # raised by the task's own first step, as a lazy one would
        started.coro = _raised(e)
    finally:
        _leave_task(loop, task)
        if outer is not None:
            _enter_task(loop, outer)
    return task


async def _returned(value: T) -> T:
    return value


async def _raised(error: BaseException) -> Any:
    raise error


def _first_step_is_the_tasks() -> bool:
    async def current() -> asyncio.Task[Any] | None:
        return asyncio.current_task()

    async def main() -> bool:
        outer = asyncio.current_task()
        task = eager_task(current())
        return asyncio.current_task() is outer and await task is task

    return asyncio.run(main())


EAGER = "asyncio.tasks._enter_task, _leave_task: a task made current for its first step"
PINS: dict[str, Callable[[], bool]] = {EAGER: _first_step_is_the_tasks}
