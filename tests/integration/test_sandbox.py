"""The sandbox Kounta look-alike, exercised over real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.sandbox import SANDBOX_STATE, SandboxConfig, SandboxState, create_sandbox_app

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
Client = TestClient[web.Request, web.Application]

SMALL = SandboxConfig(products=60, customers=30, orders=120, sites=2)
AUTH = {"Authorization": "Bearer sandbox-token"}
C = "/v1/companies/5001"


def basic(user: str = "sandbox-client", secret: str = "sandbox-secret") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
async def client(aiohttp_client: ClientFactory) -> Client:
    return await aiohttp_client(create_sandbox_app(SMALL))


async def make(aiohttp_client: ClientFactory, **overrides: Any) -> Client:
    fields = {**SMALL.__dict__, **overrides}
    return await aiohttp_client(create_sandbox_app(SandboxConfig(**fields)))


def state_of(client: Client) -> SandboxState:
    return client.app[SANDBOX_STATE]


async def get_json(client: Client, path: str, **headers: str) -> tuple[Any, aiohttp.ClientResponse]:
    resp = await client.get(path, headers={**AUTH, **headers})
    assert resp.status == 200, await resp.text()
    return await resp.json(), resp


async def walk(client: Client, path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Follows X-Next-Page to the end; returns all records and every X-Next-Page seen."""
    records: list[dict[str, Any]] = []
    links: list[str] = []
    while True:
        page, resp = await get_json(client, path)
        assert isinstance(page, list)
        records.extend(page)
        link = resp.headers.get("X-Next-Page")
        if link is None:
            return records, links
        links.append(link)
        url = URL(link)
        assert url.is_absolute()
        assert url.origin() == client.make_url("/").origin()
        path = url.path_qs
        assert len(links) < 100


# --- records and lists --------------------------------------------------------------------


async def test_company_me_and_by_id_are_the_same_record(client: Client) -> None:
    me, r1 = await get_json(client, "/v1/companies/me.json")
    by_id, r2 = await get_json(client, f"{C}.json")
    assert me == by_id
    assert me["id"] == 5001
    assert me["id_str"] == "5001"
    assert r1.headers["ETag"] == r2.headers["ETag"]
    assert r1.headers["Content-Type"].startswith("application/json")


