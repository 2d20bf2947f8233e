"""The OAuth token state machine, pure: what an account's provider should do, as functions
of what it holds and the time, with no I/O (hishel's ``_spec.py`` is the model).
:class:`~proxy.auth.providers.OAuthProvider` does the I/O around it (the token store,
the token endpoint, the background task) and calls these to decide.

States (metric ``kounta_proxy_token_state``, one log line per change)::

    pending          a refresh token but no access token yet: the first refresh is due
    valid            an access token that works (refreshed in the background before expiry)
    unavailable      the token endpoint or store failed; retried with backoff and jitter
    needs_authorize  no refresh token, or Kounta said invalid_grant: run `kounta-proxy authorize`
    rejected         Kounta refused the client id/secret (invalid_client)

Decisions: :func:`state_of` (a token held), :func:`blocked` (a request that needs a token:
go on, or fail at once), :func:`problem` (readiness), :func:`on_endpoint_error`,
:func:`next_wake` and :func:`refresh_now` (the background refresh), :func:`adoptable` (a
token stored elsewhere makes our refresh needless), :func:`sendable` (a token a request may
carry now), :func:`may_renew` (a 401 worth a token request), :func:`issued` (the token a
token answer gives).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.auth.token_file import StoredToken
from proxy.clock import backoff

INF = float("inf")
RETRY_BASE = 0.5
# How often a provider with no usable refresh token looks for a newly authorized token file.
AUTHORIZE_POLL = 5.0
# The background refresh never asks again sooner than this after a token arrived.
MIN_REFRESH_GAP = 1.0
# A token is not sent in its last moments, which the request's trip to Kounta could outlast:
# this long before expiry, or a tenth of the lifetime for shorter-lived tokens.
SEND_MARGIN = 1.0


class TokenState(enum.StrEnum):
    """An account's token state: the ``state`` label of ``kounta_proxy_token_state``."""

    PENDING = "pending"
    VALID = "valid"
    UNAVAILABLE = "unavailable"
    NEEDS_AUTHORIZE = "needs_authorize"
    REJECTED = "rejected"
    STATIC = "static"


PENDING, VALID, UNAVAILABLE = TokenState.PENDING, TokenState.VALID, TokenState.UNAVAILABLE
NEEDS_AUTHORIZE, REJECTED, STATIC = (
    TokenState.NEEDS_AUTHORIZE,
    TokenState.REJECTED,
    TokenState.STATIC,
)
STATES = tuple(TokenState)
# States only an operator (or a newly authorized token) can end.
STUCK = (NEEDS_AUTHORIZE, REJECTED)
BAD = (UNAVAILABLE, NEEDS_AUTHORIZE, REJECTED)
# Token endpoint errors that retrying cannot fix.
PERMANENT_ERRORS = frozenset(
    {"invalid_grant", "invalid_client", "unauthorized_client", "unsupported_grant_type"}
)


@dataclass(frozen=True, slots=True)
class Held:
    """What a provider holds at one moment."""

    state: TokenState
    token: StoredToken | None = None
    refreshing: bool = False  # a token request (under the store's lock) is under way
    failures: int = 0  # token requests failed in a row (the backoff's count)
    store_failed: bool = False  # the last failure was the token store's, not the endpoint's


@dataclass(frozen=True, slots=True)
class Timing:
    leeway: float  # refresh this long before expiry (at most half the lifetime)
    retry_max: float  # the backoff's cap while unavailable


# --- decisions


@dataclass(frozen=True, slots=True)
class Rejection:
    """Fail at once: only authorizing again (or fixing the client credentials) helps."""

    state: TokenState  # NEEDS_AUTHORIZE or REJECTED


@dataclass(frozen=True, slots=True)
class Failing:
    """Fail at once with 503: the endpoint (or the store) is failing, retried in the background."""

    store: bool


Stop = Rejection | Failing


def lifetime(token: StoredToken) -> float:
    """How long ``token`` lives from when it came (INF: no expiry, or unknown arrival)."""
    if token.expires_at is None or not token.obtained_at:
        return INF
    return max(0.0, token.expires_at - token.obtained_at)


def refresh_due(token: StoredToken, leeway: float) -> float | None:
    """When to refresh: ``leeway`` before expiry, but no earlier than half the lifetime."""
    if token.expires_at is None:
        return None
    return token.expires_at - min(leeway, lifetime(token) / 2)


