"""The live settings: declared once (proxy.settings.live.LiveSettings), every live key read.

The parts are handed a LiveSettings that records every field read; a key declared live that
no part reads (a reload would log it as applied and apply nothing) fails
:func:`test_every_live_key_is_read_by_a_part`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry

from proxy.cache.layer import Cache
from proxy.cache.metrics import CacheMetrics
from proxy.edge.callers import AdminToken, Callers
from proxy.edge.metrics import EdgeMetrics
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.ops import reload
from proxy.pipeline.budget import Budget
from proxy.pipeline.metrics import PipelineMetrics
from proxy.settings import (
    CREDENTIALS,
    AccountSettings,
    CacheRule,
    CallerSettings,
    ClassWeights,
    LiveSettings,
    Secret,
    Settings,
    applied,
    live_keys,
    live_of,
    with_live,
)
from proxy.settings.live import LiveAccount

SETTINGS = Settings(
    accounts={
        "main": AccountSettings(token=Secret("static-token-0123456789")),
        "other": AccountSettings(
            mode="oauth",
            client_id="id",
            client_secret=Secret("secret-0123456789"),
            refresh_token=Secret("refresh-0123456789"),
        ),
    },
    callers={"shop": CallerSettings(key=Secret("caller-key-0123456789"), account="main")},
)


def recording(value: Any, path: str, seen: set[str]) -> Any:
    """``value`` with every field read (and table walked) added to ``seen`` as its key
    pattern (``*`` for a table's names)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name for f in dataclasses.fields(value)}

        def get(self: Any, name: str) -> Any:
            if name in fields:
                seen.add(f"{path}.{name}" if path else name)
            return object.__getattribute__(self, name)

        cls = type(value)
        spy = object.__new__(type(cls.__name__, (cls,), {"__getattribute__": get}))
        for name in fields:
            where = f"{path}.{name}" if path else name
            object.__setattr__(spy, name, recording(getattr(value, name), where, seen))
        return spy
    if isinstance(value, dict):
        return Table({k: recording(v, f"{path}.*", seen) for k, v in value.items()}, path, seen)
    return value


class Table(dict[str, Any]):
    def __init__(self, items: dict[str, Any], path: str, seen: set[str]) -> None:
        super().__init__(items)
        self.path, self.seen = path, seen

    def __getitem__(self, key: str) -> Any:
        self.seen.add(self.path)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(self.path)
        return super().get(key, default)

    def items(self) -> Any:
        self.seen.add(self.path)
        return super().items()


async def nothing(request: ProxyRequest) -> ProxyResponse:
    raise AssertionError("not sent")


class Inner:
    send = staticmethod(nothing)


def read_by_the_parts(live: LiveSettings) -> None:
    """What the running proxy does with a reload's live settings, part by part."""
    registry = CollectorRegistry()
    started = live_of(SETTINGS)
    Callers(SETTINGS, EdgeMetrics(registry), live=live)  # [inbound], [callers]
    AdminToken(Secret("")).rotated(live.admin.token, live.inbound.key_overlap)
    store: Any = None  # rules() reads no store
    cache = CacheMetrics(registry)
    Cache(Inner(), store, SETTINGS, cache, time.time, current=lambda: live.cache).rules()
    budget = Budget(
        Inner(),
        SETTINGS,
        PipelineMetrics(registry),
        current=lambda: live.accounts,
        classes=lambda: live.budget,
        callers=lambda: live.callers,
    )
    budget.account("main")
    budget.max_share("shop")  # per grant, while the caller's class is busy
    for name, account in live.accounts.items():
        if reload.credentials_changed(started.accounts[name], account):
            applied(SETTINGS.accounts[name], account, CREDENTIALS)
    reload.announce(started, live, [], [])


def test_every_live_key_is_read_by_a_part() -> None:
    seen: set[str] = set()
    read_by_the_parts(cast(LiveSettings, recording(live_of(SETTINGS), "", seen)))
    unread = [key for key in live_keys() if not any(fnmatch.fnmatchcase(s, key) for s in seen)]
    assert unread == []


def test_a_key_nothing_reads_fails_the_check() -> None:
    """The check itself: a LiveSettings with a field no part reads is caught."""

    @dataclasses.dataclass(frozen=True)
    class Wider(LiveSettings):
        unread: int = 0

    seen: set[str] = set()
    wider = Wider(
        **{f.name: getattr(live_of(SETTINGS), f.name) for f in dataclasses.fields(LiveSettings)}
    )
    read_by_the_parts(cast(LiveSettings, recording(wider, "", seen)))
    assert "unread" not in seen and "cache.rules" in seen


def test_live_keys_are_the_field_paths_of_live_settings() -> None:
    keys = live_keys()
    assert "log.level" in keys and "cache.rules" in keys and "admin.token" in keys
    assert "callers" in keys and "callers.*.key" in keys and "inbound.key_overlap" in keys
    assert {f"accounts.*.{f.name}" for f in dataclasses.fields(LiveAccount)} <= set(keys)
    # An account added or removed needs a restart: the table itself is not live.
    assert "accounts" not in keys
    assert not any(k.startswith(("server.", "shared.", "upstream.")) for k in keys)


def test_a_restart_only_key_is_not_applied_and_is_named() -> None:
    new = dataclasses.replace(
        SETTINGS,
        server=dataclasses.replace(SETTINGS.server, port=9999),
        cache=dataclasses.replace(SETTINGS.cache, rules=(CacheRule(path="/v1/*", fresh_for=5),)),
    )
    live, restart = reload.split_changes(SETTINGS, new)
    assert live == ["cache.rules"] and restart == ["server.port"]
    merged = reload.merge(SETTINGS, new)
    assert merged.server.port == SETTINGS.server.port
    assert merged.cache.rules == new.cache.rules


def test_an_account_added_needs_a_restart_and_a_removed_one_keeps_serving() -> None:
    accounts = {"main": SETTINGS.accounts["main"], "new": SETTINGS.accounts["main"]}
    new = dataclasses.replace(SETTINGS, accounts=accounts)
    live, restart = reload.split_changes(SETTINGS, new)
    assert live == [] and restart and all(k.startswith("accounts.") for k in restart)
    merged = with_live(SETTINGS, live_of(new))
    assert set(merged.accounts) == {"main", "other"}


def test_the_reload_docs_name_every_live_key() -> None:
    """docs/operations.md's Reload section lists what a SIGHUP applies: every live key (or its
    whole section) is named there."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = text.split("\n## Reload\n", 1)[1].split("\n## ", 1)[0]
    missing = []
    for key in live_keys():
        parts = key.split(".")
        names = [f"`{key}`", f"`[{parts[0]}]`", f"`[{parts[0]}.*]`"]
        if parts[1:2] == ["*"]:  # per account: listed by its own name ("per account `burst`")
            names.append(f"`{parts[-1]}`")
        if not any(name in section for name in names):
            missing.append(key)
    assert missing == []


def test_the_budget_follows_its_live_slices() -> None:
    """budget.weights, budget.reserve, budget.headroom and a caller's max_share: a reload's
    new slices reach the account's queue on its next request (one identity check), the rest
    stays."""
    holder = [live_of(SETTINGS)]
    budget = Budget(
        Inner(),
        SETTINGS,
        PipelineMetrics(CollectorRegistry()),
        current=lambda: holder[0].accounts,
        classes=lambda: holder[0].budget,
        callers=lambda: holder[0].callers,
    )
    main = budget.account("main")
    assert (main.weights["batch"], main.settings.reserve, budget.max_share("shop")) == (1, 0, 1)
    shop = dataclasses.replace(SETTINGS.callers["shop"], max_share=0.25)
    new = dataclasses.replace(
        SETTINGS,
        budget=dataclasses.replace(
            SETTINGS.budget,
            weights=ClassWeights(batch=4.0),
            reserve=0.5,
            headroom=1,
            max_wait=1.0,
        ),
        callers={"shop": shop},
    )
    holder[0] = live_of(new)
    assert budget.account("main") is main
    assert (main.weights["batch"], main.settings.reserve, budget.max_share("shop")) == (
        4,
        0.5,
        0.25,
    )
    assert main.hold_for("batch") == (0.5, 1) and SETTINGS.budget.headroom == 3
    assert main.settings.max_wait == SETTINGS.budget.max_wait  # restart-only: as started
