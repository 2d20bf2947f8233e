"""Table tests of the pure token state machine (proxy/auth/tokens.py), one branch a row."""

from __future__ import annotations

import pytest

from proxy.auth.token_file import StoredToken
from proxy.auth.tokens import (
    AUTHORIZE_POLL,
    MIN_REFRESH_GAP,
    NEEDS_AUTHORIZE,
    PENDING,
    REJECTED,
    UNAVAILABLE,
    VALID,
    Failing,
    Held,
    Rejection,
    Stop,
    Timing,
    TokenState,
    adoptable,
    blocked,
    issued,
    may_renew,
    next_wake,
    on_endpoint_error,
    problem,
    refresh_now,
    sendable,
    state_of,
)

NOW = 1000.0
TIMING = Timing(leeway=60.0, retry_max=30.0)


def token(access: str = "a", expires_in: float | None = 3600.0, age: float = 0.0) -> StoredToken:
    """A token obtained ``age`` seconds ago that expires ``expires_in`` after it came."""
    obtained = NOW - age
    expires = None if expires_in is None else obtained + expires_in
    return StoredToken(access, "r", expires, obtained_at=obtained)


EXPIRED = token(age=4000.0)
VALID_TOKEN = token()


@pytest.mark.parametrize(
    ("held", "can_refresh", "state", "reason"),
    [
        (None, True, PENDING, "no access token yet"),
        (None, False, NEEDS_AUTHORIZE, "no token file and no refresh token"),
        (VALID_TOKEN, False, VALID, "token obtained"),
        (token(expires_in=None), False, VALID, "token obtained"),
        (EXPIRED, True, PENDING, "access token expired"),
        (EXPIRED, False, NEEDS_AUTHORIZE, "no refresh token"),
        (StoredToken("", "r", None), True, PENDING, "access token expired"),
    ],
)
def test_the_state_a_held_token_gives(
    held: StoredToken | None, can_refresh: bool, state: TokenState, reason: str
) -> None:
    assert state_of(held, NOW, can_refresh) == (state, reason)


@pytest.mark.parametrize(
    ("held", "stop"),
    [
        (Held(VALID, VALID_TOKEN), None),
        (Held(PENDING), None),
        (Held(NEEDS_AUTHORIZE), Rejection(NEEDS_AUTHORIZE)),
        (Held(REJECTED, VALID_TOKEN), Rejection(REJECTED)),
        (Held(UNAVAILABLE, refreshing=True), None),  # a refresh under way: wait for it
        (Held(UNAVAILABLE), Failing(store=False)),
        (Held(UNAVAILABLE, store_failed=True), Failing(store=True)),
    ],
)
def test_a_request_without_a_usable_token_fails_at_once_only_when_no_refresh_helps(
    held: Held, stop: Stop | None
) -> None:
    assert blocked(held) == stop


@pytest.mark.parametrize(
    ("held", "found"),
    [
        (Held(VALID, VALID_TOKEN), None),
        (Held(PENDING), None),
        (Held(NEEDS_AUTHORIZE), Rejection(NEEDS_AUTHORIZE)),
        (Held(REJECTED), Rejection(REJECTED)),
        (Held(UNAVAILABLE, VALID_TOKEN), None),  # the held token still works
        (Held(UNAVAILABLE, EXPIRED), Failing(store=False)),
        (Held(UNAVAILABLE, None, store_failed=True), Failing(store=True)),
    ],
)
def test_readiness_problems(held: Held, found: Stop | None) -> None:
    assert problem(held, NOW) == found


@pytest.mark.parametrize(
    ("code", "stop"),
    [
        ("invalid_grant", Rejection(NEEDS_AUTHORIZE)),
        ("unsupported_grant_type", Rejection(NEEDS_AUTHORIZE)),
        ("invalid_client", Rejection(REJECTED)),
        ("unauthorized_client", Rejection(REJECTED)),
        ("temporarily_unavailable", Failing(store=False)),
        ("server_error", Failing(store=False)),
        ("", Failing(store=False)),
    ],
)
def test_what_a_token_endpoint_error_means(code: str, stop: Stop) -> None:
    assert on_endpoint_error(code) == stop


