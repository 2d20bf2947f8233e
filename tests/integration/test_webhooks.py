"""Webhook deliveries on their own listener (proxy.cache.webhooks.receiver): real sockets,
a real proxy with its disk cache, a counting upstream; each delivery checked, applied
through the cache's invalidator, and answered only once applied."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import io
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.edge.services import SERVICES
from proxy.listener import bound_port
from proxy.ops.lifecycle import start_webhooks
from proxy.settings import CacheRule, CacheSettings, Secret, Settings, WebhookSettings
from tests.conftest import MakeProxy, Proxy, proxy_settings, serve_handler

SECRET = "hook-secret-1"
PRODUCTS = "/v1/companies/5001/products"


class Upstream:
    """Kounta-like: every GET answers JSON with an ETag; counts what reached it."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.version: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path.removesuffix(".json")
        self.hits[path] += 1
        etag = f'"{self.version[path]}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        body = {"path": path, "version": self.version[path]}
        return web.json_response(body, headers={"ETag": etag})


@dataclasses.dataclass
class Hooked:
    proxy: Proxy
    hook_url: str
    upstream: Upstream

    async def get(self, path: str) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.proxy.url + path) as r:
            assert r.status == 200, await r.text()
            return r.headers["X-Cache"]

    async def deliver(
        self, body: object, *, account: str = "main", secret: str | None = SECRET, **headers: str
    ) -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        data = io.BytesIO(raw) if len(raw) > 512 * 1024 else raw
        sent = {"Content-Type": "application/json", **headers}
        if secret is not None:
            sent["Authorization"] = f"Bearer {secret}"
        url = f"{self.hook_url}/webhooks/kounta/{account}"
        async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=sent) as r:
            return r.status, json.loads(await r.read())

    def count(self, outcome: str, family: str | None = None) -> float:
        total = 0.0
        for metric in self.proxy.registry.collect():
            for sample in metric.samples:
                if sample.name != "kounta_proxy_webhook_deliveries_total":
                    continue
                labels = sample.labels
                if labels["outcome"] == outcome and family in (None, labels["family"]):
                    total += sample.value
        return total


def hooked_settings(url: str, tmp_path: Path, **hooks: Any) -> Settings:
    base = proxy_settings(url, tmp_path)
    rule = CacheRule(path="/v1/companies/*", fresh_for=3600, webhooks=True)
    return dataclasses.replace(
        base,
        cache=CacheSettings(rules=(rule,)),
        webhooks=WebhookSettings(enabled=True, port=0, secret=Secret(SECRET), **hooks),
    )


async def start_hooked(
    make_proxy: MakeProxy, tmp_path: Path, **hooks: Any
) -> AsyncIterator[Hooked]:
    upstream = Upstream()
    runner, url = await serve_handler(upstream.handle)
    proxy = await make_proxy(hooked_settings(url, tmp_path, **hooks))
    hooks_runner = await start_webhooks(proxy.app[SERVICES])
    assert hooks_runner is not None
    try:
        yield Hooked(proxy, f"http://127.0.0.1:{bound_port(hooks_runner)}", upstream)
    finally:
        await hooks_runner.cleanup()
        await runner.cleanup()


@pytest.fixture
async def hooked(make_proxy: MakeProxy, tmp_path: Path) -> AsyncIterator[Hooked]:
    async for h in start_hooked(make_proxy, tmp_path):
        yield h


async def warm(h: Hooked, *paths: str) -> None:
    for path in paths:
        assert await h.get(path) in ("MISS", "HIT")
        assert await h.get(path) == "HIT"


async def test_a_delivery_purges_its_object_and_lists_but_not_a_longer_id(hooked: Hooked) -> None:
    h = hooked
    paths = (
        f"{PRODUCTS}/12.json", f"{PRODUCTS}/123.json", f"{PRODUCTS}.json",
        "/v1/companies/me/products/12", "/v1/companies/5001/sites/3/products",
        "/v1/companies/5001/categories/4/products", "/v1/companies/5001/customers/12",
    )  # fmt: skip
    await warm(h, *paths)
    body = {"topic": "products/updated", "data": {"id": 12, "company_id": 5001}}
    assert await h.deliver(body) == (200, {"applied": True, "family": "products"})
    assert await h.get(f"{PRODUCTS}/12.json") == "MISS"
    assert await h.get("/v1/companies/me/products/12") == "MISS"  # the `me` form too
    assert await h.get(f"{PRODUCTS}.json") == "MISS"
    assert await h.get("/v1/companies/5001/sites/3/products") == "MISS"
    assert await h.get("/v1/companies/5001/categories/4/products") == "MISS"
    # Untouched: another product whose id starts with 12, another family's 12.
    before = h.upstream.hits[f"{PRODUCTS}/123"]
    assert await h.get(f"{PRODUCTS}/123.json") == "HIT"
    assert await h.get("/v1/companies/5001/customers/12") == "HIT"
    assert h.upstream.hits[f"{PRODUCTS}/123"] == before
    assert h.count("applied", "products") == 1


