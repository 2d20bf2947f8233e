"""Pure parts of the credential code: token answers, 401 bodies, timing, redirects."""

from __future__ import annotations

import pytest
from authlib.oauth2 import OAuth2Error

from proxy.auth.authorize import AuthorizeError, check_state, parse_redirect
from proxy.auth.endpoint import parse_token_response
from proxy.auth.layer import is_token_failure
from proxy.auth.token_file import StoredToken
from proxy.auth.tokens import refresh_due
from proxy.clock import backoff
from proxy.settings import ConfigError, load


def test_token_answer_gets_expiry_from_our_clock_with_subsecond_precision() -> None:
    body = b'{"access_token":"a","refresh_token":"r","expires_in":3600,"token_type":"bearer",'
    body += b'"expires_at":1}'
    token = parse_token_response(200, body, now=1000.25)
    assert token["access_token"] == "a" and token["refresh_token"] == "r"
    assert token["expires_at"] == 4600.25


def test_token_answer_without_expiry_never_expires_by_time() -> None:
    token = parse_token_response(200, b'{"access_token":"a"}', now=5.0)
    assert token.get("expires_at") is None and "refresh_token" not in token


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (400, b'{"error":"invalid_grant"}', "invalid_grant"),
        (401, b'{"error":"invalid_client","error_description":"bad"}', "invalid_client"),
        (503, b'{"error":"invalid_grant"}', "temporarily_unavailable"),
        (429, b"Limit exceeded", "temporarily_unavailable"),
        (502, b"<html>bad gateway</html>", "temporarily_unavailable"),
        (200, b'{"no":"token"}', "temporarily_unavailable"),
        (200, b"not json", "temporarily_unavailable"),
    ],
)
def test_token_errors_carry_the_endpoints_code(status: int, body: bytes, code: str) -> None:
    with pytest.raises(OAuth2Error) as caught:
        parse_token_response(status, body, now=0)
    assert caught.value.error == code


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"error":"invalid_token","error_description":"The access token provided has expired"}',
            True,
        ),
        (b'{"error":"invalid_token"}', True),
        (
            b'{"error":"unauthorized","error_description":"The access token provided is invalid"}',
            True,
        ),
        (b'{"error":"access_denied","error_description":"No access to this site"}', False),
        (b"The access token provided has expired", True),
        (b"[]", False),
        (b"", False),
    ],
)
def test_which_401s_mean_the_token(body: bytes, expected: bool) -> None:
    assert is_token_failure(body) is expected


def test_refresh_leeway_is_five_minutes_or_half_the_lifetime() -> None:
    hour = StoredToken("a", "r", expires_at=4600.0, obtained_at=1000.0)
    assert refresh_due(hour, 300) == 4300
    minute = StoredToken("a", "r", expires_at=1060.0, obtained_at=1000.0)
    assert refresh_due(minute, 300) == 1030
    unknown_start = StoredToken("a", "r", expires_at=1060.0)
    assert refresh_due(unknown_start, 300) == 760
    assert refresh_due(StoredToken("a", "r", None), 300) is None


def test_backoff_grows_is_capped_and_jittered() -> None:
    assert backoff(1, 0.5, 60, rng=lambda: 1.0) == 0.5
    assert backoff(4, 0.5, 60, rng=lambda: 1.0) == 4.0
    assert backoff(30, 0.5, 60, rng=lambda: 1.0) == 60
    assert backoff(30, 0.5, 60, rng=lambda: 0.0) == 30


def test_redirects_are_parsed_and_checked() -> None:
    redirect = parse_redirect("http://127.0.0.1:8765/callback?code=abc&state=xyz")
    assert (redirect.code, redirect.state) == ("abc", "xyz")
    check_state(redirect, "xyz")
    with pytest.raises(AuthorizeError, match="state mismatch"):
        check_state(redirect, "other")
    assert parse_redirect("  abc \n").state is None
    with pytest.raises(AuthorizeError, match="denied"):
        parse_redirect("http://x/cb?error=access_denied&state=xyz")
    with pytest.raises(AuthorizeError, match="no code"):
        parse_redirect("http://x/cb?state=xyz")


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("TOKEN_URL", "http://example.com/v1/token", "https"),
        ("TOKEN_AUTH", "private_key_jwt", "must be one of"),
        ("REFRESH_LEEWAY", "-1", "negative"),
        ("TOKEN_WAIT", "0", "greater than 0"),
        ("REDIRECT_URI", "not a url", "absolute"),
    ],
)
def test_oauth_account_settings_are_checked(key: str, value: str, problem: str) -> None:
    env = {
        "KOUNTA_PROXY_ACCOUNTS__MAIN__MODE": "oauth",
        "KOUNTA_PROXY_ACCOUNTS__MAIN__CLIENT_ID": "c",
        "KOUNTA_PROXY_ACCOUNTS__MAIN__CLIENT_SECRET": "s",
        f"KOUNTA_PROXY_ACCOUNTS__MAIN__{key}": value,
    }
    with pytest.raises(ConfigError, match=problem) as caught:
        load(None, env=env)
    assert caught.value.key.startswith("accounts.main.")