def sendable(token: StoredToken, now: float) -> bool:
    """Whether a request sent now may carry ``token``: usable, and not in its last moments
    (:data:`SEND_MARGIN`, at most a tenth of its lifetime), so it cannot expire on the way
    and come back as a 401 that spends budget. Asked when the request is sent, after any
    wait for the budget."""
    return token.usable(now + min(SEND_MARGIN, lifetime(token) / 10))


def state_of(token: StoredToken | None, now: float, can_refresh: bool) -> tuple[TokenState, str]:
    """The state (and why) once ``token`` is held; ``can_refresh``: a refresh token or the
    client_credentials grant."""
    if token is None:
        if can_refresh:
            return PENDING, "no access token yet"
        return NEEDS_AUTHORIZE, "no token file and no refresh token"
    if token.usable(now):
        return VALID, "token obtained"
    if can_refresh:
        return PENDING, "access token expired"
    return NEEDS_AUTHORIZE, "no refresh token"


def blocked(held: Held) -> Stop | None:
    """Whether a request that needs a token must fail at once instead of waiting for a
    refresh (none can help now)."""
    if held.state in STUCK:
        return Rejection(held.state)
    if held.state == UNAVAILABLE and not held.refreshing:
        return Failing(held.store_failed)
    return None


def problem(held: Held, now: float) -> Stop | None:
    """For readiness: None when requests can get a token."""
    if held.state in STUCK:
        return Rejection(held.state)
    usable = held.token is not None and held.token.usable(now)
    if held.state == UNAVAILABLE and not usable:
        return Failing(held.store_failed)
    return None


def on_endpoint_error(code: str) -> Stop:
    """What a token endpoint's error code means for the account."""
    if code in PERMANENT_ERRORS:
        client = code in ("invalid_client", "unauthorized_client")
        return Rejection(REJECTED if client else NEEDS_AUTHORIZE)
    return Failing(store=False)


def next_wake(held: Held, timing: Timing, now: float) -> float | None:
    """Seconds until the background refresh looks again (None: only when woken)."""
    if held.refreshing:
        return None  # woken when it finishes
    if held.state in STUCK:
        return AUTHORIZE_POLL
    if held.state == UNAVAILABLE:
        return backoff(held.failures, RETRY_BASE, timing.retry_max)
    token = held.token
    if token is None:
        return 0.0
    due = refresh_due(token, timing.leeway)
    if due is None:
        return None
    # A token endpoint that hands out near-zero lifetimes must not be asked in a loop.
    return max(0.0, due - now, token.obtained_at + MIN_REFRESH_GAP - now)


def refresh_now(held: Held, timing: Timing, now: float) -> bool:
    """Whether the background refresh asks for a token now."""
    if held.refreshing:
        return False
    if held.state in (PENDING, UNAVAILABLE) or held.token is None:
        return True
    due = refresh_due(held.token, timing.leeway)
    return due is not None and now >= due and now >= held.token.obtained_at + MIN_REFRESH_GAP


def adoptable(
    stored: StoredToken, held: str | None, failed: str | None, leeway: float, now: float
) -> bool:
    """Whether ``stored`` (read under the lock, or while waiting for it) is a token another
    process fetched that we should use instead of asking again: not the one we hold
    (``held``, an access token), not the one that just failed (``failed``, a header), usable
    and not yet due for a refresh itself."""
    if stored.access_token == held or not stored.usable(now):
        return False
    if failed is not None and bearer(stored.access_token) == failed:
        return False
    due = refresh_due(stored, leeway)
    return due is None or now < due


def may_renew(fetched: StoredToken | None, failed: str, now: float, floor: float) -> bool:
    """Whether a 401 for ``failed`` may cost a token request: not while ``failed`` is the
    token fetched here (``fetched``) less than ``floor`` seconds ago, nor less than half its
    lifetime ago (a short-lived token is due for a refresh by then anyway; one past its end
    by our own clock was refused for a good reason)."""
    if fetched is None or bearer(fetched.access_token) != failed:
        return True
    return now - fetched.obtained_at >= min(floor, lifetime(fetched) / 2)


def issued(
    access_token: str, refresh_token: str | None, expires_at: float | None, sent: str, now: float
) -> StoredToken:
    """The token a token answer gives; with no refresh token in it, the one ``sent`` stays
    (whether the endpoint rotates is unknown)."""
    return StoredToken(
        access_token=access_token,
        refresh_token=refresh_token or sent,
        expires_at=expires_at,
        obtained_at=now,
    )


def bearer(access_token: str) -> str:
    return f"Bearer {access_token}"
