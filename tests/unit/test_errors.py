import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import MAX_DESCRIPTION, RateLimited, code_for, normalise_error


def decode(body: bytes) -> dict[str, object]:
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


def test_oauth_shaped_body_keeps_its_keys() -> None:
    body = b'{"error":"invalid_token","error_description":"The access token provided has expired","hint":"x"}'
    status, headers, out = normalise_error(401, {"Content-Type": "application/json"}, body)
    assert status == 401
    data = decode(out)
    assert data == {
        "error": "invalid_token",
        "error_description": "The access token provided has expired",
        "hint": "x",
    }
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"


def test_plain_text_limit_exceeded() -> None:
    status, _, out = normalise_error(429, {"Content-Type": "text/plain"}, b"Limit exceeded")
    assert status == 429
    assert decode(out) == {"error": "rate_limited", "error_description": "Limit exceeded"}


def test_html_page_becomes_short_text_without_markup() -> None:
    page = b"<html><head><title>502 Bad Gateway</title><style>p{}</style></head><body><h1>Oops</h1></body></html>"
    _, _, out = normalise_error(502, {"Content-Type": "text/html"}, page)
    data = decode(out)
    assert data["error"] == "bad_gateway"
    assert data["error_description"] == "502 Bad Gateway"


def test_html_without_title_is_stripped() -> None:
    _, _, out = normalise_error(
        500,
        {"Content-Type": "text/html"},
        b"<p>Server <b>exploded</b> &amp; died</p><script>x()</script>",
    )
    assert decode(out)["error_description"] == "Server exploded & died"


def test_other_json_kept_under_upstream_body() -> None:
    _, _, out = normalise_error(422, {}, b'{"errors":["name is required"]}')
    data = decode(out)
    assert data["error"] == "invalid_request"
    assert data["upstream_body"] == {"errors": ["name is required"]}
    assert data["error_description"].startswith("The upstream answered 422")


def test_empty_body_gets_status_phrase() -> None:
    _, _, out = normalise_error(404, {}, b"")
    assert decode(out) == {
        "error": "not_found",
        "error_description": "The upstream answered 404 Not Found",
    }


def test_long_text_is_cut() -> None:
    _, _, out = normalise_error(500, {}, b"x" * 10_000)
    assert len(str(decode(out)["error_description"])) <= MAX_DESCRIPTION


def test_error_key_that_is_not_a_string_is_replaced() -> None:
    _, _, out = normalise_error(400, {}, b'{"error": {"nested": 1}}')
    data = decode(out)
    assert data["error"] == "invalid_request"
    assert data["upstream_body"] == {"error": {"nested": 1}}


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid_request"),
        (401, "invalid_token"),
        (403, "access_denied"),
        (406, "not_acceptable"),
        (409, "conflict"),
        (413, "request_too_large"),
        (415, "unsupported_media_type"),
        (422, "invalid_request"),
        (429, "rate_limited"),
        (500, "server_error"),
        (502, "bad_gateway"),
        (503, "temporarily_unavailable"),
        (504, "gateway_timeout"),
        (418, "invalid_request"),
        (599, "server_error"),
    ],
)
def test_status_table(status: int, code: str) -> None:
    assert code_for(status) == code


def test_rate_limited_body_and_header() -> None:
    e = RateLimited("budget exhausted", retry_after=0)
    assert e.retry_after == 1
    assert e.headers() == {"Retry-After": "1"}
    assert e.body()["retry_after"] == 1


@given(
    st.integers(min_value=400, max_value=599),
    st.binary(max_size=2000),
    st.sampled_from(["text/html", "text/plain", "application/json", ""]),
)
def test_any_error_becomes_valid_oauth_json(status: int, body: bytes, ctype: str) -> None:
    out_status, headers, out = normalise_error(status, {"Content-Type": ctype}, body)
    assert out_status == status
    data = decode(out)
    assert isinstance(data["error"], str) and data["error"]
    assert isinstance(data["error_description"], str) and data["error_description"]
    assert headers["Content-Type"].startswith("application/json")
    out.decode("utf-8")


def test_proxy_own_errors_have_their_own_codes() -> None:
    from proxy.errors import (
        CircuitOpen,
        RequestTooLarge,
        TooManyPages,
        UpstreamTimeout,
        UpstreamUnreachable,
        error_body,
    )
    from proxy.target import InvalidTarget

    cases = [
        (UpstreamUnreachable("x"), 502, "upstream_unreachable"),
        (UpstreamTimeout("x"), 504, "upstream_timeout"),
        (RateLimited("x", retry_after=3), 429, "rate_limited"),
        (CircuitOpen("x", retry_after=7), 503, "circuit_open"),
        (InvalidTarget("x"), 400, "invalid_request_target"),
        (RequestTooLarge("x"), 413, "request_too_large"),
        (TooManyPages("x"), 422, "too_many_pages"),
    ]
    for error, status, code in cases:
        out_status, _, out = normalise_error(error.status, {}, error_body(error))
        assert (out_status, decode(out)["error"]) == (status, code)
    assert CircuitOpen("x", retry_after=7).headers() == {"Retry-After": "7"}
    assert CircuitOpen("x", retry_after=7).stale_ok
