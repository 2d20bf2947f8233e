"""Feed health (proxy.cache.webhooks.health): the pure decision, and the per-account state."""

from __future__ import annotations

import pytest

from proxy.cache.invalidation import Invalidation
from proxy.cache.webhooks.health import Feeds, FeedState, Health, decide


@pytest.mark.parametrize(
    ("state", "now", "health"),
    [
        (FeedState(), 1000.0, Health(True, "ok")),
        (FeedState(enabled=False), 1000.0, Health(False, "disabled")),
        (FeedState(distrusted_until=1600.0), 1000.0, Health(False, "missed")),
        (FeedState(distrusted_until=1600.0), 1599.9, Health(False, "missed")),
        (FeedState(distrusted_until=1600.0), 1600.0, Health(True, "ok")),
        (FeedState(enabled=False, distrusted_until=1600.0), 2000.0, Health(False, "disabled")),
        (FeedState(registered=False), 1000.0, Health(False, "unregistered")),
        (FeedState(registered=True), 1000.0, Health(True, "ok")),
        (FeedState(registered=None), 1000.0, Health(True, "ok")),
        (FeedState(registered=True, distrusted_until=1600.0), 1000.0, Health(False, "missed")),
        (FeedState(enabled=False, registered=False), 1000.0, Health(False, "disabled")),
    ],
)
def test_decide(state: FeedState, now: float, health: Health) -> None:
    assert decide(state, now) == health


def test_feeds_distrust_and_recover() -> None:
    now = [1000.0]
    feeds = Feeds(("a", "b"), enabled=True, now=lambda: now[0])
    assert feeds.healthy("a") and not feeds.healthy("nobody")
    assert feeds.distrust("a", 600) is True
    assert feeds.distrust("a", 10) is False  # already distrusted; the longer one holds
    now[0] = 1599.0
    assert not feeds.healthy("a") and feeds.healthy("b")
    now[0] = 1600.0
    assert feeds.healthy("a")


def test_a_registration_check_changes_the_state_only_when_it_finds_otherwise() -> None:
    feeds = Feeds(("a",), enabled=True)
    assert feeds.registered("a", False) is True and not feeds.healthy("a")
    assert feeds.registered("a", False) is False
    assert feeds.registered("a", True) is True and feeds.healthy("a")
    assert feeds.registered("nobody", True) is False


def test_announced_since() -> None:
    now = [10.0]
    feeds = Feeds(("a",), enabled=True, now=lambda: now[0])
    feeds.delivered("a", Invalidation("a", frozenset({"/v1/companies/me/products/1"})))
    assert feeds.announced_since("a", 5.0, "/v1/companies/me/products/1.json")
    assert not feeds.announced_since("a", 11.0, "/v1/companies/me/products/1")
    assert not feeds.announced_since("a", 5.0, "/v1/companies/me/products/2")
