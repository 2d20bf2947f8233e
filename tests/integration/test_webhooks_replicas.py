"""Webhooks end to end: two replicas on a real redis-server, a products rule with
webhooks = true, the sandbox delivering to one replica. A change made at a till (the
proxies never see it) is answered through both within 5 s; a read of an unchanged product
never reaches Kounta."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.cache.webhooks import verifier
from proxy.edge.services import SERVICES
from proxy.listener import bound_port
from proxy.ops.lifecycle import start_webhooks
from proxy.settings import CacheRule, CacheSettings, Secret, WebhookSettings
from tests.conftest import TOKEN, Proxy, Sandbox, proxy_settings
from tests.replicas import Replicas

SECRET = "replica-hook-secret-42"


async def get(client: aiohttp.ClientSession, url: str) -> tuple[str, dict[str, object]]:
    async with client.get(url) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Cache"], json.loads(await r.read())


async def two_replicas(
    replicas: Replicas,
    sandbox: Sandbox,
    verify_every: tuple[float, float],
    delivery_grace: float = 10.0,
) -> list[Proxy]:
    """Replicas a and b on one Redis, a products rule with webhooks = true, each with its own
    webhook listener and ``verify_every``."""
    rule = CacheRule("/v1/companies/*/products*", fresh_for=3600, webhooks=True)
    return await replicas.start(
        *(
            proxy_settings(
                sandbox.url,
                replicas.tmp_path / name,
                cache=CacheSettings(rules=(rule,)),
                shared=replicas.space.settings(timeout=0.3),
                webhooks=WebhookSettings(
                    enabled=True,
                    port=0,
                    secret=Secret(SECRET),
                    verify_every=every,
                    delivery_grace=delivery_grace,
                ),
            )
            for name, every in zip(("a", "b"), verify_every, strict=True)
        )
    )


async def test_an_out_of_band_change_reaches_both_replicas_and_unchanged_reads_stay_local(
    replicas: Replicas,
    sandbox: Sandbox,
    client: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    # verify_every = 0: no verifier requests, so every upstream read below is a caller's.
    a, b = await two_replicas(replicas, sandbox, (0.0, 0.0))
    hooks = await start_webhooks(a.app[SERVICES])
    assert hooks is not None
    try:
        address = f"http://127.0.0.1:{bound_port(hooks)}/webhooks/kounta/main"
        body = {"topic": "products/updated", "address": address,
                "headers": {"Authorization": f"Bearer {SECRET}"}}  # fmt: skip
        async with client.post(
            f"{sandbox.url}/v1/companies/5001/webhooks",
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            assert r.status == 201
        changed_id, same_id = sandbox.state.store["products"].ids[:2]
        changed = f"/v1/companies/5001/products/{changed_id}.json"
        same = f"/v1/companies/5001/products/{same_id}.json"
        old: dict[str, object] = {}
        for proxy in (a, b):
            for path in (changed, same):
                _, old[path] = await get(client, proxy.url + path)
                assert (await get(client, proxy.url + path))[0] == "HIT"
        served_same = sandbox.state.served(path=same)
        # A change at a till: Kounta (the sandbox) tells replica a's webhook listener only.
        async with client.post(
            f"{sandbox.url}/_sandbox/touch", json={"kind": "products", "id": changed_id}
        ) as r:
            assert r.status == 204
        touched = time.monotonic()
        for proxy in (a, b):
            while True:
                _, record = await get(client, proxy.url + changed)
                if record["updated_at"] != old[changed]["updated_at"]:  # type: ignore[index]
                    break
                assert time.monotonic() - touched < 5.0, f"{proxy.url} still answers the old one"
                await asyncio.sleep(0.02)
        print(f"change visible through both replicas after {time.monotonic() - touched:.3f} s")
        # The unchanged product: answered from the cache by both, never asked of Kounta.
        for proxy in (a, b):
            cache, record = await get(client, proxy.url + same)
            assert (cache, record) == ("HIT", old[same])
        assert served_same >= 1  # counted by the path Kounta was asked for
        assert sandbox.state.served(path=same) == served_same
        delivered = a.registry.get_sample_value(
            "kounta_proxy_webhook_deliveries_total",
            {"account": "main", "family": "products", "outcome": "applied"},
        )
        assert delivered == 1
        # The event id is remembered in Redis (hashed, with a TTL) for every replica.
        seen_keys = f"{replicas.space.prefix}:webhook:main:seen:*"
        seen = [k async for k in redis_client.scan_iter(seen_keys)]
        assert len(seen) == 1
        assert 0 < await redis_client.pttl(seen[0]) <= 86_400_000
    finally:
        await hooks.cleanup()


async def test_a_missed_change_found_by_one_replica_distrusts_the_feed_on_both(
    replicas: Replicas,
    sandbox: Sandbox,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(verifier, "TICK", 0.05)
    a, b = await two_replicas(replicas, sandbox, (0.1, 0.0), delivery_grace=0.3)
    product = sandbox.state.store["products"].ids[0]
    path = f"/v1/companies/5001/products/{product}.json"
    for proxy in (a, b):
        await get(client, proxy.url + path)
    # Changed at a till, and no webhook is registered: no delivery will come.
    sandbox.state.store.touch("products", product)
    healthy = "kounta_proxy_webhook_feed_healthy"
    deadline = time.monotonic() + 5
    while b.registry.get_sample_value(healthy, {"account": "main"}) != 0:
        assert time.monotonic() < deadline, "replica b still trusts the feed"
        await get(client, a.url + path)  # a's verifier picks a recent webhook-fresh read
        await asyncio.sleep(0.05)
    assert a.registry.get_sample_value(healthy, {"account": "main"}) == 0
    assert (
        a.registry.get_sample_value("kounta_proxy_webhook_missed_total", {"account": "main"}) == 1
    )
    # b dropped its old copy (the verifier's invalidation) and asks Kounta from now on.
    cache, record = await get(client, b.url + path)
    assert cache in ("MISS", "REVALIDATED")
    assert record["updated_at"] == sandbox.state.store["products"].records[product]["updated_at"]
