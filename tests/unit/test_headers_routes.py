from multidict import CIMultiDict

from proxy.headers import for_caller, for_upstream, has_bad_value
from proxy.routes import template


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
    out = for_upstream(given)
    assert list(out.items()) == [("Accept", "application/json"), ("X-Thing", "a"), ("X-Thing", "b")]


def test_extra_caller_headers_are_dropped() -> None:
    out = for_upstream([("X-Proxy-Key", "k"), ("Accept", "*/*")], frozenset({"x-proxy-key"}))
    assert "X-Proxy-Key" not in out


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


def test_route_templates_hide_ids() -> None:
    assert template("/v1/companies/5001/products/12.json") == "/v1/companies/{id}/products/{id}"
    assert template("/v1/companies/me.json") == "/v1/companies/me"
    assert template("/v1/companies/5/orders/complete?x=1") == "/v1/companies/{id}/orders/complete"
    assert template("/v1/companies/5/evil-word/abc") == "/v1/companies/{id}/{id}/{id}"
    deep = "/v1/" + "/".join(["products"] * 20)
    assert template(deep).endswith("/...")
