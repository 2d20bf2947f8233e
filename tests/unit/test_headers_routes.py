import random

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import (
    DEFAULT_FORWARDED,
    NEVER_FORWARDED,
    for_caller,
    for_upstream,
    has_bad_value,
    not_utf8,
    repeated,
)
from proxy.routes import LABELS, OTHER, TEMPLATES, breaker_key, template


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    given = [
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic x"),
        ("TE", "trailers"),
        ("Trailer", "X"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Authorization", "Bearer caller-token"),
        ("Host", "proxy"),
        ("Accept", "application/json"),
        ("X-Thing", "a"),
        ("X-Thing", "b"),
    ]
    out = for_upstream(given, frozenset({"accept", "x-thing", "x-secret-hop", "te", "upgrade"}))
    assert list(out.items()) == [("Accept", "application/json"), ("X-Thing", "a"), ("X-Thing", "b")]


def test_only_allowed_headers_are_forwarded() -> None:
    out = for_upstream([("X-Proxy-Key", "k"), ("Accept", "*/*"), ("X-Other", "1")])
    assert list(out.items()) == [("Accept", "*/*")]
    assert "If-None-Match" in for_upstream([("if-none-match", '"a"')])


def test_routing_overrides_never_pass_even_when_allowed() -> None:
    names = ["X-Original-URL", "X-Rewrite-URL", "X-HTTP-Method-Override", "X-Forwarded-Host"]
    allowed = frozenset(n.lower() for n in names)
    assert not for_upstream([(n, "/admin") for n in names], allowed)
    assert allowed <= NEVER_FORWARDED
    assert not {n.lower() for n in DEFAULT_FORWARDED} & NEVER_FORWARDED


def test_callers_via_chain_is_not_forwarded() -> None:
    # the handler adds the proxy's own Via; the caller's may name internal hosts
    out = for_upstream([("Via", "1.1 lb.internal.corp"), ("Accept", "*/*")])
    assert "Via" not in out


def test_response_headers() -> None:
    given = CIMultiDict(
        [
            ("Content-Length", "5"),
            ("Content-Encoding", "gzip"),
            ("ETag", '"a"'),
            ("Connection", "close"),
            ("X-Next-Page", "u"),
            ("Link", "a"),
            ("Link", "b"),
        ]
    )
    out = for_caller(given.items())
    assert out.getall("Link") == ["a", "b"]
    assert "Content-Length" not in out and "Content-Encoding" not in out and "Connection" not in out
    assert out["ETag"] == '"a"'


def test_bad_header_values() -> None:
    assert has_bad_value([("A", "ok"), ("B", "x\r\ny")]) == "B"
    assert has_bad_value([("A", "x\x00")]) == "A"
    assert has_bad_value([("A", "fine")]) is None


def test_header_values_that_were_not_utf8() -> None:
    assert not_utf8([("A", "plain"), ("B", "caf\u00e9")]) is None
    assert not_utf8([("A", "ok"), ("B", "caf\udce9")]) == "B"


def test_repeated_selecting_headers() -> None:
    headers = CIMultiDictProxy(CIMultiDict([("X-Page", "1"), ("x-page", "9"), ("Accept", "a")]))
    assert repeated(headers, ("Accept", "X-Page")) == "X-Page"
    assert repeated(headers, ("Accept", "X-Pretty-Print")) is None


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/companies/5001/products/12.json", "/v1/companies/{id}/products/{id}"),
        ("/v1/companies/me.json", "/v1/companies/me"),
        ("/v1/companies/5/orders/complete?x=1", "/v1/companies/{id}/orders/complete"),
        ("/v1/companies/5/orders/pending/accounts", "/v1/companies/{id}/orders/{filters}"),
        (
            "/v1/companies/5/sites/7/orders/complete",
            "/v1/companies/{id}/sites/{id}/orders/{filters}",
        ),
        ("/v1/companies/5/categories/3/products", "/v1/companies/{id}/categories/{id}/products"),
        ("/v1/companies/5/evil-word/abc", OTHER),
        ("/v1/companies/5/products/products/products/products", OTHER),
        ("/v1/orders/orders/orders", OTHER),
        ("/v1/token.json", "/v1/token"),
    ],
)
def test_route_labels_are_documented_templates_or_other(path: str, label: str) -> None:
    assert template(path) == label


def test_random_paths_only_ever_give_known_labels() -> None:
    words = ["v1", "companies", "me", "orders", "sites", "products", "complete", "accounts", "x"]
    rng = random.Random(7)
    for _ in range(5000):
        segments = [
            rng.choice([*words, str(rng.randrange(10**9))]) for _ in range(rng.randrange(9))
        ]
        assert template("/" + "/".join(segments)) in LABELS
    assert len(LABELS) == len(TEMPLATES) + 2
    assert template("/v1/" + "/".join(["products"] * 20)) == OTHER


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/v1/companies/5/products/9.json", "/v1/companies/{id}/products/{id}"),
        ("/v1/novel/thing.json", "/v1/novel"),
        ("/v1/novel/7/more", "/v1/novel"),
        ("/v1/companies/5/novel/7", "/v1/companies/{id}/novel"),
        ("/v1/companies/5/products/9/x/y", "/v1/companies/{id}/products/{id}/x"),
        ("/v1/123/4", "/v1/{id}"),
        ("/v1/" + "a" * 500, "/v1/" + "a" * 64),
    ],
)
def test_breaker_keys_keep_undocumented_paths_apart_and_ids_together(path: str, key: str) -> None:
    assert breaker_key(path) == key
