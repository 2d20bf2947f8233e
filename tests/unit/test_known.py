"""The fast path's one record per raw target (proxy.edge.known): its target, route label and
cache key, one memo lookup a fresh hit."""

from __future__ import annotations

import gc

import pytest
from multidict import CIMultiDict

from proxy.cache.keys import SELECTING, cache_key
from proxy.cache.memory import HotEntries
from proxy.edge.known import known
from proxy.errors import ProxyError
from proxy.memo import KEY_BYTES, MOST_KEYS
from proxy.target import Target

NONE = (None,) * len(SELECTING)


def test_one_record_per_raw_target_holds_its_target_route_and_key() -> None:
    raw = "/v1/companies/5/products/7.json?x=1"
    record = known(raw)
    assert known(raw) is record
    assert record.target == Target("/v1/companies/5/products/7.json", "x=1")
    assert record.route == "/v1/companies/{id}/products/{id}"
    assert not gc.is_tracked(record) and not gc.is_tracked(record.target)
    path, query = record.target.path, record.target.query
    main = cache_key("main", path, query, {})
    assert record.key_for("main", NONE) == main
    # Another account, or other selecting values, has its own key, each time it is asked.
    assert record.key_for("other", NONE) == cache_key("other", path, query, {})
    assert record.key_for("main", NONE) == main
    paged = ("application/json", None, "2")
    headers = CIMultiDict({"Accept": "application/json", "X-Page": "2"})
    assert record.key_for("main", paged) == cache_key("main", path, query, headers)
    assert record.key_for("main", NONE) == main


def test_a_refused_target_is_never_remembered() -> None:
    known.cache_clear()
    for raw in ("/v2/companies/5.json", "/v1/a//b", "/v1/a%2fb", "*"):
        for _ in range(2):
            with pytest.raises(ProxyError):
                known(raw)
    assert known.cache_info().currsize == 0


def test_the_route_is_the_decoded_paths_as_the_long_way_labels_it() -> None:
    """The long way labels a request by its decoded path (aiohttp's ``request.path``): an
    escaped letter is that letter."""
    assert known("/v1/companies/5/cust%6Fmers.json").route == "/v1/companies/{id}/customers"
    assert known("/v1/companies/5/customers.json").route == "/v1/companies/{id}/customers"


def test_a_records_kept_for_every_key_the_memory_tier_holds_past_the_other_memos_ceiling() -> None:
    """A tier of 100,000 entries filled in order had its first keys' records pushed out by
    the last 65,536 (the per-key memos' ceiling): each first fresh hit of one parsed its
    target and made its key again (~30 µs)."""
    more = MOST_KEYS + 4096
    HotEntries((more + 4096) * KEY_BYTES)  # a tier that holds them all (no bytes taken)
    known.cache_clear()
    try:
        first = known("/v1/companies/5/products/0.json")
        for n in range(1, more):
            known(f"/v1/companies/5/customers/{n}.json")
        misses = known.cache_info().misses
        assert known("/v1/companies/5/products/0.json") is first
        assert known.cache_info().misses == misses
    finally:
        known.cache_clear()  # ~35 MB of records
