"""Metrics an operator needs beside the request ones: Redis round-trip latency (errors
included), and what configuration runs (reloads, when loaded, its hash)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.edge.services import SERVICES
from proxy.ops.reload import reload
from proxy.settings import CacheRule, ConfigError, Secret, Settings
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings
from tests.replicas import RedisSpace


def count(registry: CollectorRegistry, op: str) -> float:
    value = registry.get_sample_value("kounta_proxy_shared_call_duration_seconds_count", {"op": op})
    return float(value or 0.0)


async def test_redis_round_trips_are_timed_by_operation(
    redis_space: RedisSpace,
) -> None:
    registry = CollectorRegistry()
    async with redis_space.backend(registry) as shared:
        for _ in range(3):
            await shared.take("main", 100, 10, 0.6)
    assert count(registry, "budget") == 3
    total = registry.get_sample_value(
        "kounta_proxy_shared_call_duration_seconds_sum", {"op": "budget"}
    )
    assert total is not None and 0 < total < 3


def reloads(proxy: Proxy, result: str) -> float:
    value = proxy.registry.get_sample_value("kounta_proxy_config_reloads_total", {"result": result})
    return float(value if value is not None else -1)


def running_hash(proxy: Proxy) -> str:
    for family in proxy.registry.collect():
        if family.name == "kounta_proxy_config":
            return str(family.samples[0].labels["hash"])
    raise AssertionError("no kounta_proxy_config_info")


async def test_reloads_are_counted_by_result_and_the_running_config_is_hashed(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any
) -> None:
    settings = proxy_settings(sandbox.url, tmp_path)
    proxy = await make_proxy(settings)
    services = proxy.app[SERVICES]
    assert {r: reloads(proxy, r) for r in ("applied", "rejected", "unchanged")} == {
        "applied": 0,
        "rejected": 0,
        "unchanged": 0,
    }
    loaded = proxy.registry.get_sample_value("kounta_proxy_config_loaded_timestamp_seconds")
    assert loaded is not None and abs(loaded - time.time()) < 60
    first = running_hash(proxy)

    def broken() -> Settings:
        raise ConfigError("server.port", "must be an integer, got a string")

    assert not await reload(services, broken)
    assert reloads(proxy, "rejected") == 1 and running_hash(proxy) == first
    assert await reload(services, lambda: settings)
    assert reloads(proxy, "unchanged") == 1 and running_hash(proxy) == first
    rules = (CacheRule(path="/v1/companies/*", fresh_for=60),)
    new = dataclasses.replace(settings, cache=dataclasses.replace(settings.cache, rules=rules))
    assert await reload(services, lambda: new)
    assert reloads(proxy, "applied") == 1 and running_hash(proxy) != first
    # A secret changes the configuration but never the hash (it must not let anyone test a
    # guessed key); the reload is still counted as applied.
    account = dataclasses.replace(settings.accounts["main"], token=Secret("another-token-123"))
    before = running_hash(proxy)
    assert await reload(services, lambda: dataclasses.replace(new, accounts={"main": account}))
    assert reloads(proxy, "applied") == 2 and running_hash(proxy) == before
