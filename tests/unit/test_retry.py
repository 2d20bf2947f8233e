"""Retries and the circuit breaker, on an injected clock."""

from __future__ import annotations

from dataclasses import replace

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.errors import (
    CircuitOpen,
    TokenUnavailable,
    UpstreamBodyError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.pipeline.metrics import PipelineMetrics
from proxy.pipeline.retry import Breaker, BreakerState, Retry
from proxy.settings import RetrySettings
from tests.unit.test_budget import FakeClock

Answer = int | Exception


class Scripted:
    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.sent = 0

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        self.sent += 1
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, Exception):
            raise answer
        return ProxyResponse(status=answer, headers=CIMultiDict(), body=b"{}")


def retry(upstream: Scripted, clock: FakeClock, **settings: object) -> Retry:
    options: dict[str, object] = {"attempts": 3, "breaker_failures": 0} | settings
    return Retry(
        upstream,
        RetrySettings(**options),  # type: ignore[arg-type]
        ["main"],
        PipelineMetrics(CollectorRegistry()),
        clock,
        jitter=lambda: 1.0,
    )


def request(clock: FakeClock, method: str = "GET", deadline: float = 30.0) -> ProxyRequest:
    return ProxyRequest(
        method=method,
        path="/v1/companies/5001/products.json",
        query="",
        headers=CIMultiDictProxy(CIMultiDict()),
        body=b"{}" if method in ("POST", "PUT", "PATCH") else None,
        account="main",
        deadline=clock.now() + deadline,
    )


@pytest.mark.parametrize(
    "failure",
    [UpstreamUnreachable("refused"), UpstreamTimeout("slow"), 502, 503, 504],
)
async def test_get_is_retried_with_growing_backoff(failure: Answer) -> None:
    clock = FakeClock()
    upstream = Scripted(failure, failure, 200)
    response = await retry(upstream, clock, backoff_initial=0.5).send(request(clock))
    assert response.status == 200
    assert upstream.sent == 3
    assert clock.now() == pytest.approx(1000.0 + 0.5 + 1.0)


@pytest.mark.parametrize("method", ["POST", "PATCH", "PUT", "DELETE"])
async def test_unsafe_methods_are_not_retried_by_default(method: str) -> None:
    clock = FakeClock()
    upstream = Scripted(UpstreamUnreachable("reset"))
    with pytest.raises(UpstreamUnreachable):
        await retry(upstream, clock).send(request(clock, method))
    assert upstream.sent == 1


async def test_put_is_retried_when_enabled() -> None:
    clock = FakeClock()
    upstream = Scripted(503, 200)
    layer = retry(upstream, clock, methods=("GET", "PUT"))
    assert (await layer.send(request(clock, "PUT"))).status == 200
    assert upstream.sent == 2


async def test_attempt_cap_returns_the_last_answer() -> None:
    clock = FakeClock()
    upstream = Scripted(503, 503, 503, 200)
    response = await retry(upstream, clock, attempts=3).send(request(clock))
    assert response.status == 503
    assert upstream.sent == 3


async def test_no_retry_that_would_pass_the_deadline() -> None:
    clock = FakeClock()
    upstream = Scripted(UpstreamTimeout("slow"), 200)
    with pytest.raises(UpstreamTimeout):
        await retry(upstream, clock, backoff_initial=5.0).send(request(clock, deadline=3.0))
    assert upstream.sent == 1
    assert clock.now() == 1000.0


async def test_other_statuses_and_errors_are_not_retried() -> None:
    clock = FakeClock()
    upstream = Scripted(500, TokenUnavailable("no token"))
    layer = retry(upstream, clock)
    assert (await layer.send(request(clock))).status == 500
    with pytest.raises(TokenUnavailable):
        await layer.send(request(clock))
    assert upstream.sent == 2


async def test_breaker_opens_fails_fast_then_probes_and_closes() -> None:
    clock = FakeClock()
    upstream = Scripted(*[UpstreamUnreachable("down")] * 3)
    layer = retry(upstream, clock, attempts=1, breaker_failures=3, breaker_cooldown=10.0)
    for _ in range(3):
        with pytest.raises(UpstreamUnreachable):
            await layer.send(request(clock))
    assert layer.breakers["main"].state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as e:
        await layer.send(request(clock))
    assert e.value.status == 503 and e.value.stale_ok and e.value.retry_after == 10
    assert upstream.sent == 3  # failing fast: nothing sent
    clock.t += 10
    assert (await layer.send(request(clock))).status == 200  # the probe
    assert layer.breakers["main"].state is BreakerState.CLOSED
    assert upstream.sent == 4


