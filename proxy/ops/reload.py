"""SIGHUP: read the configuration again and apply what may change while serving.

What may change live is declared once, as the fields of
:class:`~proxy.settings.live.LiveSettings` (:data:`LIVE_KEYS` is derived from it):
``log.level``, ``[inbound]``, ``[callers]`` (keys and accounts), ``cache.rules``, per account
``rate_per_minute``, ``burst`` and the credentials (``token``, ``client_id``,
``client_secret``, ``refresh_token``), and ``admin.token`` (the content of
``admin.token_file``; the previous token is still accepted for ``inbound.key_overlap``
seconds, as a caller's previous key is). They reach the running
proxy as one new :class:`~proxy.edge.services.Live` snapshot, assigned once; requests
already under way finish with the snapshot they started with. Everything else (listen
addresses, the upstream, the cache directory and sizes, accounts added or removed, the
whole ``[shared]`` section, ...) needs a restart: the reload keeps the running value and
says so in its one log line. A replaced provider keeps the running token store: the shared
one (Redis, ``[shared] backend = "redis"``) or the account's token file.
A file that does not load is refused with one line, and the running settings stay.
The files are read in a thread of their own, never on the event loop, within
:data:`READ_TIMEOUT` seconds: a file that cannot be read in time (a stalled file system) is
refused like a bad one, and a secret or config "file" that is not a regular file (a FIFO,
a device) is refused at once (:func:`proxy.files.read_regular`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from proxy.auth.providers import TokenProvider, provider_for
from proxy.edge.services import Live, Services
from proxy.logs import event, set_level
from proxy.settings import (
    CREDENTIALS,
    ConfigError,
    ConfigErrors,
    Invalid,
    LiveAccount,
    LiveSettings,
    Settings,
    applied,
    live_keys,
    live_of,
    masked,
    with_live,
)
from proxy.settings.live import fixed_tables

# Keys a reload never applies, whatever proxy.settings.live says: the shared backend (its
# connection, key prefix, token key, replica count) is opened once at start, and every budget
# gate and token store holds it; `serve --workers` sets server.reuse_port for its workers.
RESTART_KEYS = ("shared.*", "server.reuse_port")
# The live keys (fnmatch patterns), derived from proxy.settings.live.LiveSettings.
LIVE_KEYS = live_keys()

Loader = Callable[[], Settings]
# Seconds a reload may take to read the configuration and its secret files.
READ_TIMEOUT = 10.0
T = TypeVar("T")
LEVELS = ("debug", "info", "warning", "error")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted setting keys and their values (tables of tables walked; arrays kept whole)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        items: Mapping[str, Any] = {f.name: getattr(value, f.name) for f in fields}
    elif isinstance(value, dict):
        items = value
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, child in items.items():
        flat.update(flatten(child, f"{prefix}.{key}" if prefix else key))
    if not items and prefix:
        flat[prefix] = {}
    return flat


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """Keys whose values differ (secrets compared by value, never shown)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or a[k] != b[k])


def is_live(key: str) -> bool:
    if any(fnmatch.fnmatchcase(key, pattern) for pattern in RESTART_KEYS):
        return False
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in LIVE_KEYS)


