"""Rules with webhooks = true (proxy.cache.layer + proxy.cache.webhooks.verifier): fresh_for
while the feed is healthy, fallback_fresh_for once a missed change was seen; Cache-Status
says which. Real proxy, real disk cache, a counting upstream changed behind its back."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.cache.invalidation import Invalidation, normalise_path
from proxy.cache.webhooks import verifier
from proxy.edge.services import SERVICES
from proxy.settings import CacheRule, CacheSettings, Secret, WebhookSettings
from tests.conftest import TOKEN, MakeProxy, Sandbox, proxy_settings, serve_handler
from tests.integration.test_webhooks import PRODUCTS, Hooked, Upstream, start_hooked


async def read(url: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        return r.headers["X-Cache"], r.headers["Cache-Status"]


def sample(h: Hooked, name: str, **labels: str) -> float:
    return h.proxy.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def quick(
    make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Hooked]:
    monkeypatch.setattr(verifier, "TICK", 0.05)
    async for h in start_hooked(
        make_proxy, tmp_path, verify_every=0.1, distrust_for=600, delivery_grace=0.5
    ):
        yield h


async def test_a_missed_change_distrusts_the_feed_and_the_fallback_applies(quick: Hooked) -> None:
    h = quick
    url = f"{h.proxy.url}{PRODUCTS}/12"
    assert (await read(url))[0] == "MISS"
    cache, status = await read(url)
    assert (cache, status) == ("HIT", "kounta-proxy; hit; detail=webhooks")
    assert sample(h, "kounta_proxy_webhook_feed_healthy", account="main") == 1
    h.upstream.version[f"{PRODUCTS}/12"] += 1  # changed at a till: no delivery
    deadline = asyncio.get_running_loop().time() + 5
    while sample(h, "kounta_proxy_webhook_missed_total", account="main") < 1:
        assert asyncio.get_running_loop().time() < deadline, "the verifier saw nothing"
        await read(url)  # keeps the entry among the recent webhook-fresh reads
        await asyncio.sleep(0.05)
    assert sample(h, "kounta_proxy_webhook_feed_healthy", account="main") == 0
    # The stale entry was dropped at once; then fallback_fresh_for = 0: every read asks
    # Kounta, and says why.
    assert (await read(url))[0] == "MISS"
    before = h.upstream.hits[f"{PRODUCTS}/12"]
    cache, status = await read(url)
    assert cache == "REVALIDATED"
    assert "detail=webhooks-fallback" in status
    assert h.upstream.hits[f"{PRODUCTS}/12"] == before + 1
    # Missed once, logged once; the verifier skips a distrusted feed.
    await asyncio.sleep(0.3)
    assert sample(h, "kounta_proxy_webhook_missed_total", account="main") == 1


async def test_a_change_announced_in_time_keeps_the_feed_healthy(quick: Hooked) -> None:
    h = quick
    url = f"{h.proxy.url}{PRODUCTS}/12"
    await read(url)
    await read(url)
    h.upstream.version[f"{PRODUCTS}/12"] += 1
    # The verifier may see the change first; the delivery comes within the grace.
    await asyncio.sleep(0.15)
    assert (await h.deliver({"topic": "products/updated", "id": 12}))[0] == 200
    await asyncio.sleep(1.0)
    assert sample(h, "kounta_proxy_webhook_missed_total", account="main") == 0
    assert sample(h, "kounta_proxy_webhook_feed_healthy", account="main") == 1
    unchanged = sample(
        h, "kounta_proxy_webhook_verifications_total", account="main", result="unchanged"
    )
    changed = sample(
        h, "kounta_proxy_webhook_verifications_total", account="main", result="changed"
    )
    assert unchanged + changed >= 1


async def test_unchanged_entries_keep_the_feed_healthy(quick: Hooked) -> None:
    h = quick
    url = f"{h.proxy.url}{PRODUCTS}/12"
    await read(url)
    for _ in range(10):
        assert (await read(url))[0] == "HIT"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    done = sample(h, "kounta_proxy_webhook_verifications_total", account="main", result="unchanged")
    assert done >= 1
    assert sample(h, "kounta_proxy_webhook_missed_total", account="main") == 0
    assert (await read(url))[0] == "HIT"


async def test_without_webhooks_a_webhook_rule_uses_its_fallback(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream = Upstream()
    runner, origin = await serve_handler(upstream.handle)
    try:
        rule = CacheRule(path="/v1/*", fresh_for=3600, webhooks=True, fallback_fresh_for=60)
        settings = dataclasses.replace(
            proxy_settings(origin, tmp_path), cache=CacheSettings(rules=(rule,))
        )
        proxy = await make_proxy(settings)
        url = f"{proxy.url}{PRODUCTS}/5"
        await read(url)
        cache, status = await read(url)
        assert (cache, status) == ("HIT", "kounta-proxy; hit; detail=webhooks-fallback")
        plain = CacheRule(path="/v1/*", fresh_for=0, webhooks=True)
        settings = dataclasses.replace(settings, cache=CacheSettings(rules=(plain,)))
        proxy = await make_proxy(dataclasses.replace(settings, state_dir=str(tmp_path / "b")))
        url = f"{proxy.url}{PRODUCTS}/5"
        await read(url)
        assert (await read(url))[0] == "REVALIDATED"
    finally:
        await runner.cleanup()


async def test_the_registration_check_distrusts_a_feed_with_no_webhook_at_the_address(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(verifier, "TICK", 0.05)
    address = "https://hooks.example.com"
    hooks = WebhookSettings(
        enabled=True, port=0, secret=Secret("s" * 20), address=address, check_every=0.1
    )
    rule = CacheRule(path="/v1/*", fresh_for=3600, webhooks=True)
    settings = dataclasses.replace(
        proxy_settings(sandbox.url, tmp_path), cache=CacheSettings(rules=(rule,)), webhooks=hooks
    )
    proxy = await make_proxy(settings)

    def gauge(name: str) -> float | None:
        return proxy.registry.get_sample_value(name, {"account": "main"})

    async def until(name: str, value: float) -> None:
        deadline = asyncio.get_running_loop().time() + 5
        while gauge(name) != value:
            assert asyncio.get_running_loop().time() < deadline, (name, gauge(name))
            await asyncio.sleep(0.05)

    await until("kounta_proxy_webhook_registered", 0)
    assert gauge("kounta_proxy_webhook_feed_healthy") == 0
    body = {"topic": "products/updated", "address": f"{address}/webhooks/kounta/main"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{sandbox.url}/v1/companies/5001/webhooks",
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r,
    ):
        assert r.status == 201
    await until("kounta_proxy_webhook_registered", 1)
    assert gauge("kounta_proxy_webhook_feed_healthy") == 1
    # The checks were the verifier's own requests, and went below the cache.
    assert sandbox.state.served(path="/v1/companies/me/webhooks.json") >= 2


async def test_entries_stored_before_a_distrust_ended_are_revalidated_once(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """A missed change means any entry may be stale: one not read while the feed was
    distrusted must not be trusted again by fresh_for once the distrust ends."""
    async for h in start_hooked(make_proxy, tmp_path, verify_every=0):
        url = f"{h.proxy.url}{PRODUCTS}/12"
        await read(url)
        assert (await read(url))[0] == "HIT"
        h.upstream.version[f"{PRODUCTS}/12"] += 1  # its delivery was lost
        services = h.proxy.app[SERVICES]
        assert services.cache is not None
        services.cache.feeds.distrust("main", 0.3)  # another entry's missed change was found
        await asyncio.sleep(0.4)  # nobody read product 12 meanwhile; the feed is trusted again
        assert sample(h, "kounta_proxy_webhook_feed_healthy", account="main") == 1
        cache, status = await read(url)
        assert cache != "HIT" and "detail=webhooks-fallback" in status
        assert h.upstream.hits[f"{PRODUCTS}/12"] == 2
        # Stored anew after the distrust: trusted again.
        assert (await read(url)) == ("HIT", "kounta-proxy; hit; detail=webhooks")


async def test_a_list_page_finds_the_one_stale_record_among_many(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One of 25 cached products changed at a till and its delivery was lost: one list page
    names it, and the next check confirms it — within a few checks, not by the luck of
    picking that one record among the reads (the newest read is picked first)."""
    monkeypatch.setattr(verifier, "TICK", 0.05)
    hooks = WebhookSettings(
        enabled=True, port=0, secret=Secret("s" * 20), verify_every=0.1, delivery_grace=0.2
    )
    rule = CacheRule(path="/v1/*", fresh_for=3600, webhooks=True)
    settings = dataclasses.replace(
        proxy_settings(sandbox.url, tmp_path), cache=CacheSettings(rules=(rule,)), webhooks=hooks
    )
    proxy = await make_proxy(settings)
    services = proxy.app[SERVICES]
    assert services.cache is not None
    feeds = services.cache.feeds
    feeds.distrust("main", 5)  # no checks while the records are stored

    async def read_all(s: aiohttp.ClientSession, ids: list[int]) -> None:
        for i in ids:
            async with s.get(f"{proxy.url}/v1/companies/5001/products/{i}.json") as r:
                assert r.status == 200

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        async with s.get(f"{sandbox.url}/v1/companies/5001/products.json") as r:
            ids = [p["id"] for p in await r.json()]
        assert len(ids) >= 20
        await read_all(s, ids)  # stored
        sandbox.state.store.touch("products", ids[0])  # changed at a till; no delivery
        feeds.feeds["main"].state = dataclasses.replace(
            feeds.feeds["main"].state, distrusted_until=0
        )
        await read_all(s, ids)  # read webhook-fresh: the first one is the oldest read

    def asked() -> float:
        return sum(
            proxy.registry.get_sample_value(
                "kounta_proxy_webhook_verifications_total", {"account": "main", "result": r}
            )
            or 0.0
            for r in ("unchanged", "changed", "listed", "suspect")
        )

    deadline = asyncio.get_running_loop().time() + 5
    while not proxy.registry.get_sample_value(
        "kounta_proxy_webhook_missed_total", {"account": "main"}
    ):
        assert asyncio.get_running_loop().time() < deadline, f"not found in {asked()} checks"
        await asyncio.sleep(0.05)
    assert asked() <= 2, "found, but only after checking records one by one"
    assert services.cache.feeds.healthy("main") is False


