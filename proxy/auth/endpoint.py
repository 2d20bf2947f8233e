"""Token requests: one POST to the token URL, its answer parsed (authlib's client pieces)."""

from __future__ import annotations

import json
import math

import aiohttp
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749 import OAuth2Token
from authlib.oauth2.rfc6749.parameters import prepare_token_request

from proxy.coding import coding_of, inflate_prefix
from proxy.settings import AccountSettings

TOKEN_BODY_LIMIT = 64 * 1024


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
    code = data.get("error") if isinstance(data, dict) else None
    if not isinstance(code, str) or not code or status >= 500 or status == 429:
        code = "temporarily_unavailable"
    raise OAuth2Error(error=code, status_code=status)


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
    except (aiohttp.ClientError, TimeoutError, OSError):
        raise OAuth2Error(error="temporarily_unavailable") from None
    # The session does not inflate: a gzip answer is inflated here, within the same limit.
    return parse_token_response(status, inflate_prefix(raw, coding, TOKEN_BODY_LIMIT), now)
