"""The sandbox's webhooks resource and its deliveries (proxy.sandbox.webhooks), on real
sockets: a receiver of our own records what arrives."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.sandbox.webhooks import SANDBOX_HOOKS
from tests.conftest import TOKEN, Sandbox, serve

AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOOKS = "/v1/companies/5001/webhooks"


class Receiver:
    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        return web.json_response({})


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    runner, port = await serve(app)
    yield r, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


async def call(sandbox: Sandbox, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, sandbox.url + path, json=body, headers=AUTH) as r,
    ):
        text = await r.read()
        return r.status, json.loads(text) if text else None


async def wait_for(receiver: Receiver, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + 3.0
    while len(receiver.got) < count:
        assert asyncio.get_running_loop().time() < deadline, receiver.got
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "body",
    [
        {"topic": "nope/updated", "address": "https://x.example/h"},
        {"topic": "products/updated", "address": "http://x.example/h"},
        {"topic": "products/updated", "address": "not a url"},
        {"topic": "products/updated", "address": "https://x.example/h", "format": "csv"},
        {"topic": "products/updated", "address": "https://x.example/h",
         "headers": {"Cookie": "a"}},
        {"topic": "products/updated", "address": "https://x.example/h",
         "headers": {"X-Kounta-Secret": "a"}},
        {"topic": "products/updated", "address": "https://x.example/h", "filter": {"site": 1}},
    ],
)  # fmt: skip
async def test_invalid_webhooks_are_refused(sandbox: Sandbox, body: dict[str, Any]) -> None:
    status, answer = await call(sandbox, "POST", HOOKS, body)
    assert status == 400
    assert answer["error"] == "invalid_request"
    assert (await call(sandbox, "GET", HOOKS))[1] == []


async def test_the_resource_and_a_delivery_on_every_kind_of_change(
    sandbox: Sandbox, receiver: tuple[Receiver, str]
) -> None:
    r, address = receiver
    hook = {"topic": "products/updated", "address": address,
            "headers": {"Authorization": "Bearer s", "X-Extra": "1"}}  # fmt: skip
    status, created = await call(sandbox, "POST", HOOKS, hook)
    assert status == 201 and created["format"] == "json"
    assert (await call(sandbox, "GET", f"{HOOKS}/{created['id']}.json"))[1] == created
    other = {"topic": "customers/deleted", "address": "https://hooks.example/h"}
    assert (await call(sandbox, "POST", HOOKS, other))[0] == 201
    assert len((await call(sandbox, "GET", HOOKS))[1]) == 2
    # API write: one delivery with the webhook's headers.
    product = sandbox.state.store["products"].ids[0]
    assert (await call(sandbox, "PUT", f"/v1/companies/5001/products/{product}", {"name": "x"}))[
        0
    ] == 200
    await wait_for(r, 1)
    headers, body = r.got[0]
    data = json.loads(body)
    assert (data["topic"], data["data"]["id"], data["company_id"]) == (
        "products/updated",
        product,
        5001,
    )
    assert headers["Authorization"] == "Bearer s" and headers["X-Extra"] == "1"
    # A change at a till (the proxy never sees it): delivered too.
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{sandbox.url}/_sandbox/touch", json={"kind": "products", "id": product}) as resp,
    ):
        assert resp.status == 204
    await wait_for(r, 2)
    assert json.loads(r.got[1][1])["event_id"] != data["event_id"]
    # PUT changes it, DELETE removes it: no more deliveries.
    assert (await call(sandbox, "PUT", f"{HOOKS}/{created['id']}", {"format": "xml"}))[1][
        "format"
    ] == "xml"
    assert (
        await call(sandbox, "PUT", f"{HOOKS}/{created['id']}", {"address": "http://x.example"})
    )[0] == 400
    assert (await call(sandbox, "DELETE", f"{HOOKS}/{created['id']}"))[0] == 204
    assert (await call(sandbox, "GET", f"{HOOKS}/{created['id']}"))[0] == 404
    assert (await call(sandbox, "GET", "/v1/companies/77/webhooks"))[0] == 404


async def test_drop_duplicate_and_signing(sandbox: Sandbox, receiver: tuple[Receiver, str]) -> None:
    r, address = receiver
    await call(sandbox, "POST", HOOKS, {"topic": "products/updated", "address": address})
    hooks = sandbox.app[SANDBOX_HOOKS]
    product = sandbox.state.store["products"].ids[0]
    hooks.behaviour.drop_rate = 1.0
    sandbox.state.store.touch("products", product)
    hooks.emit("products", "updated", sandbox.state.store["products"].records[product])
    await asyncio.sleep(0.2)
    assert r.got == [] and hooks.log[-1]["outcome"] == "dropped"
    hooks.behaviour.drop_rate, hooks.behaviour.duplicate_rate = 0.0, 1.0
    hooks.behaviour.sign_key = "k"
    hooks.emit("products", "updated", sandbox.state.store["products"].records[product])
    await wait_for(r, 2)
    (h1, b1), (_, b2) = r.got
    assert b1 == b2 and json.loads(b1)["event_id"] == json.loads(b2)["event_id"]
    assert h1["X-Kounta-Signature"] == hmac.new(b"k", b1, hashlib.sha256).hexdigest()
