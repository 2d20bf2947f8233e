"""The rate budget on an injected clock: no real waiting anywhere in here."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.dates import whole_seconds
from proxy.errors import RateLimited
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.pipeline.account_budget import TURN_MARGIN
from proxy.pipeline.bucket import Bucket, Rate, rate_for
from proxy.pipeline.budget import AccountBudget, Budget
from proxy.pipeline.metrics import PipelineMetrics
from proxy.pipeline.pauses import capped, pause_asked
from proxy.settings import AccountSettings, BudgetSettings, ConfigError, Secret, Settings, load


class FakeClock:
    """Monotonic time that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


def account_budget(
    clock: FakeClock, per_window: int = 60, burst: int = 1, **settings: float
) -> AccountBudget:
    rate = Rate(per_window, burst, 60.0, 0.0)
    return AccountBudget(
        "main", rate, BudgetSettings(**settings), clock, PipelineMetrics(CollectorRegistry())
    )


# --- the bucket (pure) --------------------------------------------------------------------


def test_bucket_gives_the_burst_then_paces() -> None:
    bucket = Bucket(Rate(60, 3, 60.0, 0.0), now=0.0)
    for _ in range(3):
        assert bucket.ready_at(0.0) == 0.0
        bucket.take(0.0)
    assert bucket.ready_at(0.0) == pytest.approx(1.0)  # one token a second


def saturated(rate: Rate, seconds: float) -> list[float]:
    """The send times of a bucket that always has a request waiting, for ``seconds``."""
    bucket = Bucket(rate, now=0.0)
    sent: list[float] = []
    now = 0.0
    while now < seconds:
        now = bucket.ready_at(now)
        bucket.take(now)
        sent.append(now)
    return sent


def test_no_window_ever_holds_more_than_the_rate() -> None:
    """A plain bucket would allow burst + rate in the first window; this one never does."""
    sent = saturated(Rate(10, 10, 60.0, 1.0), 300)
    for i, t in enumerate(sent):
        in_window = [s for s in sent[i:] if s < t + 61.0]
        assert len(in_window) <= 10, (t, in_window)
    # ... and the long-run pace is still the rate.
    assert 45 <= len(sent) <= 52


def test_a_burst_is_paid_back_by_a_slower_pace_not_by_a_stall_a_window_later() -> None:
    """Under constant demand the burst's sends fill the window a window later; the old bucket
    then sent nothing for about ``burst`` pace intervals (every request waited through that
    stall: the interactive p99 of bench.fleet --batch); now the pace slows a little while
    the burst leaves the window, and no window holds more than the rate."""
    rate = Rate(180, 9, 60.0, 1.0)
    sent = saturated(rate, 200)
    pace = 1 / rate.per_second
    gaps = [b - a for a, b in itertools.pairwise(sent[9:])]
    assert max(gaps) < 1.5 * pace, max(gaps)
    for i, t in enumerate(sent):
        assert sum(1 for s in sent[i:] if s < t + 61.0) <= 180
    assert len(sent) >= 200 * rate.per_second  # the long-run pace is still the rate


def test_pause_uses_asked_time_else_a_growing_backoff() -> None:
    bucket = Bucket(Rate(60, 5, 60.0, 0.0), now=0.0)
    assert bucket.pause(0.0, 7.0, initial=5, longest=60) == 7.0
    assert bucket.ready_at(1.0) == pytest.approx(7.0)
    assert bucket.available(1.0) == 0.0
    assert bucket.pause(10.0, None, initial=5, longest=60) == 5.0
    assert bucket.pause(20.0, None, initial=5, longest=60) == 10.0
    assert bucket.pause(40.0, None, initial=5, longest=60) == 20.0
    bucket.recovered()
    assert bucket.pause(100.0, None, initial=5, longest=60) == 5.0


def test_retry_after_rounds_up_whole_seconds_but_not_float_noise() -> None:
    # At this clock reading (now + 100.0) - now is 100.00000000000023: a 100 s pause
    # once came out as "Retry-After: 101" (the flaky test_budget integration test).
    now = 1962.4018596534731
    bucket = Bucket(Rate(60, 5, 60.0, 0.0), now=now)
    pause = bucket.pause(now, 100.0, initial=5, longest=600)
    assert pause > 100.0
    assert whole_seconds(pause) == 100
    assert [whole_seconds(s) for s in (0.0, 0.0004, 1.0, 1.001, 99.5, -3.0)] == [0, 1, 1, 2, 100, 0]