async def test_me_redirect_option(aiohttp_client: ClientFactory) -> None:
    client = await make(aiohttp_client, me_redirect=True)
    resp = await client.get("/v1/companies/me.json", headers=AUTH, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == str(client.make_url(f"{C}.json"))


async def test_paging_walks_every_product_exactly_once(client: Client) -> None:
    records, links = await walk(client, f"{C}/products.json")
    ids = [r["id"] for r in records]
    store_ids = state_of(client).store["products"].ids
    assert ids == store_ids  # each exactly once, in id order
    assert len(links) == 2  # 60 records, 25 a page: 3 pages
    first, _ = await get_json(client, f"{C}/products.json")
    assert len(first) == 25
    resp = await client.get(f"{C}/products.json", headers=AUTH)
    assert resp.headers["X-Pages"] == "3"


async def test_paging_uses_configured_origin(aiohttp_client: ClientFactory) -> None:
    client = await make(aiohttp_client, origin="https://api.kounta.com")
    resp = await client.get(f"{C}/customers.json", headers=AUTH)
    assert resp.headers["X-Next-Page"].startswith(f"https://api.kounta.com{C}/customers.json?")


async def test_list_records_are_abridged_and_single_records_full(client: Client) -> None:
    page, _ = await get_json(client, f"{C}/products.json")
    assert set(page[0]) == {"id", "id_str", "name", "code", "updated_at"}
    full, _ = await get_json(client, f"{C}/products/{page[0]['id']}.json")
    assert {"unit_price", "category", "sites", "description"} <= set(full)
    assert full["id_str"] == str(full["id"])


async def test_order_ids_are_64_bit_with_string_twins(client: Client) -> None:
    page, _ = await get_json(client, f"{C}/orders.json")
    assert all(o["id"] > 2**53 and o["id_str"] == str(o["id"]) for o in page)
    one, _ = await get_json(client, f"{C}/orders/{page[3]['id_str']}.json")
    assert one["id"] == page[3]["id"]
    assert isinstance(one["lines"], list)


async def test_customer_phone_keeps_leading_zero(client: Client) -> None:
    page, _ = await get_json(client, f"{C}/customers.json")
    full, _ = await get_json(client, f"{C}/customers/{page[0]['id']}.json")
    assert isinstance(full["phone"], str)
    assert full["phone"].startswith("0")


async def test_status_and_value_filters_survive_the_cursor(client: Client) -> None:
    records, _ = await walk(client, f"{C}/orders/complete.json?value_gt=40")
    store = state_of(client).store["orders"]
    expected = [
        i
        for i in store.ids
        if store.records[i]["status"] == "complete" and store.records[i]["value"] > 40
    ]
    assert len(expected) > 25  # the walk really crossed a page boundary
    assert [r["id"] for r in records] == expected


async def test_combined_status_segments_and_accounts(client: Client) -> None:
    records, _ = await walk(client, f"{C}/orders/pending/on_hold.json")
    assert records
    assert {r["status"] for r in records} <= {"pending", "on_hold"}
    accounts, _ = await walk(client, f"{C}/orders/accounts.json")
    full = state_of(client).store["orders"].records
    assert all(full[r["id"]]["on_account"] for r in accounts)


async def test_created_filters(client: Client) -> None:
    store = state_of(client).store["orders"]
    pivot = store.records[store.ids[50]]["created_at"]
    after, _ = await walk(client, f"{C}/orders.json?created_gte={pivot.replace('+', '%2B')}")
    before, _ = await walk(client, f"{C}/orders.json?created_lt={pivot.replace('+', '%2B')}")
    assert [r["id"] for r in before] == store.ids[:50]
    assert [r["id"] for r in after] == store.ids[50:]
    resp = await client.get(f"{C}/orders.json?created_gte=yesterday", headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_request"


async def test_site_scoped_lists(client: Client) -> None:
    orders, _ = await walk(client, f"{C}/sites/102/orders.json")
    assert orders
    assert all(o["site_id"] == 102 for o in orders)
    products, _ = await walk(client, f"{C}/sites/101/products.json")
    full = state_of(client).store["products"].records
    assert products
    assert all(101 in full[p["id"]]["sites"] for p in products)
    complete, _ = await walk(client, f"{C}/sites/102/orders/complete.json")
    assert complete
    assert all(o["site_id"] == 102 and o["status"] == "complete" for o in complete)
    sites, _ = await get_json(client, f"{C}/sites.json")
    assert [s["id"] for s in sites] == [101, 102]


async def test_cursors_are_reusable_and_order_independent(client: Client) -> None:
    _, links = await walk(client, f"{C}/products.json")
    page3_first, _ = await get_json(client, URL(links[1]).path_qs)
    page2, _ = await get_json(client, URL(links[0]).path_qs)
    page3_again, _ = await get_json(client, URL(links[1]).path_qs)
    page2_again, _ = await get_json(client, URL(links[0]).path_qs)
    assert page3_first == page3_again
    assert page2 == page2_again
    assert page2[-1]["id"] < page3_first[0]["id"]
    resp = await client.get(f"{C}/products.json?cursor=not-a-cursor", headers=AUTH)
    assert resp.status == 400


async def test_x_page_header_and_start_offset(client: Client) -> None:
    _, links = await walk(client, f"{C}/products.json")
    by_cursor, _ = await get_json(client, URL(links[0]).path_qs)
    by_x_page, resp = await get_json(client, f"{C}/products.json", **{"X-Page": "1"})
    by_start, _ = await get_json(client, f"{C}/products.json?start=25")
    assert by_cursor == by_x_page == by_start
    assert resp.headers["X-Pages"] == "3"
    last, resp = await get_json(client, f"{C}/products.json", **{"X-Page": "2"})
    assert len(last) == 10
    assert "X-Next-Page" not in resp.headers
    beyond, _ = await get_json(client, f"{C}/products.json", **{"X-Page": "9"})
    assert beyond == []


async def test_unknown_things_are_json_404s(client: Client) -> None:
    for path in (
        "/v1/companies/9999/products.json",
        f"{C}/products/1.json",
        f"{C}/sites/999/orders.json",
        f"{C}/widgets.json",
        "/v1/nothing-here",
        f"{C}/orders/shipped.json",
    ):
        resp = await client.get(path, headers=AUTH)
        assert resp.status == 404, path
        body = await resp.json()
        assert body["error"] == "not_found"
        assert body["error_description"]


# --- format rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        (None, 406),
        ("text/html", 406),
        ("application/json;q=0", 406),
        ("application/json", 200),
        ("text/html, application/json;q=0.5", 200),
        ("application/*", 200),
        ("*/*", 200),
    ],
)
async def test_accept_rules_without_suffix(client: Client, accept: str | None, status: int) -> None:
    headers = dict(AUTH)
    if accept is not None:
        headers["Accept"] = accept
    resp = await client.get(f"{C}/products", headers=headers, skip_auto_headers=["Accept"])
    assert resp.status == status
    body = await resp.json()
    if status == 406:
        assert body["error"] == "not_acceptable"
    else:
        assert isinstance(body, list)


