"""Metrics an operator needs beside the request ones: Redis round-trip latency (errors
included), and what configuration runs (reloads, when loaded, its hash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from proxy.metrics import Metrics
from proxy.settings import SharedSettings
from proxy.shared import RedisBackend
from tests.redis_server import RedisServer


def count(registry: CollectorRegistry, op: str) -> float:
    value = registry.get_sample_value("kounta_proxy_shared_call_duration_seconds_count", {"op": op})
    return float(value or 0.0)


async def test_redis_round_trips_are_timed_by_operation(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    registry = CollectorRegistry()
    shared = RedisBackend(
        SharedSettings(backend="redis", url=redis_server.url, key_prefix=redis_prefix),
        Metrics(registry),
    )
    await shared.start()
    try:
        for _ in range(3):
            await shared.take("main", 100, 10, 0.6)
    finally:
        await shared.close()
    assert count(registry, "budget") == 3
    total = registry.get_sample_value(
        "kounta_proxy_shared_call_duration_seconds_sum", {"op": "budget"}
    )
    assert total is not None and 0 < total < 3
