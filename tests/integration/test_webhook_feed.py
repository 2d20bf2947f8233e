"""Rules with webhooks = true (proxy.cache.layer + proxy.cache.webhooks.verifier): fresh_for
while the feed is healthy, fallback_fresh_for once a missed change was seen; Cache-Status
says which. Real proxy, real disk cache, a counting upstream changed behind its back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.cache.invalidation import Invalidation, normalise_path
from proxy.cache.webhooks import verifier
from proxy.edge.services import SERVICES
from proxy.settings import CacheRule, CacheSettings, Secret, WebhookSettings
from tests.conftest import TOKEN, MakeProxy, Proxy, Sandbox, proxy_settings, serve_handler
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
    seen = []
    while sample(h, "kounta_proxy_webhook_missed_total", account="main") < 1:
        assert asyncio.get_running_loop().time() < deadline, "the verifier saw nothing"
        seen.append((await read(url))[0])  # keeps the entry among the recent webhook-fresh reads
        await asyncio.sleep(0.05)
    assert sample(h, "kounta_proxy_webhook_feed_healthy", account="main") == 0
    # The verifier's checks are background work: budget class batch.
    assert sample(h, "kounta_proxy_budget_served_total", account="main", **{"class": "batch"})
    # The stale entry was dropped at once: the first read after the drop is a MISS (it may be
    # one of the loop's, made before the count was looked at); then fallback_fresh_for = 0:
    # every read asks Kounta, and says why.
    after = [cache for cache in seen if cache != "HIT"]
    if after:
        assert after[0] == "MISS", seen
    else:
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
    # The checks were the verifier's own requests, and went below the cache, as batch.
    assert sandbox.state.served(path="/v1/companies/me/webhooks.json") >= 2
    served = {
        klass: proxy.registry.get_sample_value(
            "kounta_proxy_budget_served_total", {"account": "main", "class": klass}
        )
        for klass in ("standard", "batch")
    }
    assert served["standard"] == 0 and (served["batch"] or 0) >= 2, served


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


@pytest.mark.parametrize(("list_read", "checks"), [(False, 2), (True, 1)])
async def test_a_list_page_finds_the_one_stale_record_among_many(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    list_read: bool,
    checks: int,
) -> None:
    """One of 25 cached products changed at a till and its delivery was lost. The verifier
    fetches the list page and confirms the record it contradicts with the next check; when
    callers read that page lately, the cached page names it and the first check confirms
    it. Before, records were revalidated one by one, newest read first: 25 checks here."""
    monkeypatch.setattr(verifier, "TICK", 0.05)
    ready = asyncio.Event()  # no checks until every read is done
    original = verifier.Verifier._verify

    async def after_the_reads(self: verifier.Verifier, account: str) -> str:
        await ready.wait()
        return await original(self, account)

    monkeypatch.setattr(verifier.Verifier, "_verify", after_the_reads)
    hooks = WebhookSettings(
        enabled=True, port=0, secret=Secret("s" * 20), verify_every=0.1, delivery_grace=0.2
    )
    rule = CacheRule(path="/v1/*", fresh_for=3600, webhooks=True)
    settings = dataclasses.replace(
        proxy_settings(sandbox.url, tmp_path), cache=CacheSettings(rules=(rule,)), webhooks=hooks
    )
    proxy = await make_proxy(settings)
    company = f"{proxy.url}/v1/companies/5001"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        async with s.get(f"{sandbox.url}/v1/companies/5001/products.json") as r:
            ids = [p["id"] for p in await r.json()]
        assert len(ids) >= 20
        for i in ids:  # stored
            async with s.get(f"{company}/products/{i}.json") as r:
                assert r.status == 200
        sandbox.state.store.touch("products", ids[0])  # changed at a till; no delivery
        for i in ids:  # read webhook-fresh: the changed one is the oldest read
            async with s.get(f"{company}/products/{i}.json") as r:
                assert r.headers["X-Cache"] == "HIT"
        for _ in range(2 if list_read else 0):  # stored (it shows the change), then read
            async with s.get(f"{company}/products.json") as r:
                assert r.status == 200

    def asked() -> float:
        return sum(
            proxy.registry.get_sample_value(
                "kounta_proxy_webhook_verifications_total", {"account": "main", "result": r}
            )
            or 0.0
            for r in ("unchanged", "changed", "missed", "listed", "suspect")
        )

    ready.set()
    deadline = asyncio.get_running_loop().time() + 5
    while not proxy.registry.get_sample_value(
        "kounta_proxy_webhook_missed_total", {"account": "main"}
    ):
        assert asyncio.get_running_loop().time() < deadline, f"not found in {asked()} checks"
        await asyncio.sleep(0.05)
    assert asked() == checks
    services = proxy.app[SERVICES]
    assert services.cache is not None and services.cache.feeds.healthy("main") is False


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


async def test_a_list_that_shows_a_field_otherwise_is_not_a_missed_change(
    make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kounta's abridged list may show a field in another form than the record: the record
    is a suspect once, its revalidation finds it unchanged, and the same member does not
    name it again (no check wasted on it per page, no missed change)."""
    monkeypatch.setattr(verifier, "TICK", 0.05)
    asked: list[str] = []

    async def kounta(request: web.Request) -> web.Response:
        asked.append(request.path)
        if request.path.endswith("/products.json"):
            body: object = [{"id": 12, "name": "SHORT"}, {"id": 13, "name": "x"}]
        else:
            body = {"id": 12, "name": "Long name", "price": 3}
        etag = f'"{len(json.dumps(body))}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.json_response(body, headers={"ETag": etag})

    runner, origin = await serve_handler(kounta)
    try:
        hooks = WebhookSettings(
            enabled=True, port=0, secret=Secret("s" * 20), verify_every=0.1, delivery_grace=0.1
        )
        rule = CacheRule(path="/v1/*", fresh_for=3600, webhooks=True)
        settings = dataclasses.replace(
            proxy_settings(origin, tmp_path), cache=CacheSettings(rules=(rule,)), webhooks=hooks
        )
        proxy = await make_proxy(settings)
        url = f"{proxy.url}{PRODUCTS}/12.json"
        assert (await read(url))[0] == "MISS"

        def result(name: str) -> float:
            labels = {"account": "main", "result": name}
            value = proxy.registry.get_sample_value(
                "kounta_proxy_webhook_verifications_total", labels
            )
            return value or 0.0

        deadline = asyncio.get_running_loop().time() + 5
        while result("listed") < 4:
            assert asyncio.get_running_loop().time() < deadline, asked
            assert (await read(url))[0] == "HIT"  # a webhook-fresh read to verify
            await asyncio.sleep(0.05)
        assert result("suspect") == 1 and result("unchanged") == 1
        assert result("missed") == 0
        assert sample_healthy(proxy) == 1
    finally:
        await runner.cleanup()


def sample_healthy(proxy: Proxy) -> float:
    value = proxy.registry.get_sample_value(
        "kounta_proxy_webhook_feed_healthy", {"account": "main"}
    )
    return value or 0.0