async def test_a_change_delivered_after_the_entry_was_fetched_is_not_missed(
    quick: Hooked,
) -> None:
    """A list page changes with each of its members: a delivery the receiver took for the
    family after the page was fetched explains the change, even one older than the grace
    (here the page outlived the purge, as a purge racing a fetch can leave it)."""
    h = quick
    url = f"{h.proxy.url}{PRODUCTS}"
    assert (await read(url))[0] == "MISS"
    fetched = time.time()
    await asyncio.sleep(0.7)  # longer than delivery_grace (0.5) before any check
    h.upstream.version[PRODUCTS] += 1
    services = h.proxy.app[SERVICES]
    assert services.cache is not None
    change = Invalidation("main", frozenset({normalise_path(PRODUCTS)}))
    services.cache.feeds.feeds["main"].recent.append((fetched, change))
    assert (await read(url))[0] == "HIT"  # a webhook-fresh read: the verifier picks it
    deadline = asyncio.get_running_loop().time() + 5
    while not sample(
        h, "kounta_proxy_webhook_verifications_total", account="main", result="changed"
    ):
        assert asyncio.get_running_loop().time() < deadline, "not verified"
        assert sample(h, "kounta_proxy_webhook_missed_total", account="main") == 0
        await asyncio.sleep(0.05)
    assert sample(h, "kounta_proxy_webhook_feed_healthy", account="main") == 1
