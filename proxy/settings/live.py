"""What a reload (SIGHUP) may change, declared once, as one typed value.

:class:`LiveSettings` holds exactly the settings a reload applies; its field paths are the
live keys (:func:`live_keys`: ``log.level``, ``inbound.key_overlap``, ``callers.*.key``,
``accounts.*.burst``, ``admin.token``, ...). A field whose type is a section of
:mod:`proxy.settings.sections` (``inbound``, ``callers``) makes that whole section live; a
slice class of this module (:class:`LiveAccount`, ...) names the live fields of a section
whose other fields need a restart. Adding a live setting is adding it here, and to the part
that reads it; ``tests/unit/test_live.py`` fails for a live key nothing reads.

Each part is built with its startup section and reads only its live slice of the current
:class:`LiveSettings` (``Live.settings`` in :mod:`proxy.edge.services`): the cache and the
budget, which read theirs per request, are handed a function returning it
(``LiveRef.cache``, ``LiveRef.accounts``, ``LiveRef.budget``, ``LiveRef.callers``); the
callers, the token providers and the admin token are made anew from theirs by the reload,
each carrying over what must outlive it.
A part that needs a whole section combines the two with :func:`applied`. :func:`with_live`
is the same for the whole tree: the settings the proxy runs with, for reports (the
``reloaded`` line, the config hash).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proxy.settings.base import Invalid, Secret
from proxy.settings.handling import CallerSettings, ClassWeights, InboundSettings, LogLevel
from proxy.settings.sections import CacheRule, Settings

S = TypeVar("S")
# A table whose names are fixed at start (an account added or removed needs a restart).
FIXED_NAMES = {"names": "restart"}


@dataclass(frozen=True)
class LiveLog:
    level: LogLevel = "info"


@dataclass(frozen=True)
class LiveCache:
    rules: tuple[CacheRule, ...] = ()


@dataclass(frozen=True)
class LiveAccount:
    # The budget's rates (proxy.pipeline.budget.Budget).
    rate_per_minute: int = 0
    burst: int = 0
    # The credentials (CREDENTIALS): a change makes a new token provider.
    token: Secret = Secret("")
    client_id: str = ""
    client_secret: Secret = Secret("")
    refresh_token: Secret = Secret("")


# The LiveAccount fields a token provider is made from, and those the budget reads.
CREDENTIALS = ("token", "client_id", "client_secret", "refresh_token")
RATES = ("rate_per_minute", "burst")


@dataclass(frozen=True)
class LiveBudget:
    # The budget classes' shares and the batch reserve (proxy.pipeline.budget.Budget).
    weights: ClassWeights = field(default_factory=ClassWeights)
    reserve: float = 0.0
    headroom: int = 3


# The LiveBudget fields, applied to the budget section as started.
CLASS_SHARES = ("weights", "reserve", "headroom")


@dataclass(frozen=True)
class LiveAdmin:
    # The admin token (admin.token_file); the previous one is accepted for
    # inbound.key_overlap seconds after a reload changed it.
    token: Secret = Secret("")


@dataclass(frozen=True)
class LiveSettings:
    log: LiveLog = field(default_factory=LiveLog)
    inbound: InboundSettings = field(default_factory=InboundSettings)
    callers: dict[str, CallerSettings] = field(default_factory=dict)
    cache: LiveCache = field(default_factory=LiveCache)
    accounts: dict[str, LiveAccount] = field(default_factory=dict, metadata=FIXED_NAMES)
    budget: LiveBudget = field(default_factory=LiveBudget)
    admin: LiveAdmin = field(default_factory=LiveAdmin)


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_slice(tp: Any) -> bool:
    """A slice class of this module: some fields of a section, the others restart-only."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and tp.__module__ == __name__


def _table_of(tp: Any) -> Any:
    """The value type of a ``dict[str, X]`` table, else None."""
    return typing.get_args(tp)[1] if typing.get_origin(tp) is dict else None


@functools.cache
def live_keys() -> tuple[str, ...]:
    """Every live key as an fnmatch pattern (``*``: any account or caller name); a table
    whose names may change (``callers``) is also live as a whole."""

    def walk(tp: Any, prefix: str) -> list[str]:
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys: list[str] = []
            for f in dataclasses.fields(tp):
                path = f"{prefix}.{f.name}" if prefix else f.name
                table = _table_of(_hints(tp)[f.name])
                if table is not None:
                    if f.metadata != FIXED_NAMES:
                        keys.append(path)
                    keys += walk(table, f"{path}.*")
                else:
                    keys += walk(_hints(tp)[f.name], path)
            return keys
        return [prefix]

    return tuple(walk(LiveSettings, ""))


def fixed_tables() -> tuple[str, ...]:
    """The tables whose names a reload cannot change (``accounts``)."""
    return tuple(f.name for f in dataclasses.fields(LiveSettings) if f.metadata == FIXED_NAMES)


def live_of(settings: Settings) -> LiveSettings:
    """The live slice of ``settings``."""
    return typing.cast(LiveSettings, _slice(LiveSettings, settings))


def _slice(tp: Any, value: Any) -> Any:
    if _is_slice(tp):
        hints = _hints(tp)
        return tp(
            **{
                f.name: _slice(hints[f.name], getattr(value, f.name))
                for f in dataclasses.fields(tp)
            }
        )
    table = _table_of(tp)
    if table is not None:
        return {name: _slice(table, item) for name, item in value.items()}
    return value


def applied(section: S, live: object, names: tuple[str, ...]) -> S:
    """``section`` (as started) with the fields ``names`` of its live slice ``live``."""
    return dataclasses.replace(section, **{name: getattr(live, name) for name in names})  # type: ignore[type-var]


def with_live(running: Settings, live: LiveSettings) -> Settings:
    """The running settings with the live parts of ``live``: what the proxy runs with after
    a reload. A table's names stay the running ones where they are fixed (an account added
    or removed needs a restart; a removed one keeps serving meanwhile). A mix that does not
    hold together raises :class:`Invalid` naming the key."""
    return typing.cast(Settings, _merge(LiveSettings, running, live, ""))


def _merge(tp: Any, running: Any, live: Any, path: str) -> Any:
    if not _is_slice(tp):  # a whole section, a table of them or a value: the live one
        return live
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(tp):
        hint = _hints(tp)[f.name]
        where = f"{path}.{f.name}" if path else f.name
        table = _table_of(hint)
        old, new = getattr(running, f.name), getattr(live, f.name)
        if table is not None and f.metadata == FIXED_NAMES:
            changes[f.name] = {
                name: item if name not in new else _merge(table, item, new[name], f"{where}.{name}")
                for name, item in old.items()
            }
        else:
            changes[f.name] = _merge(hint, old, new, where)
    try:
        return dataclasses.replace(running, **changes)
    except Invalid as e:
        raise Invalid(f"{path}.{e.key}" if path else e.key, e.problem) from None
