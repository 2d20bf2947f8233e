"""Reading deliveries tolerantly (proxy.cache.webhooks.payload): every plausible shape, and
never an exception but Unreadable whatever the bytes."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache.webhooks.payload import Changed, Unreadable, normal_topic, parse

P12 = (Changed("12"),)


@pytest.mark.parametrize(
    ("body", "headers", "topic", "objects", "company", "event_id"),
    [
        ({"topic": "products/updated", "id": 12}, {}, "products/updated", P12, None, None),
        ({"event": "product.updated", "data": {"id": 12}}, {}, "products/updated", P12, None, None),
        ({"type": "Products.Created", "object": {"id_str": "12"}}, {}, "products/created", P12,
         None, None),
        ({"topic": "orders/completed", "objects": [{"id": 1}, {"id": 2}, {"id": 1}]}, {},
         "orders/completed", (Changed("1"), Changed("2")), None, None),
        ({"payload": {"data": {"id": 12, "company": {"id": 5001}}}}, {"X-Kounta-Topic":
         "category/deleted"}, "categories/deleted", P12, "5001", None),
        ([{"id": 12, "site_id": 7}], {"X-Webhook-Topic": "inventory.updated"},
         "inventory/updated", (Changed("12", "7"),), None, None),
        ({"topic": "products/updated", "company_id": 5001, "data": {"id": 12}, "id": "hook-9",
          "event_id": "e1"}, {}, "products/updated", P12, "5001", "e1"),
        # A top-level id beside an envelope is not an event id (it may be the webhook's own).
        ({"topic": "orders/completed", "id": 77, "data": {"id": 12}}, {}, "orders/completed",
         P12, None, None),
        ({"topic": "customers/updated", "id": 5}, {"X-Kounta-Delivery": "d-1"},
         "customers/updated", (Changed("5"),), None, "d-1"),
        # Ids that are not plain tokens are ignored, never turned into patterns.
        ({"topic": "products/updated", "data": [{"id": "*"}, {"id": "1/2"}, {"id": True},
          {"id": 1.5}, {"id": 3.0}]}, {}, "products/updated", (Changed("3"),), None, None),
        ({"topic": "products updated!"}, {}, "", (), None, None),
        ({}, {}, "", (), None, None),
        ({"topic": 5, "data": "x"}, {}, "", (), None, None),
    ],
)  # fmt: skip
def test_shapes(
    body: object,
    headers: dict[str, str],
    topic: str,
    objects: tuple[Changed, ...],
    company: str | None,
    event_id: str | None,
) -> None:
    found = parse(json.dumps(body).encode(), headers)
    assert (found.topic, found.objects, found.company, found.event_id) == (
        topic,
        objects,
        company,
        event_id,
    )
    assert found.family == topic.split("/")[0]


@pytest.mark.parametrize("body", [b"", b"{", b"null", b"12", b'"x"', b"\xff", b"[" * 5000])
def test_not_a_delivery_is_unreadable(body: bytes) -> None:
    with pytest.raises(Unreadable):
        parse(body, {})


@pytest.mark.parametrize(
    ("text", "topic"),
    [
        ("orders/completed", "orders/completed"),
        ("Order.Completed", "orders/completed"),
        ("price_list.updated", "price_lists/updated"),
        ("staff/updated", "staff/updated"),
        ("inventory.updated", "inventory/updated"),
        ("/products//updated/", "products/updated"),
        ("x" * 65, ""),
        ("a b", ""),
    ],
)
def test_topics(text: str, topic: str) -> None:
    assert normal_topic(text) == topic


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "id_str",
                    "topic",
                    "event",
                    "type",
                    "data",
                    "object",
                    "objects",
                    "payload",
                    "company",
                    "company_id",
                    "site_id",
                    "event_id",
                    "x",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@pytest.mark.no_cover  # generated payloads: coverage's tracing would double the time
@settings(max_examples=300, deadline=None)
@given(JSON, st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=3))
def test_any_json_is_read_without_an_exception(data: object, headers: dict[str, str]) -> None:
    try:
        body = json.dumps(data).encode()
    except ValueError:
        return
    if not isinstance(data, dict | list):
        with pytest.raises(Unreadable):
            parse(body, headers)
        return
    found = parse(body, headers)
    for changed in found.objects:
        assert changed.id and "*" not in changed.id and "/" not in changed.id


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_delivery_or_unreadable(body: bytes) -> None:
    with contextlib.suppress(Unreadable):
        parse(body, {})