def split_changes(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """The changed keys a reload applies, and those that need a restart (an account added
    or removed needs one whatever its keys: its budget, breaker and token file are set up
    at start)."""
    fixed = {name: getattr(old, name).keys() & getattr(new, name).keys() for name in fixed_tables()}
    live: list[str] = []
    restart: list[str] = []
    for key in changed_keys(old, new):
        parts = key.split(".")
        known = parts[0] not in fixed or (len(parts) > 2 and parts[1] in fixed[parts[0]])
        (live if known and is_live(key) else restart).append(key)
    return live, restart


def merge(running: Settings, new: Settings) -> Settings:
    """The running settings with the live parts of ``new``; a bad mix is a ConfigError."""
    try:
        return with_live(running, live_of(new))
    except Invalid as e:
        raise ConfigError(e.key, e.problem) from None


async def reload(services: Services, load: Loader, read_timeout: float = READ_TIMEOUT) -> bool:
    """Load the file again (in a thread, within ``read_timeout``) and swap in the new
    snapshot; False (one line) when refused."""
    current = services.live.current
    running = services.running()
    try:
        new = await in_thread(load, read_timeout)
        live, restart = split_changes(running, new)
        merged = merge(running, new)
    except ConfigError as e:
        lines = e.lines() if isinstance(e, ConfigErrors) else [str(e)]
        event("reload_refused", logging.ERROR, error="; ".join(lines), kept="running settings")
        services.metric_groups.edge.config_reloads.labels("rejected").inc()
        return False
    except TimeoutError:
        error = (
            f"the configuration and its secret files could not be read within {read_timeout:g} s"
            " (a stalled file system?)"
        )
        event("reload_refused", logging.ERROR, error=error, kept="running settings")
        return False
    settings = live_of(merged)
    providers, replaced = await _providers(services, current, settings)
    # Previous caller keys and admin token still accepted for inbound.key_overlap seconds.
    callers = current.callers.rotated(settings, services.metric_groups.edge)
    overlap = settings.inbound.key_overlap
    admin_token = current.admin_token.rotated(settings.admin.token, overlap)
    services.live.current = Live(settings, callers, providers, admin_token)
    for provider in replaced:
        await provider.stop()
    announce(current.settings, settings, live, restart)
    _count(services, live, restart, merged)
    return True


def announce(
    before: LiveSettings, after: LiveSettings, live: list[str], restart: list[str]
) -> None:
    """The ``reloaded`` line, written under the more verbose of the two log levels; then
    the new level holds."""
    set_level(min(before.log.level, after.log.level, key=LEVELS.index))
    level = logging.WARNING if restart else logging.INFO
    event("reloaded", level, changed=live, restart_needed=restart)
    set_level(after.log.level)


def _count(services: Services, live: list[str], restart: list[str], merged: Settings) -> None:
    """The reload metrics: its result, and the running configuration when it changed."""
    result = "restart_needed" if restart else "applied" if live else "unchanged"
    services.metric_groups.edge.config_reloads.labels(result).inc()
    if live:
        services.metric_groups.edge.config_applied(masked(merged))


async def _providers(
    services: Services, current: Live, settings: LiveSettings
) -> tuple[dict[str, TokenProvider], list[TokenProvider]]:
    """The providers for the live ``settings``: new ones where an account's credentials
    changed."""
    providers = dict(current.providers)
    replaced: list[TokenProvider] = []
    for name, live in settings.accounts.items():
        if not credentials_changed(current.settings.accounts[name], live):
            continue
        account = applied(services.settings.accounts[name], live, CREDENTIALS)
        provider = provider_for(
            account,
            name=name,
            state_dir=services.settings.state_dir,
            clock=services.clock,
            metrics=services.metric_groups.auth,
            # The running backend and its settings: [shared] is restart-only, so a new
            # provider of a shared account shares the same encrypted record in Redis.
            shared=services.shared,
            shared_settings=services.settings.shared,
            refresh_floor=services.settings.auth.floor_for(account),
        )
        await provider.start(services.session)
        replaced.append(providers[name])
        providers[name] = provider
    return providers, replaced


def credentials_changed(before: LiveAccount, after: LiveAccount) -> bool:
    """Whether a reload changed what the account's token provider is made from."""
    return any(getattr(before, k) != getattr(after, k) for k in CREDENTIALS)


async def in_thread(work: Callable[[], T], patience: float) -> T:
    """``work()`` in a daemon thread of its own, awaited for ``patience`` seconds at most.

    Not the loop's default executor: a read that never returns would hold one of its
    threads for good, and the interpreter waits for those at exit; a daemon thread is
    simply left behind.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # else timed out meanwhile
            outcome()

    def run() -> None:
        try:
            result = work()
        except BaseException as e:  # handed to the awaiting task, whatever it is
            error = e
            outcome = functools.partial(done.set_exception, error)
        else:
            outcome = functools.partial(done.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="reload-read", daemon=True).start()
    return await asyncio.wait_for(done, patience)
