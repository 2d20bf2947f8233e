"""Which asyncio event loop runs the proxy: uvloop when it is importable, else asyncio's own.

``server.event_loop`` chooses: ``"auto"`` (the default) takes uvloop when the ``fast`` extra is
installed (``pip install 'kounta-proxy[fast]'``; the image has it) and asyncio's loop otherwise;
``"asyncio"`` never takes uvloop; ``"uvloop"`` insists on it, and without it ``serve`` stops with
one line before anything starts. The proxy is the same on either loop; uvloop answers the same
requests with less CPU (docs/performance.md has the numbers).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from proxy.settings import ConfigError

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
T = TypeVar("T")

ASYNCIO, UVLOOP = "asyncio", "uvloop"


def _uvloop_factory() -> LoopFactory | None:
    """uvloop's ``new_event_loop``, or None when uvloop cannot be imported here."""
    try:
        module = importlib.import_module(UVLOOP)
    except ImportError:
        return None
    factory: LoopFactory = module.new_event_loop
    return factory


def resolve(choice: str) -> tuple[str, LoopFactory | None]:
    """The loop that ``choice`` means on this machine: its name and its factory (None:
    asyncio's default). A :class:`ConfigError` when uvloop is required but missing."""
    if choice == ASYNCIO:
        return ASYNCIO, None
    factory = _uvloop_factory()
    if factory is not None:
        return UVLOOP, factory
    if choice == UVLOOP:
        raise ConfigError(
            "server.event_loop",
            "is 'uvloop' but uvloop is not installed: pip install 'kounta-proxy[fast]', "
            "or set it to 'auto' or 'asyncio'",
        )
    return ASYNCIO, None


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """``asyncio.run(main)`` on the loop ``choice`` resolves to."""
    try:
        _, factory = resolve(choice)
    except ConfigError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running() -> str:
    """The name of the loop running now ("uvloop" or "asyncio"), "none" outside one."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return UVLOOP if type(loop).__module__.split(".", 1)[0] == UVLOOP else ASYNCIO