def test_a_wave_of_429s_grows_the_backoff_once() -> None:
    bucket = Bucket(Rate(60, 5, 60.0, 0.0), now=0.0)
    assert bucket.pause(0.0, None, initial=5, longest=60) == 5.0
    assert bucket.pause(0.1, None, initial=5, longest=60) == pytest.approx(4.9)
    assert bucket.pause(6.0, None, initial=5, longest=60) == 10.0


def test_after_a_pause_the_pace_resumes_without_a_burst() -> None:
    bucket = Bucket(Rate(60, 10, 60.0, 0.0), now=0.0)
    bucket.pause(0.0, 5.0, initial=1, longest=60)
    start = bucket.ready_at(0.0)
    bucket.take(start)
    assert bucket.ready_at(start) == pytest.approx(start + 1.0)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "12"}, 12.0),
        (
            {
                "Retry-After": format_datetime(
                    datetime.fromtimestamp(1_700_000_030, UTC), usegmt=True
                )
            },
            30.0,
        ),
        ({"X-Ratelimit-Reset": "1700000045"}, 45.0),
        ({"X-Ratelimit-Reset": "20"}, 20.0),
        ({"Retry-After": "soon", "X-Ratelimit-Reset": "3"}, 3.0),
        ({"X-Ratelimit-Reset": "nan"}, None),
        ({"X-Ratelimit-Reset": "-5"}, None),
        ({"Retry-After": "\u00b2"}, None),  # not ASCII digits: ignored, never an exception
        ({"Retry-After": "\u0661\u0662", "X-Ratelimit-Reset": "4"}, 4.0),
        ({"Retry-After": "1e3"}, None),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": "999999999"}, 999999999.0),  # asked as sent; the cap comes later
        ({}, None),
    ],
)
def test_pause_asked(headers: dict[str, str], expected: float | None) -> None:
    got = pause_asked(headers, wall_now=1_700_000_000.0)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_a_thousand_digit_retry_after_is_infinite_not_an_error() -> None:
    assert pause_asked({"Retry-After": "9" * 1000}, wall_now=0.0) == math.inf
    assert capped(math.inf, 60.0) == (60.0, True)


@pytest.mark.parametrize(
    ("asked", "longest", "expected"),
    [
        (None, 60.0, (None, False)),
        (7.0, 60.0, (7.0, False)),
        (60.0, 60.0, (60.0, False)),
        (61.0, 60.0, (60.0, True)),
        (999999999.0, 60.0, (60.0, True)),
        (-3.0, 60.0, (-3.0, False)),  # a date in the past: Bucket.pause makes it 0
    ],
)
def test_capped(asked: float | None, longest: float, expected: tuple[float | None, bool]) -> None:
    assert capped(asked, longest) == expected


@pytest.mark.parametrize(
    ("retry_after_max", "backoff_max", "longest"),
    [(0.0, 60.0, 60.0), (0.0, 5.0, 5.0), (600.0, 60.0, 600.0), (2.0, 60.0, 2.0)],
)
def test_retry_after_max_defaults_to_backoff_max(
    retry_after_max: float, backoff_max: float, longest: float
) -> None:
    budget = BudgetSettings(
        backoff_initial=1.0, backoff_max=backoff_max, retry_after_max=retry_after_max
    )
    assert budget.longest_pause == longest


async def test_a_huge_retry_after_pauses_the_account_only_up_to_the_cap() -> None:
    clock = FakeClock()
    upstream = Scripted((429, {"Retry-After": "999999999"}), (200, {}))
    budget = layer(upstream, clock)  # backoff_max 60 (the default cap), max_wait 30
    with pytest.raises(RateLimited) as e:
        await budget.send(request(clock))
    assert e.value.retry_after == 60
    assert budget.accounts["main"].paused_for() == pytest.approx(60.0)