async def test_json_suffix_wins_and_other_suffixes_are_refused(client: Client) -> None:
    ok = await client.get(f"{C}/products.json", headers={**AUTH, "Accept": "text/html"})
    assert ok.status == 200
    xml = await client.get(f"{C}/products.xml", headers={**AUTH, "Accept": "*/*"})
    assert xml.status == 406


async def test_write_body_rules(client: Client) -> None:
    url = f"{C}/customers.json"
    cases: list[tuple[dict[str, str], bytes, int]] = [
        ({}, b'{"first_name":"A"}', 400),
        ({"Content-Type": "text/plain"}, b'{"first_name":"A"}', 400),
        ({"Content-Type": "application/json"}, b'{"first_name":', 400),
        ({"Content-Type": "application/json"}, b"[1,2]", 400),
        ({"Content-Type": "application/json"}, b'{"first_name": 7}', 400),
        ({"Content-Type": "application/json; charset=utf-8"}, b'{"first_name":"A"}', 201),
    ]
    for headers, body, status in cases:
        resp = await client.post(url, data=body, headers={**AUTH, **headers})
        assert resp.status == status, (headers, body)
        if status == 400:
            assert (await resp.json())["error"] == "invalid_request"


# --- writes -------------------------------------------------------------------------------


async def test_post_put_patch_delete_cycle(client: Client) -> None:
    resp = await client.post(
        f"{C}/products.json",
        json={"name": "Magic Muffin", "unit_price": 4.5, "id": 1},
        headers=AUTH,
    )
    assert resp.status == 201
    created = await resp.json()
    assert created["name"] == "Magic Muffin"
    assert created["id"] != 1
    location = URL(resp.headers["Location"])
    assert location.is_absolute()
    assert location.path == f"{C}/products/{created['id']}.json"
    fetched, _ = await get_json(client, location.path)
    assert fetched == created
    everything, _ = await walk(client, f"{C}/products.json")
    assert everything[-1]["id"] == created["id"]

    resp = await client.put(location.path, json={"unit_price": 5.0}, headers=AUTH)
    assert resp.status == 200
    updated = await resp.json()
    assert updated["unit_price"] == 5.0
    assert updated["name"] == "Magic Muffin"
    resp = await client.patch(location.path, json={"name": "Tragic Muffin"}, headers=AUTH)
    assert (await resp.json())["unit_price"] == 5.0

    resp = await client.delete(location.path, headers=AUTH)
    assert resp.status == 204
    assert await resp.read() == b""
    assert (await client.get(location.path, headers=AUTH)).status == 404


async def test_order_post_validates_and_computes_value(client: Client) -> None:
    lines = [{"product_id": 1, "quantity": 2, "unit_price": 3.25}]
    resp = await client.post(
        f"{C}/orders.json", json={"lines": lines, "site_id": 102}, headers=AUTH
    )
    assert resp.status == 201
    order = await resp.json()
    assert order["value"] == 6.5
    assert order["status"] == "pending"
    assert order["id"] > 2**53
    pending, _ = await walk(client, f"{C}/orders/pending.json")
    assert pending[-1]["id"] == order["id"]
    bad = await client.put(
        f"{C}/orders/{order['id']}.json", json={"status": "teleported"}, headers=AUTH
    )
    assert bad.status == 400


