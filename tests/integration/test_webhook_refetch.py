"""Refetch (webhooks.refetch, proxy.cache.webhooks.refetch): an entry a caller read is
fetched again in the background once a delivery dropped it, so the next reader gets a HIT
with the new body; never storing what a newer delivery invalidated meanwhile. Real proxy,
real disk cache, the sandbox delivering (or a counting upstream held mid-answer)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.edge.services import SERVICES
from proxy.listener import bound_port
from proxy.ops.lifecycle import start_webhooks
from proxy.settings import CacheRule, CacheSettings, Secret, SharedSettings, WebhookSettings
from tests.conftest import TOKEN, MakeProxy, Proxy, Sandbox, proxy_settings, serve_handler
from tests.integration.test_webhooks import PRODUCTS, SECRET, Upstream, hooked_settings
from tests.redis_server import TOKEN_KEY, RedisServer


async def get(url: str) -> tuple[str, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Cache"], json.loads(await r.read())


async def register(sandbox: Sandbox, listener: web.AppRunner) -> None:
    address = f"http://127.0.0.1:{bound_port(listener)}/webhooks/kounta/main"
    body = {"topic": "products/updated", "address": address,
            "headers": {"Authorization": f"Bearer {SECRET}"}}  # fmt: skip
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{sandbox.url}/v1/companies/5001/webhooks", json=body,
               headers={"Authorization": f"Bearer {TOKEN}"}) as r,
    ):  # fmt: skip
        assert r.status == 201


async def touch(sandbox: Sandbox, product: object) -> None:
    """A change at a till: the proxies never see it; Kounta (the sandbox) delivers it."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{sandbox.url}/_sandbox/touch", json={"kind": "products", "id": product}) as r,
    ):
        assert r.status == 204


async def replicas(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, url: str, prefix: str,
    refetch: bool = False,
) -> list[Proxy]:  # fmt: skip
    """Two replicas on one redis-server with the products rule (webhooks = true)."""
    rule = CacheRule("/v1/companies/*/products*", fresh_for=3600, webhooks=True)
    proxies: list[Proxy] = []
    for name in ("a", "b"):
        shared = SharedSettings(
            backend="redis", url=url, key_prefix=prefix, timeout=0.3, token_key=Secret(TOKEN_KEY)
        )
        hooks = WebhookSettings(
            enabled=True, port=0, secret=Secret(SECRET), verify_every=0, refetch=refetch
        )
        settings = proxy_settings(
            sandbox.url, tmp_path / name, cache=CacheSettings(rules=(rule,)), shared=shared,
            webhooks=hooks,
        )  # fmt: skip
        proxies.append(await make_proxy(settings, registry=CollectorRegistry()))
    return proxies


def refetched(proxy: Proxy, outcome: str) -> float:
    labels = {"account": "main", "outcome": outcome}
    return proxy.registry.get_sample_value("kounta_proxy_webhook_refetches_total", labels) or 0.0