async def test_a_failed_probe_opens_the_breaker_again() -> None:
    clock = FakeClock()
    breaker = Breaker("main", failures=2, cooldown=5.0, clock=clock)
    breaker.failed()
    breaker.failed()
    clock.t += 5
    assert breaker.admit() is True  # the probe
    with pytest.raises(CircuitOpen):
        breaker.admit()  # only one probe at a time
    breaker.failed()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        breaker.admit()


async def test_an_abandoned_probe_lets_the_next_request_probe() -> None:
    clock = FakeClock()
    breaker = Breaker("main", failures=1, cooldown=1.0, clock=clock)
    breaker.failed()
    clock.t += 1
    assert breaker.admit() is True
    breaker.abandoned()
    assert breaker.admit() is True


ORDERS = "/v1/companies/5001/orders/7.json"


def on(clock: FakeClock, path: str) -> ProxyRequest:
    return replace(request(clock), path=path)


async def test_the_breaker_counts_requests_not_attempts() -> None:
    clock = FakeClock()
    upstream = Scripted(*[UpstreamUnreachable("refused")] * 6)
    layer = retry(upstream, clock, attempts=3, breaker_failures=2)
    with pytest.raises(UpstreamUnreachable):
        await layer.send(request(clock))  # three attempts, one failed request
    assert upstream.sent == 3
    assert (layer.breakers["main"].failures, layer.breakers["main"].state) == (
        1,
        BreakerState.CLOSED,
    )
    with pytest.raises(UpstreamUnreachable):
        await layer.send(request(clock))
    assert layer.breakers["main"].state is BreakerState.OPEN
    # Kounta cannot be reached: every path of the account fails fast now.
    with pytest.raises(CircuitOpen):
        await layer.send(on(clock, ORDERS))
    assert upstream.sent == 6


async def test_5xx_answers_open_only_their_routes_breaker() -> None:
    clock = FakeClock()
    upstream = Scripted(*[503] * 6)
    layer = retry(upstream, clock, attempts=3, breaker_failures=2, breaker_cooldown=10.0)
    for _ in range(2):
        assert (await layer.send(request(clock))).status == 503
    assert upstream.sent == 6
    assert layer.breakers["main"].state is BreakerState.CLOSED  # Kounta did answer
    route = "/v1/companies/{id}/products"
    assert layer.routes["main"][route].state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as e:
        await layer.send(on(clock, "/v1/companies/77/products"))  # the same route
    assert route in e.value.description
    assert (await layer.send(on(clock, ORDERS))).status == 200  # another route
    assert upstream.sent == 7
    samples = layer.metrics.breaker_routes_open.collect()[0].samples
    assert [(x.labels, x.value) for x in samples] == [({"account": "main"}, 1.0)]
    clock.t += 10
    assert (await layer.send(request(clock))).status == 200  # the route's probe
    assert layer.routes["main"] == {}  # a closed route breaker without failures is dropped


async def test_a_500_is_one_endpoints_error_not_a_failure() -> None:
    clock = FakeClock()
    upstream = Scripted(*[500] * 5)
    layer = retry(upstream, clock, breaker_failures=1)
    assert [(await layer.send(request(clock))).status for _ in range(5)] == [500] * 5
    assert layer.breakers["main"].failures == 0 and layer.routes["main"] == {}


async def test_a_broken_body_counts_for_the_route_only() -> None:
    clock = FakeClock()
    upstream = Scripted(UpstreamBodyError("cut"), UpstreamBodyError("cut"))
    layer = retry(upstream, clock, breaker_failures=2)
    for _ in range(2):
        with pytest.raises(UpstreamBodyError):
            await layer.send(request(clock))
    assert layer.breakers["main"].state is BreakerState.CLOSED
    assert layer.routes["main"]["/v1/companies/{id}/products"].state is BreakerState.OPEN