async def test_head_options_and_method_not_allowed(client: Client) -> None:
    get = await client.get(f"{C}/products.json", headers=AUTH)
    head = await client.head(f"{C}/products.json", headers=AUTH)
    assert head.status == 200
    assert await head.read() == b""
    assert head.headers["ETag"] == get.headers["ETag"]
    options = await client.options(f"{C}/products/100001.json")
    assert options.status == 204
    assert "DELETE" in options.headers["Allow"]
    assert "POST" not in options.headers["Allow"]
    resp = await client.post(f"{C}/orders/complete.json", json={}, headers=AUTH)
    assert resp.status == 405
    assert "POST" not in resp.headers["Allow"]
    resp = await client.delete(f"{C}/sites/101.json", headers=AUTH)
    assert resp.status == 405


# --- ETags --------------------------------------------------------------------------------


async def test_etag_304_strong_weak_list_and_star(client: Client) -> None:
    record = f"{C}/products/100001.json"
    resp = await client.get(record, headers=AUTH)
    etag = resp.headers["ETag"]
    assert etag.startswith('"')
    assert not etag.startswith("W/")
    for inm in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        resp = await client.get(record, headers={**AUTH, "If-None-Match": inm})
        assert resp.status == 304, inm
        assert await resp.read() == b""
        assert resp.headers["ETag"] == etag
    resp = await client.get(record, headers={**AUTH, "If-None-Match": '"other"'})
    assert resp.status == 200
    assert state_of(client).not_modified() == 4

    resp = await client.get(f"{C}/products.json", headers=AUTH)
    list_etag = resp.headers["ETag"]
    resp = await client.get(f"{C}/products.json", headers={**AUTH, "If-None-Match": list_etag})
    assert resp.status == 304
    assert "X-Next-Page" in resp.headers
    resp = await client.get(f"{C}/customers.json", headers={**AUTH, "If-None-Match": list_etag})
    assert resp.status == 200


async def test_etags_change_when_data_changes(client: Client) -> None:
    record = f"{C}/products/100001.json"
    before = (await client.get(record, headers=AUTH)).headers["ETag"]
    list_before = (await client.get(f"{C}/products.json", headers=AUTH)).headers["ETag"]
    # unit_price is not in the abridged list record, yet the list's ETag must still change.
    resp = await client.put(record, json={"unit_price": 99.0}, headers=AUTH)
    assert resp.status == 200
    after = (await client.get(record, headers=AUTH)).headers["ETag"]
    list_after = (await client.get(f"{C}/products.json", headers=AUTH)).headers["ETag"]
    assert before != after
    assert list_before != list_after
    resp = await client.get(record, headers={**AUTH, "If-None-Match": before})
    assert resp.status == 200

    state_of(client).touch("products", 100001)
    touched = (await client.get(record, headers=AUTH)).headers["ETag"]
    assert touched != after
    with pytest.raises(KeyError):
        state_of(client).touch("products", 1)


async def test_pretty_print(client: Client) -> None:
    compact = await client.get(f"{C}/products/100001.json", headers=AUTH)
    pretty = await client.get(f"{C}/products/100001.json", headers={**AUTH, "X-Pretty-Print": "1"})
    compact_body, pretty_body = await compact.read(), await pretty.read()
    assert b"\n  " in pretty_body
    assert b"\n" not in compact_body
    assert json.loads(compact_body) == json.loads(pretty_body)
    assert compact.headers["ETag"] != pretty.headers["ETag"]
    pretty_list = await client.get(f"{C}/sites.json", headers={**AUTH, "X-Pretty-Print": "1"})
    assert b"\n  " in await pretty_list.read()