async def test_no_or_a_wrong_secret_is_401_and_purges_nothing(hooked: Hooked) -> None:
    h = hooked
    await warm(h, f"{PRODUCTS}/12")
    body = {"topic": "products/updated", "id": 12}
    for secret in (None, "wrong", SECRET + "x", ""):
        status, answer = await h.deliver(body, secret=secret)
        assert status == 401, secret
        assert answer["error"] == "invalid_token"
        assert SECRET not in json.dumps(answer)
    assert await h.get(f"{PRODUCTS}/12") == "HIT"
    assert h.count("unauthorized") == 4
    assert (await h.deliver(body))[0] == 200  # the listener keeps answering
    assert await h.get(f"{PRODUCTS}/12") == "MISS"


async def test_bad_input_gets_a_clear_status_and_the_listener_keeps_answering(
    hooked: Hooked,
) -> None:
    h = hooked
    await warm(h, f"{PRODUCTS}/12")
    cases: list[tuple[object, dict[str, str], str, int]] = [
        (b"{not json", {}, "main", 400),
        (b'"a string"', {}, "main", 400),
        (b"\xff\xfe", {}, "main", 400),
        (b"<xml/>", {"Content-Type": "application/xml"}, "main", 415),
        (b"<webhook><id>12</id></webhook>", {}, "main", 415),
        (b"[" * 100_000 + b"]" * 100_000, {}, "main", 400),
        (b"x" * (1024**2 + 1), {}, "main", 413),
        ({"topic": "products/updated", "id": 12}, {}, "nobody", 404),
        ({"topic": "products/updated", "id": 12}, {}, "..%2Fmain", 404),
    ]
    for body, headers, account, status in cases:
        got, answer = await h.deliver(body, account=account, **headers)
        assert got == status, (body[:20] if isinstance(body, bytes) else body, answer)
        assert set(answer) == {"error", "error_description"}
        assert await h.get(f"{PRODUCTS}/12") == "HIT"  # nothing applied
    assert (await h.deliver({"topic": "products/updated", "id": 12}))[0] == 200
    assert await h.get(f"{PRODUCTS}/12") == "MISS"


async def test_a_repeated_event_is_applied_once(hooked: Hooked) -> None:
    h = hooked
    body = {"topic": "products/updated", "event_id": "ev-1", "data": [{"id": 12}]}
    await warm(h, f"{PRODUCTS}/12")
    assert (await h.deliver(body))[0] == 200
    await warm(h, f"{PRODUCTS}/12")
    assert await h.deliver(body) == (200, {"applied": False, "duplicate": True})
    assert await h.get(f"{PRODUCTS}/12") == "HIT"
    assert (h.count("applied"), h.count("duplicate")) == (1, 1)
    # The same id with another body (another change) is applied.
    other = {**body, "data": [{"id": 12, "name": "new"}]}
    assert (await h.deliver(other))[1]["applied"] is True
    assert await h.get(f"{PRODUCTS}/12") == "MISS"


async def test_an_unknown_family_purges_the_whole_account(hooked: Hooked) -> None:
    h = hooked
    await warm(h, f"{PRODUCTS}/12", "/v1/companies/5001/customers/3")
    assert (await h.deliver({"event": "loyalty.points_changed", "id": 3}))[0] == 200
    assert await h.get(f"{PRODUCTS}/12") == "MISS"
    assert await h.get("/v1/companies/5001/customers/3") == "MISS"
    assert h.count("applied", "other") == 1


async def test_a_delivery_to_the_api_port_is_not_a_webhook(hooked: Hooked) -> None:
    h = hooked
    await warm(h, f"{PRODUCTS}/12")
    headers = {"Authorization": f"Bearer {SECRET}"}
    body = {"topic": "products/updated", "id": 12}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{h.proxy.url}/webhooks/kounta/main", json=body, headers=headers) as r,
    ):
        assert r.status != 200 or r.headers.get("X-Cache") == "BYPASS"
    assert await h.get(f"{PRODUCTS}/12") == "HIT"
    assert h.count("applied") == 0


def sign(body: bytes, key: str) -> bytes:
    return hmac.new(key.encode(), body, hashlib.sha256).digest()


async def test_signed_deliveries_are_checked_when_signatures_are_on(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    key = "signing-key"
    async for h in start_hooked(
        make_proxy, tmp_path, signature="hmac-sha256", signature_key=Secret(key)
    ):
        await warm(h, f"{PRODUCTS}/12")
        body = json.dumps({"topic": "products/updated", "id": 12}).encode()
        mac = sign(body, key)
        for bad in ("", "00" * 32, sign(body, "other").hex(), mac.hex()[:-2]):
            status, _ = await h.deliver(body, **{"X-Kounta-Signature": bad})
            assert status == 401, bad
            assert await h.get(f"{PRODUCTS}/12") == "HIT"
        assert h.count("bad_signature") == 4
        for good in (mac.hex(), mac.hex().upper(), "sha256=" + mac.hex(),
                     base64.b64encode(mac).decode()):  # fmt: skip
            assert (await h.deliver(body, **{"X-Kounta-Signature": good}))[0] == 200, good
            assert await h.get(f"{PRODUCTS}/12") == "MISS"
