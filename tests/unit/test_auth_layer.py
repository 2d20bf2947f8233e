"""The auth layer alone: a provider of our own and a scripted layer below it."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.auth.layer import Authenticator
from proxy.auth.metrics import AuthMetrics
from proxy.auth.providers import TokenState
from proxy.errors import TokenUnavailable
from proxy.messages import ProxyRequest, ProxyResponse

EXPIRED = b'{"error": "invalid_token", "error_description": "The access token has expired"}'


@dataclass
class Provider:
    """Hands out Bearer t1, t2, ... : each renewal a new one."""

    account: str = "main"
    renewable: bool = True
    young: bool = False  # the token is under the refresh floor
    issued: int = 1
    renewals: list[str] = field(default_factory=list)
    invalidated: list[str] = field(default_factory=list)

    @property
    def state(self) -> TokenState:
        return TokenState.VALID

    @property
    def expires_at(self) -> float | None:
        return None

    async def authorization(self, deadline: float = float("inf")) -> str:
        return f"Bearer t{self.issued}"

    async def renew(self, failed: str, deadline: float = float("inf")) -> str:
        self.renewals.append(failed)
        self.issued += 1
        return f"Bearer t{self.issued}"

    def may_renew(self, failed: str) -> bool:
        return not self.young

    def invalidate(self, failed: str) -> None:
        self.invalidated.append(failed)

    def problem(self) -> str | None:
        return None

    def secrets(self) -> tuple[str, ...]:
        return ()

    async def start(self, session: aiohttp.ClientSession) -> None:
        pass

    async def stop(self) -> None:
        pass


@dataclass
class Scripted:
    """Answers (status, body) in turn and records the Authorization each request carried."""

    answers: list[tuple[int, bytes]]
    seen: list[str] = field(default_factory=list)

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        self.seen.append(request.headers["Authorization"])
        status, body = self.answers.pop(0)
        return ProxyResponse(status, CIMultiDict(), body=body, upstream_seconds=0.25)


def request(body: object = None, account: str = "main") -> ProxyRequest:
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": "Bearer callers-own"}))
    return ProxyRequest("GET", "/v1/companies/me.json", "", headers, body=body, account=account)  # type: ignore[arg-type]


def layer(inner: Scripted, provider: Provider) -> tuple[Authenticator, CollectorRegistry]:
    registry = CollectorRegistry()
    return Authenticator(inner, {"main": provider}, AuthMetrics(registry)), registry


def resends(registry: CollectorRegistry, outcome: str) -> float | None:
    return registry.get_sample_value(
        "kounta_proxy_auth_resends_total", {"account": "main", "outcome": outcome}
    )


async def test_the_accounts_token_replaces_the_callers() -> None:
    inner = Scripted([(200, b"{}")])
    auth, _ = layer(inner, Provider())
    assert (await auth.send(request())).status == 200
    assert inner.seen == ["Bearer t1"]


async def test_an_expired_token_is_renewed_once_and_the_request_resent_once() -> None:
    inner = Scripted([(401, EXPIRED), (200, b"{}")])
    provider = Provider()
    auth, metrics = layer(inner, provider)
    answer = await auth.send(request())
    assert answer.status == 200
    assert inner.seen == ["Bearer t1", "Bearer t2"]
    assert provider.renewals == ["Bearer t1"]
    assert answer.upstream_seconds == 0.5  # both attempts' waits
    assert resends(metrics, "resent") == 1


async def test_a_second_401_goes_back_to_the_caller_without_a_loop() -> None:
    inner = Scripted([(401, EXPIRED), (401, EXPIRED)])
    provider = Provider()
    auth, _ = layer(inner, provider)
    assert (await auth.send(request())).status == 401
    assert len(inner.seen) == 2
    assert len(provider.renewals) == 1


@pytest.mark.parametrize("body", [b'{"error": "forbidden_scope"}', b"Not allowed", b"[]"])
async def test_other_401s_are_answered_as_they_are(body: bytes) -> None:
    inner = Scripted([(401, body)])
    provider = Provider()
    auth, _ = layer(inner, provider)
    answer = await auth.send(request())
    assert (answer.status, await answer.read()) == (401, body)
    assert provider.renewals == []


async def test_a_streamed_body_is_not_resent_but_the_token_is_dropped() -> None:
    async def stream():  # type: ignore[no-untyped-def]
        yield b"{}"

    inner = Scripted([(401, EXPIRED)])
    provider = Provider()
    auth, metrics = layer(inner, provider)
    assert (await auth.send(request(body=stream()))).status == 401
    assert provider.invalidated == ["Bearer t1"]
    assert provider.renewals == []
    assert resends(metrics, "not_replayable") == 1


async def test_a_fixed_credential_is_never_renewed() -> None:
    inner = Scripted([(401, EXPIRED)])
    provider = Provider(renewable=False)
    auth, _ = layer(inner, provider)
    assert (await auth.send(request())).status == 401
    assert provider.renewals == []


async def test_an_account_without_credentials_is_refused_before_sending() -> None:
    inner = Scripted([])
    auth, _ = layer(inner, Provider())
    with pytest.raises(TokenUnavailable, match="'other'"):
        await auth.send(request(account="other"))
    assert inner.seen == []


async def test_a_token_under_the_refresh_floor_is_not_renewed() -> None:
    inner = Scripted([(401, EXPIRED)])
    provider = Provider(young=True)
    auth, metrics = layer(inner, provider)
    assert (await auth.send(request())).status == 401
    assert provider.renewals == []
    assert resends(metrics, "refresh_floor") == 1


@dataclass
class Queued(Scripted):
    """Like the upstream layer below the budget: asks for the Authorization header only
    when it sends, after a wait during which the account's token was refreshed."""

    provider: Provider | None = None

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        if self.provider is not None:
            self.provider.issued += 1  # the background refresh, while the request waited
        assert request.authorize is not None
        return await super().send(request.with_headers(Authorization=await request.authorize(0)))


async def test_the_token_is_taken_when_the_request_is_sent_not_before_the_budgets_wait() -> None:
    provider = Provider()
    inner = Queued([(401, EXPIRED), (200, b"{}")], provider=provider)
    auth, _ = layer(inner, provider)
    answer = await auth.send(request())
    assert answer.status == 200
    # Sent with the token of the moment (t2, not t1 from before the wait); the 401 names t2.
    assert inner.seen == ["Bearer t2", "Bearer t4"]
    assert provider.renewals == ["Bearer t2"]


async def test_a_fixed_credential_is_not_asked_again_when_sent() -> None:
    inner = Scripted([(200, b"{}")])
    auth, _ = layer(inner, Provider(renewable=False))
    await auth.send(request())
    assert inner.seen == ["Bearer t1"]