# --- auth and rate limit ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "description"),
    [
        ({}, "The access token provided is invalid"),
        ({"Authorization": "Bearer wrong"}, "The access token provided is invalid"),
        ({"Authorization": "Token sandbox-token"}, "The access token provided is invalid"),
        (basic(secret="wrong"), "The access token provided is invalid"),
        ({"Authorization": "Basic !!!"}, "The access token provided is invalid"),
        ({"Authorization": "Bearer old"}, "The access token provided has expired"),
    ],
)
async def test_401_bodies(client: Client, headers: dict[str, str], description: str) -> None:
    state_of(client).add_bearer_token("old", expires_at=time.time() - 1)
    resp = await client.get(f"{C}/products.json", headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert await resp.json() == {"error": "invalid_token", "error_description": description}


async def test_token_hooks_and_basic(client: Client) -> None:
    state = state_of(client)
    state.add_bearer_token("fresh", expires_at=time.time() + 3600)
    fresh = {"Authorization": "Bearer fresh"}
    assert (await client.get(f"{C}.json", headers=fresh)).status == 200
    state.revoke_bearer_token("fresh")
    assert (await client.get(f"{C}.json", headers=fresh)).status == 401
    assert (await client.get(f"{C}.json", headers=basic())).status == 200


async def test_rate_limit_429_is_plain_text_without_retry_after(
    aiohttp_client: ClientFactory,
) -> None:
    client = await make(aiohttp_client, rate_per_minute_bearer=3, rate_per_minute_basic=2)
    state = state_of(client)
    now = [1000.0]
    state.clock = lambda: now[0]
    statuses = [(await client.get(f"{C}.json", headers=AUTH)).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    resp = await client.get(f"{C}.json", headers=AUTH)
    assert resp.status == 429
    assert await resp.read() == b"Limit exceeded"
    assert resp.headers["Content-Type"] == "text/plain"
    assert "Retry-After" not in resp.headers
    assert state.served() == 4
    assert state.statuses()[429] == 1

    # Basic has its own (smaller) budget, independent of the bearer token's.
    assert [(await client.get(f"{C}.json", headers=basic())).status for _ in range(3)] == [
        200,
        200,
        429,
    ]
    now[0] += 61
    assert (await client.get(f"{C}.json", headers=AUTH)).status == 200


# --- faults -------------------------------------------------------------------------------


async def test_latency_fault(client: Client) -> None:
    state = state_of(client)
    state.inject_latency(0.3, count=1, path_prefix=f"{C}/products")
    start = time.perf_counter()
    assert (await client.get(f"{C}/customers.json", headers=AUTH)).status == 200
    assert time.perf_counter() - start < 0.25  # other prefixes are untouched
    start = time.perf_counter()
    assert (await client.get(f"{C}/products.json", headers=AUTH)).status == 200
    assert time.perf_counter() - start >= 0.3
    start = time.perf_counter()
    await client.get(f"{C}/products.json", headers=AUTH)
    assert time.perf_counter() - start < 0.25  # count=1 is used up


async def test_status_fault_with_count_and_headers(client: Client) -> None:
    state = state_of(client)
    page = b"<html><body>Bad gateway</body></html>"
    state.inject_status(502, page, "text/html", count=2, headers={"X-Upstream": "down"})
    for _ in range(2):
        resp = await client.get(f"{C}.json", headers=AUTH)
        assert resp.status == 502
        assert await resp.read() == page
        assert resp.headers["Content-Type"].startswith("text/html")
        assert resp.headers["X-Upstream"] == "down"
    assert (await client.get(f"{C}.json", headers=AUTH)).status == 200
    state.inject_status(503, count=None)
    assert [(await client.get(f"{C}.json", headers=AUTH)).status for _ in range(3)] == [503] * 3
    state.clear_faults()
    assert (await client.get(f"{C}.json", headers=AUTH)).status == 200
    with pytest.raises(ValueError):
        state.inject_status(99)


async def test_drop_fault_truncates_the_body(client: Client) -> None:
    state_of(client).inject_drop()
    resp = await client.get(f"{C}/products.json", headers=AUTH)
    assert resp.status == 200
    declared = int(resp.headers["Content-Length"])
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert declared > 0
    # The next request is served normally on a new connection.
    body = await (await client.get(f"{C}/products.json", headers=AUTH)).read()
    assert len(body) == declared


async def test_fault_applies_before_auth_and_is_counted(client: Client) -> None:
    state = state_of(client)
    state.inject_status(429, b"Limit exceeded", count=1)
    resp = await client.get(f"{C}.json")
    assert resp.status == 429
    assert await resp.text() == "Limit exceeded"
    assert state.served("GET", f"{C}.json") == 1


# --- counters and HTTP controls -----------------------------------------------------------


async def test_served_counters(client: Client) -> None:
    state = state_of(client)
    await client.get(f"{C}/products.json", headers=AUTH)
    await client.get(f"{C}/products.json", headers=AUTH)
    await client.get(f"{C}/products.json")  # 401 still counts
    await client.head(f"{C}/products.json", headers=AUTH)
    await client.post(f"{C}/customers.json", json={"email": "x@example.com"}, headers=AUTH)
    assert state.served() == 5
    assert state.served("GET") == 3
    assert state.served("get", f"{C}/products.json") == 3
    assert state.served(path=f"{C}/products.json") == 4
    assert state.served("POST", f"{C}/customers.json") == 1
    state.reset_counters()
    assert state.served() == 0
    assert state.not_modified() == 0


async def test_http_controls(aiohttp_client: ClientFactory) -> None:
    client = await make(aiohttp_client, rate_per_minute_bearer=1)
    await client.get(f"{C}.json", headers=AUTH)
    stats = await (await client.get("/_sandbox/stats")).json()
    assert stats["served"] == 1
    assert stats["by_path"] == {f"GET {C}.json": 1}
    assert stats["not_modified"] == 0

    resp = await client.post("/_sandbox/faults", json={"status": 503, "body": "down", "count": 2})
    assert resp.status == 201
    resp = await client.post("/_sandbox/faults", json={"drop": True, "path_prefix": "/nowhere"})
    assert len(await resp.json()) == 2
    for _ in range(2):
        resp = await client.get(f"{C}.json", headers=AUTH)
        assert resp.status == 503
        assert await resp.text() == "down"
    assert (await client.delete("/_sandbox/faults")).status == 204
    assert await (await client.get("/_sandbox/faults")).json() == []
    assert (await client.post("/_sandbox/faults", json={"count": 1})).status == 400

    resp = await client.post("/_sandbox/tokens", json={"token": "t2", "expires_in": 60})
    assert resp.status == 201
    assert (await client.get(f"{C}.json", headers={"Authorization": "Bearer t2"})).status == 200
    assert (await client.delete("/_sandbox/tokens/t2")).status == 204
    assert (await client.get(f"{C}.json", headers={"Authorization": "Bearer t2"})).status == 401

    before = (await client.get(f"{C}/products/100001.json", headers=basic())).headers["ETag"]
    resp = await client.post("/_sandbox/touch", json={"kind": "product", "id": 100001})
    assert resp.status == 204
    after = (await client.get(f"{C}/products/100001.json", headers=basic())).headers["ETag"]
    assert before != after
    assert (await client.post("/_sandbox/touch", json={"kind": "order", "id": 5})).status == 404

    stats = await (await client.post("/_sandbox/reset")).json()
    assert stats["served"] == 0
    assert stats["faults"] == []
    # The bearer's budget of one was spent before the reset and is restored by it; the many
    # control requests above were neither counted nor limited.
    assert (await client.get(f"{C}.json", headers=AUTH)).status == 200
    assert (await client.get(f"{C}.json", headers=AUTH)).status == 429


async def test_reset_with_data_reseeds(client: Client) -> None:
    await client.delete(f"{C}/products/100001.json", headers=AUTH)
    assert (await client.get(f"{C}/products/100001.json", headers=AUTH)).status == 404
    assert (await client.post("/_sandbox/reset?data=1")).status == 200
    assert (await client.get(f"{C}/products/100001.json", headers=AUTH)).status == 200


async def test_concurrent_requests_are_all_counted(client: Client) -> None:
    results = await asyncio.gather(
        *(client.get(f"{C}/orders.json?start={n}", headers=AUTH) for n in range(20))
    )
    assert all(r.status == 200 for r in results)
    assert state_of(client).served("GET") == 20
