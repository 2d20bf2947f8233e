"""List pages as witnesses (proxy.cache.webhooks.witness): paths, page walk, comparison."""

from __future__ import annotations

import gzip
import json

import pytest

from proxy.cache.webhooks import witness

C = "/v1/companies/5001"


@pytest.mark.parametrize(
    ("record", "listing"),
    [
        (f"{C}/products/12.json", f"{C}/products.json"),
        (f"{C}/products/12", f"{C}/products"),
        (f"{C}/price_lists/7.json", f"{C}/price_lists.json"),
        (f"{C}/products.json", None),  # a list, not a record
        (f"{C}/sites/3/products.json", None),
        ("/v1/other/12.json", None),
        (f"{C}/products/12/extra.json", None),
    ],
)
def test_family_list(record: str, listing: str | None) -> None:
    assert witness.family_list(record) == listing


@pytest.mark.parametrize(
    ("listing", "member", "record"),
    [
        (f"{C}/products.json", "12", f"{C}/products/12.json"),
        (f"{C}/products", "12", f"{C}/products/12"),
        (f"{C}/sites/3/products.json", "12", f"{C}/products/12.json"),
        (f"{C}/products.json", "12a", None),  # not an id a path can carry
        (f"{C}/products.json", "../1", None),
        (f"{C}/products/12.json", "5", None),  # a record is not a list
    ],
)
def test_member_path(listing: str, member: str, record: str | None) -> None:
    assert witness.member_path(listing, member) == record


@pytest.mark.parametrize(
    ("header", "page"),
    [
        (None, None),
        ("", None),
        (f"https://api.kounta.com{C}/products.json?cursor=ab", f"{C}/products.json?cursor=ab"),
        (f"{C}/products.json?page=2", f"{C}/products.json?page=2"),
        (f"https://api.kounta.com{C}/customers.json?page=2", None),  # another resource
        ("http://[::1", None),  # unparsable
    ],
)
def test_next_page(header: str | None, page: str | None) -> None:
    assert witness.next_page(header, f"{C}/products.json") == page


@pytest.mark.parametrize(
    ("suspects", "covered", "choice"),
    [
        (True, None, "suspect"),
        (True, False, "suspect"),
        (False, None, "list"),
        (False, True, "list"),
        (False, False, "record"),  # the last page showed no cached member
    ],
)
def test_choose(suspects: bool, covered: bool | None, choice: str) -> None:
    assert witness.choose(suspects, covered) == choice


def test_members_of_each_shape() -> None:
    page = [{"id": 1, "name": "a"}, {"id_str": "2"}, {"name": "no id"}, 7, {"id": True}]
    assert [i for i, _ in witness.members(json.dumps(page).encode())] == ["1", "2"]
    enveloped = json.dumps({"data": [{"id": 3}]}).encode()
    assert [i for i, _ in witness.members(enveloped)] == ["3"]
    for bad in (b"not json", b"{}", b'{"id": 1}', b"null"):
        assert list(witness.members(bad)) == []


@pytest.mark.parametrize(
    ("member", "record", "disagree"),
    [
        ({"id": 1, "updated_at": "t2"}, {"id": 1, "updated_at": "t1", "price": 3}, True),
        ({"id": 1, "updated_at": "t1"}, {"id": 1, "updated_at": "t1", "price": 3}, False),
        ({"id": 1, "code": "x"}, {"id": 1, "name": "n"}, False),  # no field in common
        ({"id": 1, "id_str": "1"}, {"id": 1, "id_str": "01"}, False),  # ids say nothing
        ({"id": 1, "name": None}, {"id": 1, "name": "n"}, True),
    ],
)
def test_disagrees(member: dict[str, object], record: dict[str, object], disagree: bool) -> None:
    assert witness.disagrees(member, json.dumps(record).encode()) is disagree


def test_disagrees_only_with_an_object() -> None:
    assert witness.disagrees({"id": 1, "a": 1}, b"[1]") is False
    assert witness.disagrees({"id": 1, "a": 1}, b"garbage") is False


def test_decoded_bodies() -> None:
    body = b'[{"id": 1}]'
    assert witness.decoded(body, None) == body
    assert witness.decoded(body, "identity") == body
    assert witness.decoded(gzip.compress(body), "gzip") == body
    assert witness.decoded(b"not gzip", "gzip") is None
    assert witness.decoded(body, "br") is None  # a coding it cannot read
    huge = b" " * (witness.MAX_BODY + 1)
    assert witness.decoded(huge, None) is None
    assert witness.decoded(gzip.compress(huge), "gzip") is None  # bounded while inflating


def test_fingerprint_knows_a_member_again() -> None:
    a = witness.fingerprint({"id": 1, "name": "a", "updated_at": "t1"})
    assert a == witness.fingerprint({"updated_at": "t1", "name": "a", "id": 1})  # key order
    assert a != witness.fingerprint({"id": 1, "name": "a", "updated_at": "t2"})
