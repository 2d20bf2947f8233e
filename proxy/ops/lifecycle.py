"""The proxy's life as a process: check, start both listeners, serve, drain, stop.

``startup`` → ``run_until_signal`` → ``shutdown`` (in :mod:`proxy.listener`):

1. preflight: the state directory and the cache directory must be writable
   directories; otherwise one :class:`StartupError` line, exit 2.
2. the proxy listener, then the admin listener (over the proxy's services);
   a busy port is one line too.
3. on SIGHUP: the configuration is read again and what may change live is applied
   (:mod:`proxy.ops.reload`); connections and requests under way are untouched.
4. on SIGTERM/SIGINT: readiness false at once; new requests are still served for
   ``server.drain_delay`` seconds; then the proxy stops accepting, in-flight requests get
   ``server.shutdown_grace`` seconds, cleanup contexts close sessions, cache and token
   files, then the admin listener stops. Exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy import __version__, eventloop
from proxy.edge.app import create_app
from proxy.edge.services import SERVICES, Services
from proxy.files import private_dir
from proxy.listener import StartupError, bound_port, run_until_signal, start
from proxy.logs import event
from proxy.ops import heap, reload
from proxy.ops.admin import start_admin
from proxy.settings import Settings, masked

Announce = Callable[[int, int | None], None]


async def serve(
    settings: Settings,
    *,
    extra: list[web.AppRunner] | None = None,
    announce: Announce | None = None,
    load: reload.Loader | None = None,
) -> None:
    """Run the proxy (and its admin listener) until a signal.

    ``extra`` runners (the demo's sandbox) stop last; ``announce(port, admin_port)`` hears
    the bound ports once both listeners are up; ``load`` reads the settings again on
    SIGHUP (without it, SIGHUP is logged and ignored).
    """
    reloads = Reloads(load)
    with reloads.on_sighup():
        await _serve(settings, extra, announce, reloads)


async def _serve(
    settings: Settings,
    extra: list[web.AppRunner] | None,
    announce: Announce | None,
    reloads: Reloads,
) -> None:
    preflight(settings)
    app = create_app(settings)
    server = settings.server
    runner = await start(app, server.host, server.port, server.shutdown_grace, server.reuse_port)
    services = app[SERVICES]
    try:
        hooks = await start_webhooks(services)
    except StartupError:
        await runner.cleanup()
        raise
    try:
        admin = await start_admin(services)
    except StartupError:
        if hooks is not None:
            await hooks.cleanup()
        await runner.cleanup()
        raise
    with heap.frozen_heap():  # start-up's objects out of the collector's full passes
        event(
            "started",
            version=__version__,
            event_loop=eventloop.running(),
            listen=f"{settings.server.host}:{bound_port(runner)}",
            admin=_admin_address(settings, admin),
            upstream=settings.upstream.base_url,
            settings=masked(settings),
        )
        if announce is not None:
            announce(
                bound_port(runner),
                bound_port(admin) if admin and not settings.admin.socket else None,
            )

        def not_ready(signal_name: str) -> None:
            services.state.shutting_down = True

        reloads.services = services
        runners = [runner, *([hooks] if hooks else []), *([admin] if admin else []), *(extra or [])]
        await run_until_signal(
            runners, on_signal=not_ready, drain_delay=settings.server.drain_delay
        )


async def start_webhooks(services: Services) -> web.AppRunner | None:
    """The webhook listener, when webhooks are enabled: its own port, never the API's or
    the admin listener's (deliveries come from Kounta through the company's ingress)."""
    receiver = services.webhooks
    if receiver is None:
        return None
    hooks, server = services.settings.webhooks, services.settings.server
    try:
        runner = await start(
            receiver.app(), hooks.host, hooks.port, server.shutdown_grace, server.reuse_port
        )
    except StartupError as e:
        raise StartupError(f"webhook listener: {e}") from None
    event("webhooks_started", listen=f"{hooks.host}:{bound_port(runner)}", path=hooks.path)
    return runner


def _admin_address(settings: Settings, admin: web.AppRunner | None) -> str:
    if admin is None:
        return "disabled"
    if settings.admin.socket:
        return f"unix:{settings.admin.socket}"
    return f"{settings.admin.host}:{bound_port(admin)}"


class Reloads:
    """SIGHUP handling: one reload at a time, none before the services exist."""

    def __init__(self, load: reload.Loader | None) -> None:
        self.load = load
        self.services: Services | None = None
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[bool]] = set()

    @contextlib.contextmanager
    def on_sighup(self) -> Iterator[None]:
        """SIGHUP reloads while serving (its default action would end the process)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.signalled)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    def signalled(self) -> None:
        if self.services is None or self.load is None:
            event("reload_ignored", logging.WARNING, reason="not serving yet or no config")
            return
        task = asyncio.ensure_future(self.run(self.services, self.load))
        self.tasks.add(task)  # a hard reference, or the task may be collected mid-way
        task.add_done_callback(self.tasks.discard)

    async def run(self, services: Services, load: reload.Loader) -> bool:
        async with self.lock:
            applied = await reload.reload(services, load)
        if applied:
            heap.refreeze()  # the old settings' cycles collected, the new ones frozen
        return applied


def preflight(settings: Settings) -> None:
    """Fail before listening when a directory the proxy must write to is unusable."""
    for key, path in directories(settings):
        check_writable(key, Path(path))


def directories(settings: Settings) -> Iterator[tuple[str, str]]:
    """``state_dir``, then each enabled section's ``directory(state_dir)`` (the cache's)
    or its ``*_dir``/``dir``/``directory`` string settings, as the feature would resolve them."""
    yield "state_dir", settings.state_dir
    for section in dataclasses.fields(settings):
        value: Any = getattr(settings, section.name)
        if not dataclasses.is_dataclass(value) or isinstance(value, type):
            continue
        if getattr(value, "enabled", True) is False:
            continue
        resolve = getattr(value, "directory", None)
        if callable(resolve):
            yield f"{section.name}.dir", str(resolve(settings.state_dir))
            continue
        for f in dataclasses.fields(value):
            found = getattr(value, f.name)
            named_dir = f.name.endswith("_dir") or f.name in ("dir", "directory")
            if named_dir and isinstance(found, str) and found:
                yield f"{section.name}.{f.name}", found


def directory_problems(settings: Settings) -> list[tuple[str, str]]:
    """What :func:`preflight` would refuse, found without creating anything (check-config)."""
    problems = []
    for key, path in directories(settings):
        problem = _unwritable(Path(path))
        if problem is not None:
            problems.append((key, f"{path} {problem}"))
    return problems


def _unwritable(path: Path) -> str | None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"is not a writable directory: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == path:
            return "is not a writable directory: permission denied"
        return f"cannot be created: {existing} is not writable"
    return None


def check_writable(key: str, path: Path) -> None:
    try:
        private_dir(path)  # 0700 when made here: it will hold Kounta data and tokens
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise StartupError(f"{key} {path} is not a writable directory: {reason}") from None
