"""Table tests of the pure stale-while-busy decision (proxy.cache.lookup.stale_while_busy):
stored response, caller's Cache-Control, staleness and expected wait: an answer or a reason."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.cache.entry import Entry
from proxy.cache.fields import RequestControl, request_control
from proxy.cache.lookup import BusyStale, stale_while_busy
from proxy.cache.storable import to_entry

NOW = 1_700_000_000.0
WINDOW = 60.0
BUSY_AFTER = 0.25


def stored(cache_control: str = "max-age=10") -> Entry:
    entry = to_entry(
        account="main",
        path="/v1/companies/5/products/7.json",
        request_headers={},
        request_control=RequestControl(),
        status=200,
        headers=[("ETag", '"a"'), ("Cache-Control", cache_control)],
        size=2,
        whole=True,
        max_size=100,
        request_time=NOW,
        response_time=NOW,
        rules=(),
    )
    assert isinstance(entry, Entry)
    return entry


def caller(cache_control: str = "", pragma: str = "") -> RequestControl:
    return request_control([cache_control] if cache_control else [], [pragma] if pragma else [])


def decide(
    entry: Entry,
    control: RequestControl,
    stale_for: float,
    wait: float,
    window: float = WINDOW,
) -> BusyStale | str:
    asked: list[float] = []

    def expected() -> float:
        asked.append(wait)
        return wait

    now = NOW + entry.fresh_for + stale_for
    decision = stale_while_busy(
        entry, control, now, window=window, wait=expected, busy_after=BUSY_AFTER
    )
    if not isinstance(decision, BusyStale):
        # The wait is an estimate with a cost: asked only when all else allows.
        assert asked == ([wait] if decision == "not_busy" else [])
    return decision


@pytest.mark.parametrize(
    ("response", "request_cc", "stale_for", "wait", "window", "expected"),
    [
        # answered at once: stale within the window, the token further off than busy_after
        ("max-age=10", "", 5.0, 2.0, WINDOW, "busy"),
        ("max-age=10", "", 60.0, 0.26, WINDOW, "busy"),  # at the window's edge
        ("max-age=10, private", "", 1.0, 9.0, WINDOW, "busy"),
        ("max-age=10", "max-stale=30", 31.0, 9.0, WINDOW, "max_stale"),  # caller bounds it
        ("max-age=10", "max-stale=30", 29.0, 9.0, WINDOW, "busy"),  # (lookup serves it first)
        ("max-age=10", "max-stale=0", 0.5, 9.0, WINDOW, "max_stale"),  # the opt-out
        ("max-age=10", "max-stale", 59.0, 9.0, WINDOW, "busy"),  # bare: the proxy's bound
        ("max-age=10", "max-stale", 61.0, 9.0, WINDOW, "too_stale"),
        # not busy: the caller's turn comes soon enough
        ("max-age=10", "", 5.0, 0.25, WINDOW, "not_busy"),
        ("max-age=10", "", 5.0, 0.0, WINDOW, "not_busy"),
        # off, fresh, too stale
        ("max-age=10", "", 5.0, 9.0, 0.0, "off"),
        ("max-age=10", "", -1.0, 9.0, WINDOW, "fresh"),
        ("max-age=10", "", 0.0, 9.0, WINDOW, "fresh"),
        ("max-age=10", "", 60.5, 9.0, WINDOW, "too_stale"),
        ("max-age=10", "", 20.0, 9.0, 15.0, "too_stale"),  # a rule's shorter window
        # the stored response forbids serving stale
        ("max-age=10, must-revalidate", "", 5.0, 9.0, WINDOW, "strict"),
        ("max-age=10, proxy-revalidate", "", 5.0, 9.0, WINDOW, "strict"),
        ("max-age=10, s-maxage=10", "", 5.0, 9.0, WINDOW, "strict"),
        ("no-cache", "", 5.0, 9.0, WINDOW, "strict"),
        # the caller asks for validation or freshness
        ("max-age=10", "no-cache", 5.0, 9.0, WINDOW, "no_cache"),
        ("max-age=10", "max-age=0", 5.0, 9.0, WINDOW, "no_cache"),
        ("max-age=10", "max-age=600", 5.0, 9.0, WINDOW, "max_age"),
        ("max-age=10", "min-fresh=1", 5.0, 9.0, WINDOW, "min_fresh"),
    ],
)
def test_stale_while_busy(
    response: str, request_cc: str, stale_for: float, wait: float, window: float, expected: str
) -> None:
    entry = stored(response)
    decision = decide(entry, caller(request_cc), stale_for, wait, window)
    if expected == "busy":
        assert isinstance(decision, BusyStale)
        assert decision.entry is entry
        assert decision.age == pytest.approx(entry.fresh_for + stale_for)
    else:
        assert decision == expected


def test_a_callers_pragma_no_cache_is_no_cache() -> None:
    assert decide(stored(), caller(pragma="no-cache"), 5.0, 9.0) == "no_cache"


def test_the_age_counts_what_the_upstream_said() -> None:
    """An entry that came with Age: 8 and max-age=10 is 3 s stale 5 s later."""
    entry = replace(stored(), initial_age=8.0)
    decision = stale_while_busy(
        entry, caller(), NOW + 5.0, window=2.0, wait=lambda: 9.0, busy_after=BUSY_AFTER
    )
    assert decision == "too_stale"
    decision = stale_while_busy(
        entry, caller(), NOW + 5.0, window=3.5, wait=lambda: 9.0, busy_after=BUSY_AFTER
    )
    assert isinstance(decision, BusyStale) and decision.age == pytest.approx(13.0)
