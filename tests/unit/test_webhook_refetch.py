"""The refetcher's queue (proxy.cache.webhooks.refetch) with a fake cache layer: reads
remembered within the window, coalesced per key, bounded (drops counted), one more run
for a key changed while its refetch runs, its own reads not counted."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.cache.invalidation import Invalidation, Purge
from proxy.cache.webhooks import refetch
from proxy.cache.webhooks.metrics import WebhookMetrics
from proxy.cache.webhooks.refetch import Reads, Refetcher
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.settings import Settings, WebhookSettings

P = "/v1/companies/5/products"


def request(path: str, **headers: str) -> ProxyRequest:
    return ProxyRequest("GET", path, "", CIMultiDictProxy(CIMultiDict(headers)), account="main")


def test_reads_within_the_window_that_a_change_covers() -> None:
    reads = Reads(limit=3)
    reads.read("k1", request(f"{P}/1.json"), now=0.0)
    reads.read("k2", request(f"{P}/2.json"), now=5.0)
    reads.read("k12", request(f"{P}/12.json"), now=6.0)
    change = Invalidation("main", frozenset({f"{P}/1", f"{P}/2", f"{P}/12"}))
    assert [k for k, _ in reads.covered(change, now=7.0, window=10.0)] == ["k1", "k2", "k12"]
    only_1 = Invalidation("main", frozenset({f"{P}/1"}))
    assert [k for k, _ in reads.covered(only_1, now=7.0, window=10.0)] == ["k1"]
    # Older than the window: forgotten.
    assert [k for k, _ in reads.covered(change, now=15.5, window=10.0)] == ["k12"]
    assert list(reads.at) == ["k12"]
    assert reads.covered(Purge(account="other"), now=15.5, window=10.0) == []
    for i in range(5):  # bounded: the oldest go first
        reads.read(f"n{i}", request(f"{P}/{i}"), now=16.0)
    assert list(reads.at) == ["n2", "n3", "n4"]


class FakeCache:
    def __init__(self) -> None:
        self.sent: list[ProxyRequest] = []
        self.arrived: asyncio.Queue[ProxyRequest] = asyncio.Queue()
        self.gate = asyncio.Event()
        self.gate.set()

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        self.sent.append(request)
        self.arrived.put_nowait(request)
        await self.gate.wait()
        return ProxyResponse(200, CIMultiDict(), b"{}", cache_status="MISS", upstream_status=200)


def refetcher(enabled: bool = True) -> tuple[Refetcher, FakeCache, WebhookMetrics]:
    hooks = WebhookSettings(refetch=enabled, refetch_window=60)
    settings = dataclasses.replace(Settings(), webhooks=hooks)

    async def spare(account: str) -> bool:
        return True

    metrics = WebhookMetrics(CollectorRegistry())
    r = Refetcher(lambda: settings, spare, metrics, now=lambda: 100.0)
    cache = FakeCache()
    r.layer = cache
    return r, cache, metrics


def count(metrics: WebhookMetrics, outcome: str) -> float:
    return metrics.refetches.labels("main", outcome)._value.get()


async def test_refetches_are_coalesced_and_rerun_after_a_change_in_flight() -> None:
    r, cache, metrics = refetcher()
    read = request(f"{P}/1.json", If_None_Match='"x"', Cache_Control="no-cache", Accept="a/b")
    r.read("k1", read)
    change = Invalidation("main", frozenset({f"{P}/1"}))
    r.changed(change)
    r.changed(change)  # coalesced
    assert list(r.pending) == ["k1"]
    cache.gate.clear()
    worker = asyncio.create_task(r.run())
    try:
        sent = await asyncio.wait_for(cache.arrived.get(), 2)
        assert r.running == {"k1"}
        assert (sent.caller, sent.priority, sent.method) == (refetch.CALLER, "batch", "GET")
        assert "If-None-Match" not in sent.headers and "Cache-Control" not in sent.headers
        assert sent.headers["Accept"] == "a/b"
        r.changed(change)  # changed again while its refetch runs: once more afterwards
        r.changed(change)
        cache.gate.set()
        await asyncio.wait_for(cache.arrived.get(), 2)
        await asyncio.sleep(0.05)
        assert not r.running and not r.pending
        assert len(cache.sent) == 2
        assert count(metrics, "fetched") == 2
    finally:
        worker.cancel()
    # The refetcher's own reads are not remembered (nothing read would be refetched forever).
    r.read("k9", dataclasses.replace(request(f"{P}/9"), caller=refetch.CALLER))
    assert "k9" not in r.reads.at


def test_the_queue_is_bounded_and_drops_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    r, _, metrics = refetcher()
    monkeypatch.setattr(refetch, "QUEUE", 2)
    assert r.enqueue("a", request(f"{P}/1")) and r.enqueue("b", request(f"{P}/2"))
    assert not r.enqueue("c", request(f"{P}/3"))
    assert count(metrics, "dropped") == 1
    assert list(r.pending) == ["a", "b"]


def test_off_by_default_nothing_is_remembered_or_queued() -> None:
    r, _, _ = refetcher(enabled=False)
    r.read("k1", request(f"{P}/1"))
    r.changed(Purge(account="main"))
    assert not r.reads.at and not r.pending


def test_a_purge_of_everything_is_not_refilled() -> None:
    r, _, _ = refetcher()
    r.read("k1", request(f"{P}/1"))
    r.changed(Purge())
    assert not r.pending
    r.changed(Purge(account="main"))  # a delivery of an unknown family: the account
    assert list(r.pending) == ["k1"]
