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
    page_size: int = 25
    # None: build absolute URLs from the request (scheme://Host), so the sandbox works on any port.
    origin: str | None = None
    company_id: int = 5001
    # Whether /companies/me answers with a redirect to /companies/{c} is unverified for the real
    # API; this switch lets clients be tested against both behaviours.
    me_redirect: bool = False
