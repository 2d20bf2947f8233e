"""What a delivery invalidates (proxy.cache.webhooks.purges), checked against paths."""

from __future__ import annotations

import pytest

from proxy.cache.invalidation import Purge
from proxy.cache.webhooks.payload import Changed, Delivery
from proxy.cache.webhooks.purges import plan
from proxy.settings import WebhookTopic

C = "/v1/companies"


def delivery(
    topic: str, *ids: str, company: str | None = "5001", site: str | None = None
) -> Delivery:
    return Delivery(topic, topic.split("/")[0], tuple(Changed(i, site) for i in ids), company, None)


@pytest.mark.parametrize(
    ("path", "purged"),
    [
        (f"{C}/5001/products/12", True),
        (f"{C}/5001/products/12.json", True),
        (f"{C}/me/products/12", True),
        (f"{C}/me/products/12/variants", True),
        (f"{C}/5001/products/123", False),
        (f"{C}/5001/products/1", False),
        (f"{C}/5001/products", True),
        (f"{C}/me/products.json", True),
        (f"{C}/5001/sites/3/products", True),
        (f"{C}/5001/categories/4/products", True),
        (f"{C}/5001/categories/4", False),
        (f"{C}/5001/customers/12", False),
        (f"{C}/5001/customers", False),
    ],
)
def test_the_builtin_map(path: str, purged: bool) -> None:
    change = plan("main", delivery("products/updated", "12"), ()).change
    assert change.covers("main", path) is purged
    assert not change.covers("other", path)


def test_without_a_company_every_company_form_is_covered() -> None:
    change = plan("main", delivery("products/updated", "12", company=None), ()).change
    for path in (f"{C}/5001/products/12", f"{C}/me/products/12.json", f"{C}/me/products/12/x"):
        assert change.covers("main", path)
    assert not change.covers("main", f"{C}/me/products/123")


def test_without_objects_the_whole_family_goes() -> None:
    change = plan("main", delivery("orders/completed"), ()).change
    assert change.covers("main", f"{C}/5001/orders/77")
    assert change.covers("main", f"{C}/5001/orders/complete")
    assert not change.covers("main", f"{C}/5001/products/77")


def test_unknown_families_purge_the_account() -> None:
    for topic in ("loyalty/changed", ""):
        found = plan("main", delivery(topic, "1"), ())
        assert found.change == Purge(account="main")
        assert (found.family, found.whole_account) == ("other", True)


def test_topic_entries_add_or_replace() -> None:
    extra = WebhookTopic(topic="orders/*", purge=("/v1/companies/{company}/sites/{site}/orders*",))
    found = plan("main", delivery("orders/completed", "9", site="4"), (extra,))
    assert found.change.covers("main", f"{C}/5001/sites/4/orders/pending/x")
    assert found.change.covers("main", f"{C}/me/orders/9")  # the built-in map as well
    only = WebhookTopic(
        topic="orders/*", purge=("/v1/companies/{company}/registers",), replace=True
    )
    found = plan("main", delivery("orders/completed", "9"), (only,))
    assert found.change.covers("main", f"{C}/me/registers")
    assert not found.change.covers("main", f"{C}/me/orders/9")
    # An entry makes an unknown family precise instead of a whole-account purge.
    loyalty = WebhookTopic(topic="loyalty/*", purge=("/v1/companies/{company}/customers/{id}",))
    found = plan("main", delivery("loyalty/changed", "3"), (loyalty,))
    assert not found.whole_account
    assert found.change.covers("main", f"{C}/me/customers/3")
    assert not found.change.covers("main", f"{C}/me/customers/33")
