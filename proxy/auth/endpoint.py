"""Token requests: one POST to the token URL, its answer parsed (authlib's client pieces)."""

from __future__ import annotations

import json
import logging
import math
import socket

import aiohttp
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749 import OAuth2Token
from authlib.oauth2.rfc6749.parameters import prepare_token_request

from proxy.auth.metrics import AuthMetrics
from proxy.coding import coding_of, inflate_prefix
from proxy.logs import Throttle, event
from proxy.settings import AccountSettings

TOKEN_BODY_LIMIT = 64 * 1024
# Why a token request failed (the metric's ``kind`` label; the log line's ``cause``).
FAILURE_KINDS = ("dns", "connect", "tls", "timeout", "reset", "http_4xx", "http_5xx", "invalid")


class TokenRequestFailed(OAuth2Error):  # type: ignore[misc]
    """A token request that failed, with its cause for the operator: ``kind`` (one of
    :data:`FAILURE_KINDS`) and ``detail`` (words for the log, never for a caller: the token
    URL's address, the OS error, the endpoint's own ``error``; secrets scrubbed)."""

    def __init__(self, error: str, kind: str, detail: str, status: int | None = None) -> None:
        super().__init__(error=error, status_code=status)
        self.kind = kind
        self.detail = detail


# A failing token endpoint: one `token_request_failed` line per account and cause this often
# (the first at once, then the count of those held back); a new cause is logged at once.
FAILURE_LOG_INTERVAL = 60.0


class FailureLog:
    """Why an account's token requests fail: counted by kind, logged rate-limited."""

    def __init__(self, account: str, token_url: str, metrics: AuthMetrics | None) -> None:
        self.account = account
        self.token_url = token_url.split("?", 1)[0].split("#", 1)[0]
        self.metrics = metrics
        self.throttle = Throttle(FAILURE_LOG_INTERVAL)
        if metrics is not None:
            for kind in FAILURE_KINDS:  # every cause from 0, so increase() sees the first
                metrics.token_failures.labels(account, kind)

    def report(self, failure: TokenRequestFailed, consecutive: int) -> None:
        if self.metrics is not None:
            self.metrics.token_failures.labels(self.account, failure.kind).inc()
        held_back = self.throttle.allow(failure.kind)
        if held_back is None:
            return
        event(
            "token_request_failed",
            logging.WARNING,
            account=self.account,
            cause=failure.kind,
            error=failure.error,
            status=failure.status_code,
            detail=failure.detail,
            token_url=self.token_url,
            consecutive_failures=consecutive,
            not_logged_since_last=held_back,
        )

    def recovered(self) -> None:
        """A token came: the next failure is news, logged at once."""
        for kind in FAILURE_KINDS:
            self.throttle.forget(kind)


def parse_token_response(status: int, body: bytes, now: float) -> OAuth2Token:
    """A token endpoint answer as an ``OAuth2Token`` (``expires_at`` from ``now``), or
    ``OAuth2Error`` with the endpoint's ``error`` code (``temporarily_unavailable`` when it
    gave none). Pure: no clock, no I/O."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if status == 200 and isinstance(data, dict) and isinstance(data.get("access_token"), str):
        params = dict(data)
        lifetime = _seconds(params.pop("expires_in", None))
        expires_at = None if lifetime is None else now + lifetime
        if lifetime is not None:
            params["expires_in"] = lifetime
        params.pop("expires_at", None)  # only our own clock's idea of expiry counts
        token = OAuth2Token(params)
        if expires_at is not None:
            token["expires_at"] = expires_at  # authlib would round it to whole seconds
        return token
    given = data.get("error") if isinstance(data, dict) else None
    code = given
    if not isinstance(code, str) or not code or status >= 500 or status == 429:
        code = "temporarily_unavailable"
    kind = "http_5xx" if status >= 500 else "http_4xx" if status >= 400 else "invalid"
    detail = f"HTTP {status}"
    if isinstance(given, str) and given:
        detail += f", error={given[:100]!r}"
        described = data.get("error_description") if isinstance(data, dict) else None
        if isinstance(described, str) and described:
            detail += f", error_description={described[:200]!r}"
    elif status == 200:
        detail += ", no access_token in the answer"
    raise TokenRequestFailed(code, kind, detail, status)


def _seconds(value: object) -> float | None:
    """``expires_in`` as seconds: a JSON number or a numeric string (some servers quote it);
    None for anything else, which authlib must never see (it would call ``int()`` on it)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


async def request_token(
    session: aiohttp.ClientSession,
    account: AccountSettings,
    grant: str,
    now: float,
    **params: str,
) -> OAuth2Token:
    """One token request (client authentication by ``account.token_auth``); raises
    ``OAuth2Error`` (``temporarily_unavailable`` for network failures and timeouts)."""
    body = prepare_token_request(grant, **params)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
        "Accept-Encoding": "gzip",  # what inflate_prefix reads (the session inflates nothing)
    }
    auth = ClientAuth(account.client_id, account.client_secret.reveal(), account.token_auth)
    url, headers, body = auth.prepare("POST", account.token_url, headers, body)
    timeout = aiohttp.ClientTimeout(total=account.token_timeout)
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            raw = await response.content.read(TOKEN_BODY_LIMIT)
            status = response.status
            coding = coding_of(response.headers.items())
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise TokenRequestFailed(
            "temporarily_unavailable", failure_kind(e), _scrub(detail, account, params)
        ) from None
    # The session does not inflate: a gzip answer is inflated here, within the same limit.
    try:
        return parse_token_response(status, inflate_prefix(raw, coding, TOKEN_BODY_LIMIT), now)
    except TokenRequestFailed as e:
        e.detail = _scrub(e.detail, account, params)
        raise


def failure_kind(error: BaseException) -> str:
    """The kind of a network failure: dns, tls, connect, timeout or reset."""
    if isinstance(error, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(error, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "tls"
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return "dns"
    if isinstance(error, aiohttp.ClientConnectorError):
        os_error = getattr(error, "os_error", None)
        return "dns" if isinstance(os_error, socket.gaierror) else "connect"
    return "reset"


def _scrub(text: str, account: AccountSettings, params: dict[str, str]) -> str:
    """``text`` without the account's secrets (an endpoint may echo what it was sent)."""
    for secret in (account.client_secret.reveal(), *params.values()):
        if len(secret) >= 4:
            text = text.replace(secret, "****")
    return text[:500]