def test_default_rates_by_mode() -> None:
    budget = BudgetSettings()
    static = rate_for(AccountSettings(token=Secret("t")), budget)
    basic = rate_for(
        AccountSettings(mode="basic", client_id="c", client_secret=Secret("s")), budget
    )
    own = rate_for(AccountSettings(token=Secret("t"), rate_per_minute=30, burst=2), budget)
    assert (static.per_window, static.burst) == (180, 9)
    assert (basic.per_window, basic.burst) == (60, 3)
    assert (own.per_window, own.burst) == (30, 2)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[accounts.a]\ntoken = "t"\nrate_per_minute = -1\n', "accounts.a.rate_per_minute"),
        ('[accounts.a]\ntoken = "t"\nrate_per_minute = 10\nburst = 11\n', "accounts.a.burst"),
        ("[budget]\nmax_wait = -1\n", "budget.max_wait"),
        ("[budget]\nretry_after_max = -1\n", "budget.retry_after_max"),
        ("[budget]\nbackoff_initial = 10.0\nbackoff_max = 5.0\n", "budget.backoff_max"),
        ('[retry]\nmethods = ["GET", "POST"]\n', "retry.methods"),
        ('[retry]\nmethods = ["patch"]\n', "retry.methods"),
        ('[retry]\nmethods = ["BREW"]\n', "retry.methods"),
        ("[retry]\nattempts = 0\n", "retry.attempts"),
        ("[paging]\nmax_pages = 0\n", "paging.max_pages"),
    ],
)
def test_bad_budget_settings_are_config_errors(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load(path, env={})
    assert e.value.key == key


def test_post_retry_error_says_why(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[retry]\nmethods = ["GET", "POST"]\n')
    with pytest.raises(ConfigError, match="idempotency"):
        load(path, env={})


def test_put_and_delete_may_be_enabled_from_env() -> None:
    settings = load(None, env={"KOUNTA_PROXY_RETRY__METHODS": "GET,PUT,DELETE"})
    assert settings.retry.methods == ("GET", "PUT", "DELETE")


# --- the queue ----------------------------------------------------------------------------


async def test_a_token_at_hand_is_taken_without_waiting() -> None:
    clock = FakeClock()
    budget = account_budget(clock, burst=2)
    assert await budget.acquire("a", clock.now() + 5) == 0.0
    assert await budget.acquire("a", clock.now() + 5) == 0.0
    assert budget.available() == 0.0


async def test_waiters_are_served_round_robin_across_callers() -> None:
    clock = FakeClock()
    budget = account_budget(clock)
    order: list[str] = []

    async def one(caller: str) -> None:
        await budget.acquire(caller, clock.now() + 100)
        order.append(caller)

    busy = [asyncio.create_task(one("busy")) for _ in range(8)]
    await asyncio.sleep(0)
    light = [asyncio.create_task(one(name)) for name in ("light1", "light2")]
    await asyncio.gather(*busy, *light)
    # The busy caller queued 8 first; the two light callers still get the 3rd and 4th tokens.
    assert order[:4] == ["busy", "busy", "light1", "light2"]
    assert clock.now() == pytest.approx(1009.0)  # 10 tokens at one a second, 1 at hand


async def test_a_wait_past_the_limit_is_refused_at_once_with_retry_after() -> None:
    clock = FakeClock()
    budget = account_budget(clock)
    await budget.acquire("a", clock.now() + 10)
    started = clock.now()
    with pytest.raises(RateLimited) as e:
        await budget.acquire("a", clock.now() + 0.5)
    assert clock.now() == started  # refused without waiting: the next token is 1 s away
    assert e.value.retry_after == 1
    assert e.value.stale_ok


async def test_a_waiter_whose_limit_passes_in_the_queue_gets_429() -> None:
    clock = FakeClock()
    budget = account_budget(clock)
    await budget.acquire("a", clock.now() + 10)
    # Five waiters ahead at one a second: a request with a 2.5 s limit cannot be served.
    ahead = [asyncio.create_task(budget.acquire("a", clock.now() + 100)) for _ in range(5)]
    await asyncio.sleep(0)
    with pytest.raises(RateLimited):
        await budget.acquire("a", clock.now() + 2.5)
    await asyncio.gather(*ahead)
    assert budget.rejected == 1
    assert budget.waiting == 0


async def test_a_waiter_pushed_past_its_limit_by_a_newer_caller_hears_so_at_once() -> None:
    clock = FakeClock()
    budget = account_budget(clock)
    await budget.acquire("busy", clock.now() + 10)
    started = clock.now()
    # Turns at 1, 2 and 3 s: all within a 3.5 s limit when they queue.
    busy = [asyncio.create_task(budget.acquire("busy", started + 3.5)) for _ in range(3)]
    await asyncio.sleep(0)
    assert budget.rejected == 0
    # Round robin serves the newcomer second: busy's third turn moves to 4 s, past its limit,
    # and it hears so when the newcomer joins, not when its limit comes (3.5 s).
    late = asyncio.create_task(budget.acquire("late", started + 100))
    await asyncio.sleep(0)
    assert budget.rejected == 1
    assert clock.now() <= started + 1  # the fake clock moves only as tokens are waited for
    with pytest.raises(RateLimited):
        await busy[2]
    await asyncio.gather(late, *busy[:2])
    assert budget.waiting == 0


class LateClock(FakeClock):
    """A busy loop: every sleep ends ``late`` seconds after it was due."""

    def __init__(self, late: float) -> None:
        super().__init__()
        self.late = late

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + self.late)


async def test_a_waiter_whose_turn_drifts_toward_its_limit_is_served_not_refused() -> None:
    # Each wake-up 5 ms late moves the later turns (a bucket at its burst banks none of the
    # lateness): the sixth waiter, admitted 60 ms before its limit, comes within the admission
    # margin of it. It is served (before its limit), not refused after waiting nearly all of it.
    clock = LateClock(0.005)
    budget = account_budget(clock)
    await budget.acquire("a", clock.now() + 10)
    started = clock.now()
    ahead = [asyncio.create_task(budget.acquire("a", started + 100)) for _ in range(5)]
    await asyncio.sleep(0)
    turn = budget.gate.ready_after(started, 5)
    waited = await budget.acquire("a", turn + TURN_MARGIN + 0.01)
    assert budget.rejected == 0
    assert turn - started + TURN_MARGIN - 0.04 < waited < turn - started + TURN_MARGIN + 0.01
    await asyncio.gather(*ahead)


async def test_a_full_queue_refuses_new_waiters() -> None:
    clock = FakeClock()
    budget = account_budget(clock, queue_size=2)
    await budget.acquire("a", clock.now() + 10)
    ahead = [asyncio.create_task(budget.acquire("a", clock.now() + 100)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(RateLimited, match="Too many requests are waiting"):
        await budget.acquire("b", clock.now() + 100)
    await asyncio.gather(*ahead)


async def test_a_cancelled_waiter_gives_its_turn_to_the_next() -> None:
    clock = FakeClock()
    budget = account_budget(clock)
    await budget.acquire("a", clock.now() + 10)
    gone = asyncio.create_task(budget.acquire("a", clock.now() + 100))
    stays = asyncio.create_task(budget.acquire("b", clock.now() + 100))
    await asyncio.sleep(0)
    gone.cancel()
    await stays
    assert clock.now() == pytest.approx(1001.0)
    assert budget.waiting == 0


# --- the layer ----------------------------------------------------------------------------


class Scripted:
    """An upstream that answers from a list of statuses and counts what it was sent."""

    def __init__(self, *answers: tuple[int, dict[str, str]]) -> None:
        self.answers = list(answers)
        self.sent: list[str] = []

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        self.sent.append(request.method)
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        body = b"Limit exceeded" if status == 429 else b"[]"
        return ProxyResponse(status=status, headers=CIMultiDict(headers), body=body)


def layer(upstream: Scripted, clock: FakeClock) -> Budget:
    settings = Settings(
        accounts={"main": AccountSettings(token=Secret("t"), rate_per_minute=60, burst=1)},
        budget=BudgetSettings(backoff_initial=2.0, max_wait=30.0),
    )
    return Budget(upstream, settings, PipelineMetrics(CollectorRegistry()), clock, wall=lambda: 0.0)


def request(clock: FakeClock, method: str = "GET", deadline: float = 60.0) -> ProxyRequest:
    return ProxyRequest(
        method=method,
        path="/v1/companies/5001/products.json",
        query="",
        headers=CIMultiDictProxy(CIMultiDict()),
        account="main",
        deadline=clock.now() + deadline,
    )


async def test_upstream_429_pauses_then_get_is_sent_again() -> None:
    clock = FakeClock()
    upstream = Scripted((429, {"Retry-After": "7"}), (200, {}))
    budget = layer(upstream, clock)
    response = await budget.send(request(clock))
    assert response.status == 200
    assert upstream.sent == ["GET", "GET"]
    assert clock.now() == pytest.approx(1007.0)  # waited out Kounta's Retry-After
    assert budget.accounts["main"].upstream_429s == 1


async def test_upstream_429_for_a_post_is_answered_429_and_not_resent() -> None:
    clock = FakeClock()
    upstream = Scripted((429, {}))
    budget = layer(upstream, clock)
    with pytest.raises(RateLimited) as e:
        await budget.send(request(clock, "POST"))
    assert upstream.sent == ["POST"]
    assert e.value.retry_after == 2  # the first backoff step
    # The account is paused for everyone: the next request waits out the backoff.
    response = await budget.send(request(clock))
    assert response.status == 200
    assert clock.now() >= 1002.0


async def test_upstream_429_past_the_deadline_is_answered_429() -> None:
    clock = FakeClock()
    upstream = Scripted((429, {"Retry-After": "120"}))
    budget = layer(upstream, clock)
    with pytest.raises(RateLimited) as e:
        await budget.send(request(clock, deadline=60.0))
    assert e.value.retry_after == 60  # cut to budget.backoff_max, still past the wait
    assert upstream.sent == ["GET"]


def test_ready_after_counts_the_queue_ahead_by_pace_and_window() -> None:
    paced = Bucket(Rate(per_window=60, burst=2, window=60.0, margin=0.0), now=0.0)
    assert [paced.ready_after(0.0, ahead) for ahead in (0, 1, 2, 3)] == [0.0, 0.0, 1.0, 2.0]
    # A window of 3: the fourth send waits for the first to leave it, whatever the pace.
    capped = Bucket(Rate(per_window=3, burst=3, window=10.0, margin=0.5), now=0.0)
    assert capped.ready_after(0.0, 2) == 0.0
    assert capped.ready_after(0.0, 3) == 10.5
    capped.take(0.0)
    assert capped.ready_after(1.0, 2) == 10.5  # the one already sent leaves the window first
    capped.pause(1.0, 20.0, 1.0, 60.0)
    assert capped.ready_after(1.0, 0) == 21.0


def turn_by_taking(bucket: Bucket, now: float, ahead: int) -> float:
    """When the request behind ``ahead`` others actually gets its token: each takes one at
    the first moment ``ready_at`` allows (a copy of the bucket; the original untouched)."""
    copy = Bucket(bucket.rate, bucket.updated)
    copy.tokens, copy.sent = bucket.tokens, deque(bucket.sent)
    copy.paused_until = bucket.paused_until
    at = now
    for _ in range(ahead + 1):
        at = copy.ready_at(at)
        copy.take(at)
    return at


@pytest.mark.parametrize(
    ("rate", "sent_before"),
    [
        (Rate(90, 4, 6.0, 0.1), 0),  # a fresh bucket: the burst, then the spread pace
        (Rate(90, 4, 6.0, 0.1), 30),  # a window part spent at the pace
        (Rate(180, 9, 60.0, 1.0), 0),
        (Rate(180, 9, 60.0, 1.0), 120),
        (Rate(20, 1, 2.0, 0.1), 5),
    ],
)
def test_ready_after_never_promises_a_turn_earlier_than_the_takes_give_it(
    rate: Rate, sent_before: int
) -> None:
    """The 429-at-once decision trusts this estimate: a request told its turn fits within
    its wait must get it by then (else it waits its whole limit for a 429). The estimate
    follows the burst's payback by pace (``_spread``) for the requests ahead too, and is
    never more than one pace interval late."""
    bucket = Bucket(rate, now=0.0)
    now = 0.0
    for _ in range(sent_before):
        now = bucket.ready_at(now)
        bucket.take(now)
    pace = 1 / rate.per_second
    for ahead in range(0, 2 * rate.per_window, max(1, rate.per_window // 20)):
        estimate, actual = bucket.ready_after(now, ahead), turn_by_taking(bucket, now, ahead)
        assert actual - 1e-9 <= estimate <= actual + pace, (ahead, estimate, actual)