@pytest.mark.parametrize(
    ("held", "wake"),
    [
        (Held(VALID, VALID_TOKEN, refreshing=True), None),
        (Held(NEEDS_AUTHORIZE), AUTHORIZE_POLL),
        (Held(REJECTED), AUTHORIZE_POLL),
        (Held(PENDING), 0.0),
        (Held(VALID, token(expires_in=None)), None),
        (Held(VALID, VALID_TOKEN), 3600.0 - 60.0),  # leeway before expiry
        (Held(VALID, token(expires_in=100.0)), 50.0),  # at most half the lifetime
        (Held(VALID, token(expires_in=100.0, age=70.0)), 0.0),  # overdue
        (Held(VALID, token(expires_in=0.5)), MIN_REFRESH_GAP),  # never in a loop
    ],
)
def test_when_the_background_refresh_looks_again(held: Held, wake: float | None) -> None:
    assert next_wake(held, TIMING, NOW) == wake


def test_an_unavailable_endpoint_is_asked_again_with_capped_backoff() -> None:
    waits = [next_wake(Held(UNAVAILABLE, failures=n), TIMING, NOW) for n in range(1, 12)]
    assert all(w is not None and 0 < w <= TIMING.retry_max for w in waits)


@pytest.mark.parametrize(
    ("held", "now"),
    [
        (Held(PENDING), True),
        (Held(UNAVAILABLE, VALID_TOKEN), True),
        (Held(VALID, None), True),
        (Held(PENDING, refreshing=True), False),
        (Held(VALID, VALID_TOKEN), False),
        (Held(VALID, token(expires_in=None)), False),
        (Held(VALID, token(expires_in=100.0, age=50.0)), True),
        (Held(VALID, token(expires_in=1.0, age=0.9)), False),  # too soon after it came
    ],
)
def test_whether_to_refresh_now(held: Held, now: bool) -> None:
    assert refresh_now(held, TIMING, NOW) is now


@pytest.mark.parametrize(
    ("stored", "held", "failed", "adopt"),
    [
        (VALID_TOKEN, "other", None, True),
        (VALID_TOKEN, "a", None, False),  # the one we hold
        (VALID_TOKEN, "other", "Bearer a", False),  # the one that just failed
        (VALID_TOKEN, None, "Bearer other", True),
        (EXPIRED, None, None, False),
        (token(expires_in=100.0, age=60.0), None, None, False),  # due itself
        (token(expires_in=None), None, None, True),
    ],
)
def test_a_token_stored_elsewhere_is_adopted_only_when_fresh_and_not_ours(
    stored: StoredToken, held: str | None, failed: str | None, adopt: bool
) -> None:
    assert adoptable(stored, held, failed, TIMING.leeway, NOW) is adopt


@pytest.mark.parametrize(
    ("fetched", "failed", "renew"),
    [
        (None, "Bearer a", True),
        (token("b"), "Bearer a", True),  # not the one fetched here
        (token("a", age=5.0), "Bearer a", False),  # fetched here moments ago
        (token("a", expires_in=None, age=5.0), "Bearer a", False),
        (token("a", age=30.0), "Bearer a", True),
        # A short-lived token: the floor is at most half its lifetime (when it is due anyway).
        (token("a", expires_in=10.0, age=2.0), "Bearer a", False),
        (token("a", expires_in=10.0, age=6.0), "Bearer a", True),
        (token("a", expires_in=10.0, age=11.0), "Bearer a", True),  # expired by our clock too
    ],
)
def test_a_401_costs_a_token_request_unless_the_token_is_just_fetched(
    fetched: StoredToken | None, failed: str, renew: bool
) -> None:
    assert may_renew(fetched, failed, NOW, floor=30.0) is renew


@pytest.mark.parametrize(
    ("held", "send"),
    [
        (VALID_TOKEN, True),
        (token(expires_in=None), True),
        (EXPIRED, False),
        (StoredToken("", "r", None), False),
        # Never in its last moments (it could expire on the way): 1 s, or a tenth of its life.
        (token(age=3598.5), True),
        (token(age=3599.5), False),
        (token(expires_in=10.0, age=8.5), True),
        (token(expires_in=10.0, age=9.5), False),
        (token(expires_in=2.0, age=1.7), True),
        (token(expires_in=2.0, age=1.85), False),
        (StoredToken("a", "r", NOW + 1.5), True),  # no obtained_at: the whole margin
        (StoredToken("a", "r", NOW + 0.5), False),
    ],
)
def test_a_token_is_sent_only_with_time_left_for_the_trip(held: StoredToken, send: bool) -> None:
    assert sendable(held, NOW) is send


def test_an_answer_without_a_refresh_token_keeps_the_one_sent() -> None:
    assert issued("a", None, 5.0, "sent", NOW) == StoredToken("a", "sent", 5.0, obtained_at=NOW)
    assert issued("a", "new", None, "sent", NOW).refresh_token == "new"