async def test_resends_stop_once_other_requests_opened_the_breaker() -> None:
    clock = FakeClock()

    class OpensTheBreaker(Scripted):
        async def send(self, request: ProxyRequest) -> ProxyResponse:
            layer.breakers["main"].failed()  # as if concurrent requests failed meanwhile
            return await super().send(request)

    upstream = OpensTheBreaker(503, 503, 503)
    layer = retry(upstream, clock, attempts=5, breaker_failures=1)
    assert (await layer.send(request(clock))).status == 503  # its own answer, not resent
    assert upstream.sent == 1


async def test_a_request_refused_by_its_route_leaves_the_accounts_probe_free() -> None:
    clock = FakeClock()
    upstream = Scripted(UpstreamUnreachable("down"))
    layer = retry(upstream, clock, attempts=1, breaker_failures=1, breaker_cooldown=5.0)
    with pytest.raises(UpstreamUnreachable):
        await layer.send(request(clock))  # the account's breaker opens (threshold 1)
    clock.t += 5
    orders = layer.route_breaker("main", "/v1/companies/{id}/orders/{id}")
    assert orders is not None
    orders.failed()  # this route's breaker opened just now
    layer.routes["main"][orders.route] = orders
    with pytest.raises(CircuitOpen):
        await layer.send(on(clock, ORDERS))  # the account's probe, refused by the route
    assert layer.breakers["main"].probing is False
    assert (await layer.send(request(clock))).status == 200  # so this one may probe
    assert layer.breakers["main"].state is BreakerState.CLOSED


async def test_tls_errors_count_for_the_breaker_but_are_not_retried() -> None:
    clock = FakeClock()
    upstream = Scripted(UpstreamError("tls"))
    layer = retry(upstream, clock, breaker_failures=5)
    with pytest.raises(UpstreamError):
        await layer.send(request(clock))
    assert upstream.sent == 1
    assert layer.breakers["main"].failures == 1


def openings(layer: Retry) -> float:
    samples = layer.metrics.breaker_opened.collect()[0].samples
    found = [
        s.value for s in samples if s.name.endswith("_total") and s.labels["account"] == "main"
    ]
    return found[0] if found else 0.0


async def test_an_outage_is_one_opening_however_many_probes_fail() -> None:
    """Failed probes are the same outage, not new openings; one request that
    opens the account's and its route's breakers is one opening."""
    clock = FakeClock()
    upstream = Scripted(*[UpstreamUnreachable("down")] * 20)
    layer = retry(upstream, clock, attempts=1, breaker_failures=2, breaker_cooldown=10.0)
    for _ in range(2):
        with pytest.raises(UpstreamUnreachable):
            await layer.send(request(clock))
    assert layer.breakers["main"].state is BreakerState.OPEN
    assert openings(layer) == 1
    for _ in range(5):  # five probes, each failing
        clock.t += 10
        with pytest.raises(UpstreamUnreachable):
            await layer.send(request(clock))
    assert openings(layer) == 1
    clock.t += 10
    upstream.answers = []
    assert (await layer.send(request(clock))).status == 200  # closed again
    upstream.answers = [UpstreamUnreachable("down")] * 2
    for _ in range(2):
        with pytest.raises(UpstreamUnreachable):
            await layer.send(request(clock))
    assert openings(layer) == 2  # a new outage after closing is a new opening


async def test_a_paths_breaker_key_is_worked_out_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A revalidated key's flights ask for one path over and over (issue 21): its route
    breaker's key is made the first time; a failure still counts on that route's breaker."""
    from proxy.pipeline import retry as retry_module

    calls: list[str] = []
    real = retry_module.breaker_key

    def counted(path: str) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(retry_module, "breaker_key", counted)
    clock = FakeClock()
    layer = retry(Scripted(200, 200, 503, 503, 503), clock, attempts=1)
    for _ in range(3):
        await layer.send(request(clock))
    other = replace(request(clock), path="/v1/companies/5001/customers/1.json")
    await layer.send(other)
    assert calls == ["/v1/companies/5001/products.json", "/v1/companies/5001/customers/1.json"]
    assert layer.routes["main"]["/v1/companies/{id}/customers/{id}"].failures == 1
