"""Pure parts of the sandbox: seeded data, store, auth, limiter, negotiation and cursors."""

from __future__ import annotations

import base64
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.sandbox import SandboxConfig
from proxy.sandbox.auth import EXPIRED, INVALID, AuthFailure, Principal, authenticate
from proxy.sandbox.data import ORDER_STATUSES, generate
from proxy.sandbox.faults import Fault, FaultSet
from proxy.sandbox.listing import decode_cursor, encode_cursor, page_count
from proxy.sandbox.negotiation import accepts_json, etag_matches
from proxy.sandbox.ratelimit import SlidingWindowLimiter
from proxy.sandbox.store import ListQuery, Store, ValidationError

SMALL = SandboxConfig(products=50, customers=40, orders=200, sites=3)


def test_same_seed_same_data_other_seed_other_data() -> None:
    assert generate(SMALL) == generate(SMALL)
    other = generate(SandboxConfig(**{**SMALL.__dict__, "seed": 7}))
    assert other["products"] != generate(SMALL)["products"]


def test_counts_ids_and_id_strs() -> None:
    data = generate(SMALL)
    assert [len(data[k]) for k in ("sites", "products", "customers", "orders")] == [3, 50, 40, 200]
    for kind, records in data.items():
        ids = [r["id"] for r in records]
        assert ids == sorted(set(ids)), kind
        assert all(r["id_str"] == str(r["id"]) for r in records)


def test_orders_are_64_bit_dated_and_valid() -> None:
    data = generate(SMALL)
    orders = data["orders"]
    site_ids = {s["id"] for s in data["sites"]}
    assert min(o["id"] for o in orders) > 2**53
    created = [datetime.fromisoformat(o["created_at"]) for o in orders]
    assert created == sorted(created)
    assert all(c.tzinfo is not None for c in created)
    assert {o["status"] for o in orders} <= set(ORDER_STATUSES)
    assert all(o["site_id"] in site_ids for o in orders)
    for o in orders:
        total = sum(ln["quantity"] * ln["unit_price"] for ln in o["lines"])
        assert o["value"] == pytest.approx(total, abs=0.01)


def test_phones_are_strings_with_leading_zero() -> None:
    customers = generate(SMALL)["customers"]
    assert all(isinstance(c["phone"], str) and c["phone"].startswith("04") for c in customers)


def test_store_views_follow_writes() -> None:
    store = Store(SMALL)
    orders = store["orders"]
    complete = ListQuery(statuses=frozenset({"complete"}))
    before = list(orders.view(complete))
    first = before[0]
    store.update("orders", first, {"status": "cancelled"})
    assert first not in orders.view(complete)
    with pytest.raises(ValidationError):
        store.update("orders", first, {"site_id": 1})
    with pytest.raises(ValidationError):
        store.create("products", {"unit_price": 1})


def test_touch_changes_bytes_and_etag() -> None:
    store = Store(SMALL)
    products = store["products"]
    pid = products.ids[0]
    body, etag = products.full(pid)
    store.touch("product", pid)
    store.touch("product", pid)  # twice in one second must still differ
    assert products.full(pid)[1] != etag
    assert products.full(pid)[0] != body


def test_authenticate() -> None:
    tokens = {"good": None, "old": 100.0, "later": 300.0}
    now = 200.0
    assert authenticate("Bearer good", tokens, SMALL, now) == Principal("bearer", "bearer:good")
    assert authenticate("bearer later", tokens, SMALL, now) == Principal("bearer", "bearer:later")
    assert authenticate("Bearer old", tokens, SMALL, now) == AuthFailure(EXPIRED)
    assert authenticate("Bearer nope", tokens, SMALL, now) == AuthFailure(INVALID)
    assert authenticate(None, tokens, SMALL, now) == AuthFailure(INVALID)
    creds = base64.b64encode(b"sandbox-client:sandbox-secret").decode()
    assert authenticate(f"Basic {creds}", tokens, SMALL, now) == Principal(
        "basic", "basic:sandbox-client"
    )
    wrong = base64.b64encode(b"sandbox-client:guess").decode()
    assert authenticate(f"Basic {wrong}", tokens, SMALL, now) == AuthFailure(INVALID)


def test_sliding_window() -> None:
    limiter = SlidingWindowLimiter()
    assert [limiter.allow("a", 2, t) for t in (0.0, 10.0, 20.0)] == [True, True, False]
    assert limiter.allow("b", 2, 20.0)  # clients are independent
    assert limiter.allow("a", 2, 60.5)  # the hit at 0 has left the window
    assert not limiter.allow("a", 2, 61.0)


@pytest.mark.parametrize(
    ("accept", "ok"),
    [
        (None, False),
        ("", False),
        ("text/html", False),
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/*;q=0.1", True),
        ("*/*;q=0", False),
        ("text/plain, */*", True),
    ],
)
def test_accepts_json(accept: str | None, ok: bool) -> None:
    assert accepts_json(accept) is ok


def test_etag_matches() -> None:
    assert etag_matches('"a"', '"a"')
    assert etag_matches('W/"a"', '"a"')
    assert etag_matches('"x", W/"a"', '"a"')
    assert etag_matches("*", '"a"')
    assert not etag_matches('"b"', '"a"')
    assert not etag_matches('"ab"', '"a"')


@given(
    st.integers(min_value=0, max_value=2**63),
    st.dictionaries(st.sampled_from(["created_gte", "created_lt", "value_gt"]), st.text()),
)
def test_cursor_round_trip(after: int, filters: dict[str, str]) -> None:
    token = encode_cursor(after, filters)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_cursor(token) == (after, filters)


@pytest.mark.parametrize("token", ["", "!!", "e30", base64.urlsafe_b64encode(b'{"a":"1","f":{}}')])
def test_bad_cursors(token: str | bytes) -> None:
    text = token.decode() if isinstance(token, bytes) else token
    with pytest.raises(ValueError, match="invalid cursor"):
        decode_cursor(text)


def test_page_count() -> None:
    assert [page_count(n, 25) for n in (0, 1, 25, 26, 60)] == [1, 1, 1, 2, 3]


def test_fault_set_consumes_counts_and_prefixes() -> None:
    faults = FaultSet()
    faults.add(Fault("latency", None, "/v1/a", seconds=0.5))
    faults.add(Fault("status", 1, "/v1/", status=500))
    faults.add(Fault("drop", 1, "/v1/"))
    first = faults.plan("/v1/a/x")
    assert first.latency == 0.5
    assert first.status is not None
    assert not first.drop
    second = faults.plan("/v1/b")
    assert second.latency == 0
    assert second.status is None
    assert second.drop
    assert [f.kind for f in faults.active()] == ["latency"]
    with pytest.raises(ValueError, match="count"):
        faults.add(Fault("drop", 0))


def test_each_sandbox_gets_its_own_copy_of_the_remembered_data() -> None:
    # A small config of its own: nothing another test generated, and quick to generate.
    config = SandboxConfig(seed=4242, products=40, customers=20, orders=60)
    first = generate(config)
    first["customers"][0]["first_name"] = "Changed"
    first["customers"].pop()
    second = generate(config)
    assert second["customers"][0]["first_name"] != "Changed"
    assert len(second["customers"]) == len(first["customers"]) + 1
    assert second == generate(config)