async def until(check: object, what: str, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_change_at_a_till_is_refetched_once_and_the_next_read_is_a_hit(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path
) -> None:
    rule = CacheRule("/v1/companies/*/products*", fresh_for=3600, webhooks=True)
    hooks = WebhookSettings(
        enabled=True, port=0, secret=Secret(SECRET), verify_every=0, refetch=True,
        refetch_window=60,
    )  # fmt: skip
    settings = proxy_settings(
        sandbox.url, tmp_path, cache=CacheSettings(rules=(rule,)), webhooks=hooks
    )
    proxy = await make_proxy(settings)
    listener = await start_webhooks(proxy.app[SERVICES])
    assert listener is not None
    try:
        await register(sandbox, listener)
        read_id, unread_id = sandbox.state.store["products"].ids[:2]
        path = f"/v1/companies/5001/products/{read_id}.json"
        cache, old = await get(proxy.url + path)
        assert cache == "MISS"
        served = sandbox.state.served(path=path)
        # Changed at a till (the proxy never sees it): an unread product, then the read one.
        for product in (unread_id, read_id):
            await touch(sandbox, product)
        await until(lambda: refetched(proxy, "fetched") >= 1, "no refetch")
        cache, new = await get(proxy.url + path)
        assert cache == "HIT"
        assert new["updated_at"] != old["updated_at"]
        assert new == sandbox.state.store["products"].records[read_id]
        # The refetch was the one upstream request; the unread product was not refetched.
        assert sandbox.state.served(path=path) == served + 1
        await asyncio.sleep(0.2)
        assert refetched(proxy, "fetched") == 1
        assert sandbox.state.served(path=f"/v1/companies/5001/products/{unread_id}.json") == 0
    finally:
        await listener.cleanup()


class Held(Upstream):
    """Answers with the version at the request's arrival, but only once ``go`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.go.set()

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path.removesuffix(".json")
        self.hits[path] += 1
        body = {"path": path, "version": self.version[path]}
        await self.go.wait()
        return web.json_response(body, headers={"ETag": f'"{body["version"]}"'})


async def test_a_refetch_overtaken_by_a_newer_delivery_stores_nothing_old(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream = Held()
    runner, url = await serve_handler(upstream.handle)
    settings = hooked_settings(url, tmp_path, verify_every=0, refetch=True, refetch_window=60)
    proxy = await make_proxy(settings)
    listener = await start_webhooks(proxy.app[SERVICES])
    assert listener is not None
    hook = f"http://127.0.0.1:{bound_port(listener)}/webhooks/kounta/main"

    async def deliver() -> None:
        headers = {"Authorization": f"Bearer {SECRET}"}
        body = {"topic": "products/updated", "id": 12}
        async with aiohttp.ClientSession() as s, s.post(hook, json=body, headers=headers) as r:
            assert r.status == 200

    try:
        target = f"{proxy.url}{PRODUCTS}/12"
        assert (await get(target))[1]["version"] == 0
        upstream.version[f"{PRODUCTS}/12"] = 1
        upstream.go.clear()  # Kounta answers the refetch with version 1, slowly
        await deliver()
        await until(lambda: upstream.hits[f"{PRODUCTS}/12"] == 2, "the refetch did not start")
        upstream.version[f"{PRODUCTS}/12"] = 2  # a newer change, delivered meanwhile
        await deliver()
        upstream.go.set()
        # Version 1 is not stored (the newer delivery covered its fetch); the key is
        # refetched once more and version 2 is what the next reader gets.
        done = lambda: refetched(proxy, "fetched") + refetched(proxy, "hit")  # noqa: E731
        await until(lambda: done() >= 2, "no second refetch")
        cache, record = await get(target)
        assert (cache, record["version"]) == ("HIT", 2)
        assert refetched(proxy, "fetched") == 2
        assert upstream.hits[f"{PRODUCTS}/12"] == 3
    finally:
        await listener.cleanup()
        await runner.cleanup()


async def test_two_replicas_on_redis_refetch_with_one_upstream_request(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    """Deliveries to replica a only; both replicas' callers read the product. Both refetch
    (b hears of the change by broadcast), and the shared fetch lock makes it one request."""
    a, b = await replicas(make_proxy, sandbox, tmp_path, redis_server.url, redis_prefix, True)
    listener = await start_webhooks(a.app[SERVICES])
    assert listener is not None
    try:
        await register(sandbox, listener)
        product = sandbox.state.store["products"].ids[0]
        path = f"/v1/companies/5001/products/{product}.json"
        await asyncio.sleep(0.2)  # both replicas subscribed
        _, old = await get(a.url + path)
        await get(b.url + path)  # b's caller reads it too (from Redis, or a fetch of its own)
        served = sandbox.state.served(path=path)
        await touch(sandbox, product)
        done = lambda p: refetched(p, "fetched") + refetched(p, "hit")  # noqa: E731
        await until(lambda: done(a) >= 1 and done(b) >= 1, "both replicas refetch")
        for proxy in (a, b):
            cache, new = await get(proxy.url + path)
            assert cache == "HIT" and new["updated_at"] != old["updated_at"]
        assert sandbox.state.served(path=path) == served + 1
        assert refetched(a, "fetched") + refetched(b, "fetched") == 1
    finally:
        await listener.cleanup()


async def test_a_distrusted_feed_revalidates_through_another_replicas_redis_copy(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    """fallback_fresh_for = 0 while the feed is distrusted: a replica that finds another's
    copy in Redis asks Kounta too, rather than answering it as fresh by its fresh_for."""
    proxies = await replicas(make_proxy, sandbox, tmp_path, redis_server.url, redis_prefix)
    a, b = proxies
    for proxy in proxies:  # a missed change was seen: the fallback applies everywhere
        services = proxy.app[SERVICES]
        assert services.cache is not None
        services.cache.feeds.distrust("main", 600)
    product = sandbox.state.store["products"].ids[0]
    path = f"/v1/companies/5001/products/{product}.json"
    _, old = await get(a.url + path)  # stored in Redis by a
    await touch(sandbox, product)  # no webhook registered: no delivery
    served = sandbox.state.served(path=path)
    _, new = await get(b.url + path)
    assert new["updated_at"] != old["updated_at"]
    assert sandbox.state.served(path=path) == served + 1
