"""Authorization header check, kept apart so an OAuth server can register tokens beside it."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .config import SandboxConfig

INVALID = "The access token provided is invalid"
EXPIRED = "The access token provided has expired"


@dataclass(frozen=True)
class Principal:
    kind: Literal["bearer", "basic"]
    # Rate-limit key: one bucket per bearer token / per Basic client id.
    client: str


@dataclass(frozen=True)
class AuthFailure:
    description: str


def authenticate(
    header: str | None,
    tokens: Mapping[str, float | None],
    config: SandboxConfig,
    now: float,
) -> Principal | AuthFailure:
    """`tokens` maps each accepted bearer token to its expiry (epoch seconds) or None."""
    if not header:
        return AuthFailure(INVALID)
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    scheme = scheme.lower()
    if scheme == "bearer" and credentials:
        if credentials not in tokens:
            return AuthFailure(INVALID)
        expires_at = tokens[credentials]
        if expires_at is not None and expires_at <= now:
            return AuthFailure(EXPIRED)
        return Principal("bearer", "bearer:" + credentials)
    if scheme == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return AuthFailure(INVALID)
        client_id, sep, secret = decoded.partition(":")
        ok_id = hmac.compare_digest(client_id.encode(), config.client_id.encode())
        ok_secret = hmac.compare_digest(secret.encode(), config.client_secret.encode())
        if sep and ok_id and ok_secret:
            return Principal("basic", "basic:" + client_id)
    return AuthFailure(INVALID)
