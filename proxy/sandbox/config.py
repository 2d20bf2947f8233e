"""Configuration of the offline Kounta look-alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SandboxConfig:
    seed: int = 42
    products: int = 2000
    customers: int = 1000
    orders: int = 3000
    sites: int = 3
    bearer_tokens: tuple[str, ...] = ("sandbox-token",)
    client_id: str = "sandbox-client"
    # A well-known dummy credential: the sandbox guards nothing.
    client_secret: str = "sandbox-secret"  # noqa: S105
    rate_per_minute_bearer: int = 180
    rate_per_minute_basic: int = 60
    # The period those rates apply to (a minute; tests of the shared budget shorten it).
    rate_window: float = 60.0
    page_size: int = 25
    # None: build absolute URLs from the request (scheme://Host), so the sandbox works on any port.
    origin: str | None = None
    company_id: int = 5001
    # Whether /companies/me answers with a redirect to /companies/{c} is unverified for the real
    # API; this switch lets clients be tested against both behaviours.
    me_redirect: bool = False
    # OAuth 2.0 server (proxy/sandbox/oauth.py).
    access_token_lifetime: float = 3600
    # Whether a refresh answer carries a new refresh token (and the old one dies); unknown
    # for the real API, so clients are tested against both.
    rotate_refresh_tokens: bool = False
    # /authorize answers "access_denied" instead of approving.
    oauth_deny: bool = False
    # Allowed redirect URIs; empty: any loopback or https URI.
    redirect_uris: tuple[str, ...] = ()
    # Refresh tokens accepted from the start, as if issued earlier (bootstraps without /authorize).
    refresh_tokens: tuple[str, ...] = ()
