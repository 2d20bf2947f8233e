import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from proxy.edge.rewrite import rewrite_url

UP = URL("https://api.kounta.com")
PUBLIC = URL("http://127.0.0.1:8080")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "https://api.kounta.com/v1/companies/5/products.json?cursor=ab%2Fc",
            "http://127.0.0.1:8080/v1/companies/5/products.json?cursor=ab%2Fc",
        ),
        ("https://API.KOUNTA.COM:443/v1/x", "http://127.0.0.1:8080/v1/x"),
        ("//api.kounta.com/v1/x?y=1", "http://127.0.0.1:8080/v1/x?y=1"),
        ("https://my.kounta.com/authorize", "https://my.kounta.com/authorize"),
        # the same host seen through a TLS terminator: still Kounta, still rewritten
        ("http://api.kounta.com/v1/x", "http://127.0.0.1:8080/v1/x"),
        ("ftp://api.kounta.com/v1/x", "ftp://api.kounta.com/v1/x"),
        ("https://api.kounta.com:8443/v1/x", "https://api.kounta.com:8443/v1/x"),
        ("/v1/relative", "/v1/relative"),
        ("https://evil.example/v1/x", "https://evil.example/v1/x"),
        ("not a url at all", "not a url at all"),
    ],
)
def test_rewrites_only_upstream_urls(value: str, expected: str) -> None:
    assert rewrite_url(value, UP, PUBLIC) == expected


def test_scheme_alone_does_not_make_another_origin() -> None:
    # An upstream behind a TLS terminator names itself https on the same host and port.
    up = URL("http://127.0.0.1:9000")
    assert rewrite_url("https://127.0.0.1:9000/v1/x?a=1", up, PUBLIC) == (
        "http://127.0.0.1:8080/v1/x?a=1"
    )
    assert rewrite_url("https://127.0.0.1:9001/v1/x", up, PUBLIC) == "https://127.0.0.1:9001/v1/x"


def test_public_url_with_path_prefix() -> None:
    public = URL("https://proxy.internal/kounta")
    got = rewrite_url("https://api.kounta.com/v1/x?page=2", UP, public)
    assert got == "https://proxy.internal/kounta/v1/x?page=2"


def test_upstream_with_base_path_only_rewrites_under_it() -> None:
    up = URL("http://127.0.0.1:9000/api")
    assert rewrite_url("http://127.0.0.1:9000/api/v1/x", up, PUBLIC) == "http://127.0.0.1:8080/v1/x"
    assert rewrite_url("http://127.0.0.1:9000/other", up, PUBLIC) == "http://127.0.0.1:9000/other"


@given(
    st.text(alphabet=st.characters(codec="ascii", exclude_characters="#?/ "), max_size=30),
    st.text(alphabet="abc=&%2F0", max_size=20),
)
def test_rewritten_cursor_keeps_path_and_query(segment: str, query: str) -> None:
    value = f"https://api.kounta.com/v1/{segment}" + (f"?{query}" if query else "")
    got = rewrite_url(value, UP, PUBLIC)
    assert got.startswith("http://127.0.0.1:8080/v1/") or got == value
    if got != value:
        assert got.removeprefix("http://127.0.0.1:8080") == value.removeprefix(
            "https://api.kounta.com"
        )
