"""OAuth credentials end to end: the proxy against the sandbox's authlib server, real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.auth.providers import OAuthProvider
from proxy.auth.token_file import StoredToken, TokenFile
from proxy.edge.services import SERVICES
from proxy.sandbox import SandboxConfig
from proxy.sandbox.oauth import SANDBOX_OAUTH, SandboxAuthServer
from proxy.settings import AccountSettings, Secret, ServerSettings
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings

SEED_REFRESH = "seed-refresh-token-0123456789"
ME = "/v1/companies/me.json"


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(
        rate_per_minute_bearer=100_000,
        rate_per_minute_basic=100_000,
        refresh_tokens=(SEED_REFRESH,),
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def oauth(sandbox: Sandbox) -> SandboxAuthServer:
    return sandbox.app[SANDBOX_OAUTH]


def account(sandbox: Sandbox, tmp_path: Path, **overrides: Any) -> AccountSettings:
    base = AccountSettings(
        mode="oauth",
        client_id="sandbox-client",
        client_secret=Secret("sandbox-secret"),
        token_url=f"{sandbox.url}/v1/token",
        refresh_token=Secret(SEED_REFRESH),
        token_path=str(tmp_path / "tokens" / "main.json"),
        rate_per_minute=100_000,
        burst=1000,
    )
    return dataclasses.replace(base, **overrides)


def settings_for(sandbox: Sandbox, tmp_path: Path, **overrides: Any) -> Any:
    return proxy_settings(
        sandbox.url, tmp_path, accounts={"main": account(sandbox, tmp_path, **overrides)}
    )


def provider(proxy: Proxy, name: str = "main") -> OAuthProvider:
    found = proxy.app[SERVICES].providers[name]
    assert isinstance(found, OAuthProvider)
    return found


def seed_file(
    sandbox: Sandbox, path: Path, *, access: str, server_expires: float, expires_at: float
) -> StoredToken:
    """A token file holding ``access`` (the sandbox accepts it until ``server_expires``)."""
    sandbox.state.add_bearer_token(access, server_expires)
    token = StoredToken(access, SEED_REFRESH, expires_at, obtained_at=expires_at - 3600)
    TokenFile(path).write(token)
    return token


def seed_dead_token(sandbox: Sandbox, path: Path) -> StoredToken:
    """A token file whose access token looks good for an hour but Kounta already refuses."""
    return seed_file(
        sandbox,
        path,
        access="dead-access",
        server_expires=time.time() - 5,
        expires_at=time.time() + 3600,
    )


async def get(client: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with client.get(url, **kw) as r:
        return r.status, await r.json(content_type=None)


async def test_first_request_gets_a_token_and_persists_it_0600(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(settings_for(sandbox, tmp_path))
    status, body = await get(client, p.url + ME)
    assert status == 200, body
    path = tmp_path / "tokens" / "main.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["access_token"] in oauth(sandbox).by_access
    assert stored["refresh_token"] == SEED_REFRESH  # no rotation: the old one is kept
    assert oauth(sandbox).token_requests == 1
    assert provider(p).state == "valid"


async def test_restart_reuses_a_valid_token_without_a_token_request(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    path = tmp_path / "tokens" / "main.json"
    seed_file(
        sandbox,
        path,
        access="stored-access",
        server_expires=time.time() + 3600,
        expires_at=time.time() + 3600,
    )
    p = await make_proxy(settings_for(sandbox, tmp_path))
    assert (await get(client, p.url + ME))[0] == 200
    assert oauth(sandbox).token_requests == 0


async def fire(client: aiohttp.ClientSession, url: str, n: int) -> tuple[list[int], float]:
    """n concurrent GETs of distinct products (distinct URLs: no cache collapsing)."""

    async def one(i: int) -> int:
        async with client.get(f"{url}/v1/companies/5001/products.json?start={i}") as r:
            await r.read()
            return r.status

    started = time.perf_counter()
    statuses = await asyncio.gather(*(one(i) for i in range(n)))
    return list(statuses), time.perf_counter() - started


@pytest.mark.parametrize("who_knows", ["proxy_clock", "upstream_401"])
async def test_200_concurrent_requests_on_a_just_expired_token_make_one_token_request(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, who_knows: str
) -> None:
    """proxy_clock: the proxy's clock says the token expired; upstream_401: Kounta says so."""
    clock = FakeClock()
    path = tmp_path / "tokens" / "main.json"
    now = time.time()
    server_expires = now + 3600 if who_knows == "proxy_clock" else now - 1
    seed_file(
        sandbox, path, access="old-access", server_expires=server_expires, expires_at=now + 3600
    )
    settings = settings_for(sandbox, tmp_path)
    # A connection for each request: on a loaded machine the second hundred could otherwise
    # wait past the tests' 2 s connect_timeout for a pool slot (503 upstream_busy), which is
    # not what this test is about.
    upstream = dataclasses.replace(settings.upstream, pool_size=200)
    p = await make_proxy(dataclasses.replace(settings, upstream=upstream), clock=clock)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        warm, _ = await fire(client, p.url, 1)  # opens the pool; with upstream_401 it refreshes
        if who_knows == "upstream_401":
            assert warm == [200] and oauth(sandbox).token_requests == 1
            sandbox.state.add_bearer_token(provider(p)._token.access_token, time.time() - 1)  # type: ignore[union-attr]
            oauth(sandbox).counters.token_requests = 0
            clock.now += 31  # past auth.refresh_floor: Kounta's 401 may cost a refresh
        if who_knows == "proxy_clock":
            clock.now += 3601  # the token expires exactly now, as far as the proxy knows
        statuses, elapsed = await fire(client, p.url, 200)
    assert statuses == [200] * 200
    assert oauth(sandbox).token_requests == 1
    print(f"\n200 concurrent ({who_knows}): 1 token request, all answered in {elapsed:.3f}s")


async def test_waiting_time_of_a_caller_whose_token_just_expired(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """Measures one caller's wait when the token expired just before its request (the
    refresh happens inline), against the steady state (token valid)."""
    clock = FakeClock()
    path = tmp_path / "tokens" / "main.json"
    now = time.time()
    seed_file(sandbox, path, access="old-access", server_expires=now + 3600, expires_at=now + 3600)
    p = await make_proxy(settings_for(sandbox, tmp_path), clock=clock)
    url = f"{p.url}/v1/companies/5001/products.json?start="

    async def timed(i: int) -> float:
        started = time.perf_counter()
        async with client.get(f"{url}{i}") as r:
            assert r.status == 200
            await r.read()
        return time.perf_counter() - started

    await timed(0)  # opens the connections
    steady, expired = [], []
    for i in range(1, 21):
        steady.append(await timed(2 * i))
        clock.now += 3601
        expired.append(await timed(2 * i + 1))
    steady.sort()
    expired.sort()
    print(
        f"\nsteady: median {steady[10] * 1000:.2f} ms; just expired: median "
        f"{expired[10] * 1000:.2f} ms, max {expired[-1] * 1000:.2f} ms (20 expiries)"
    )
    assert oauth(sandbox).token_requests == 20
    assert expired[10] < 0.5


async def test_post_on_expired_token_is_refreshed_once_and_resent_once(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    path = tmp_path / "tokens" / "main.json"
    seed_dead_token(sandbox, path)
    p = await make_proxy(settings_for(sandbox, tmp_path))
    orders = "/v1/companies/5001/customers.json"
    async with client.post(p.url + orders, json={"first_name": "A", "last_name": "B"}) as r:
        assert r.status == 201, await r.text()
    assert sandbox.state.served("POST", orders) == 2  # the 401, then the resend
    assert oauth(sandbox).token_requests == 1
    assert json.loads(path.read_text())["access_token"] != "dead-access"


async def test_body_over_the_replay_cap_is_not_resent_and_the_401_is_normalised(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    path = tmp_path / "tokens" / "main.json"
    seed_dead_token(sandbox, path)
    settings = settings_for(sandbox, tmp_path)
    settings = dataclasses.replace(
        settings, server=ServerSettings(host="127.0.0.1", port=0, replay_body_size=16)
    )
    p = await make_proxy(settings)
    customers = "/v1/companies/5001/customers.json"
    body = json.dumps({"first_name": "A" * 100, "last_name": "B"}).encode()
    async with client.post(
        p.url + customers, data=body, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 401
        answer = await r.json()
        assert r.headers["Content-Type"].startswith("application/json")
    assert answer["error"] == "invalid_token"
    assert "expired" in answer["error_description"]
    assert sandbox.state.served("POST", customers) == 1  # never resent
    # The refresh was started anyway, so the next request works.
    assert (await get(client, p.url + ME))[0] == 200
    assert oauth(sandbox).token_requests == 1


async def test_a_401_after_the_refresh_goes_back_and_never_loops(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    # No floor: the token fetched a moment ago may be refreshed again on a 401.
    p = await make_proxy(settings_for(sandbox, tmp_path, refresh_floor=0.0))
    assert (await get(client, p.url + ME))[0] == 200
    expired = json.dumps(
        {"error": "invalid_token", "error_description": "The access token provided has expired"}
    )
    sandbox.state.inject_status(
        401, expired.encode(), "application/json", count=None, path_prefix="/v1/companies"
    )
    before = sandbox.state.served("GET", ME)
    status, body = await get(client, p.url + ME)
    assert status == 401 and body["error"] == "invalid_token"
    assert sandbox.state.served("GET", ME) - before == 2  # one send, one resend, no more
    assert oauth(sandbox).token_requests == 2  # the first token, one refresh


def expire_everything(sandbox: Sandbox) -> None:
    expired = json.dumps(
        {"error": "invalid_token", "error_description": "The access token provided has expired"}
    )
    sandbox.state.inject_status(
        401, expired.encode(), "application/json", count=None, path_prefix="/v1/companies"
    )


async def test_a_young_token_is_not_refreshed_again_on_401_expired(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """An endpoint that always says "expired" used to cost one token request per call."""
    p = await make_proxy(settings_for(sandbox, tmp_path))  # auth.refresh_floor: 30 s
    assert (await get(client, p.url + ME))[0] == 200
    expire_everything(sandbox)
    before = sandbox.state.served("GET", ME)
    for _ in range(5):
        status, body = await get(client, p.url + ME, headers={"Cache-Control": "no-cache"})
        assert (status, body["error"]) == (401, "invalid_token")
        assert "expired" in body["error_description"]
    assert sandbox.state.served("GET", ME) - before == 5  # sent once each, never resent
    assert oauth(sandbox).token_requests == 1  # the first token only
    floored = p.registry.get_sample_value(
        "kounta_proxy_auth_resends_total", {"account": "main", "outcome": "refresh_floor"}
    )
    assert floored == 5


async def test_past_the_floor_one_refresh_and_one_resend(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(settings_for(sandbox, tmp_path, refresh_floor=0.3))  # per account
    assert (await get(client, p.url + ME))[0] == 200
    expire_everything(sandbox)
    assert (await get(client, p.url + ME))[0] == 401
    assert oauth(sandbox).token_requests == 1
    await asyncio.sleep(0.35)
    before = sandbox.state.served("GET", ME)
    assert (await get(client, p.url + ME))[0] == 401
    assert sandbox.state.served("GET", ME) - before == 2  # refreshed, resent once
    assert oauth(sandbox).token_requests == 2
    assert (await get(client, p.url + ME))[0] == 401  # the new token is young again
    assert oauth(sandbox).token_requests == 2


async def test_token_endpoint_down_gives_503_fast_and_recovers_in_the_background(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    sandbox.state.inject_status(503, b"down", count=None, path_prefix="/v1/token")
    p = await make_proxy(settings_for(sandbox, tmp_path))
    started = time.perf_counter()
    status, body = await get(client, p.url + ME)
    first = time.perf_counter() - started
    assert status == 503 and body["error"] == "temporarily_unavailable", body
    assert first < 1.0
    started = time.perf_counter()
    for _ in range(5):  # while the background retry waits, callers do not hammer the endpoint
        assert (await get(client, p.url + ME))[0] == 503
    assert time.perf_counter() - started < 1.0
    assert p.app[SERVICES].checks["token:main"]() is not None
    sandbox.state.clear_faults()
    for _ in range(100):
        if provider(p).state == "valid":
            break
        await asyncio.sleep(0.05)
    assert provider(p).state == "valid"
    assert (await get(client, p.url + ME))[0] == 200
    assert p.app[SERVICES].checks["token:main"]() is None


async def test_slow_token_endpoint_gives_503_within_token_wait(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    sandbox.state.inject_latency(0.8, count=1, path_prefix="/v1/token")
    p = await make_proxy(settings_for(sandbox, tmp_path, token_wait=0.3))
    started = time.perf_counter()
    status, body = await get(client, p.url + ME)
    elapsed = time.perf_counter() - started
    assert status == 503 and body["error"] == "temporarily_unavailable"
    assert 0.25 < elapsed < 1.0
    assert "slow" in body["error_description"]


async def test_invalid_grant_gives_502_with_the_authorize_hint_and_readiness_false(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    oauth(sandbox).revoke_all_refresh_tokens()
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    p = await make_proxy(settings_for(sandbox, tmp_path))
    for _ in range(5):
        async with client.get(p.url + ME) as r:
            assert r.status == 502
            assert r.headers["X-Proxy-Error"] == "1"
            body = await r.json()
    assert body["error"] == "invalid_grant"
    assert "kounta-proxy authorize" in body["error_description"]
    assert oauth(sandbox).token_requests == 1  # not one per request
    problem = p.app[SERVICES].checks["token:main"]()
    assert problem is not None and "authorize" in problem
    states = [r for r in caplog.records if r.getMessage() == "token_state"]
    assert [r.fields["state"] for r in states] == ["pending", "needs_authorize"]  # type: ignore[attr-defined]
    text = p.registry.get_sample_value(
        "kounta_proxy_token_state", {"account": "main", "state": "needs_authorize"}
    )
    assert text == 1.0
    # `kounta-proxy authorize` writes a new file: the running proxy takes it up by itself.
    oauth(sandbox).seed_refresh_token("fresh-refresh-token-abcdef")
    TokenFile(tmp_path / "tokens" / "main.json").write(
        StoredToken("", "fresh-refresh-token-abcdef", None)
    )
    os.utime(tmp_path / "tokens" / "main.json", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert (await get(client, p.url + ME))[0] == 200
    assert p.app[SERVICES].checks["token:main"]() is None


@pytest.mark.parametrize("rotate", [True, False])
async def test_refresh_token_rotation_on_and_off(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    rotate: bool,
) -> None:
    oauth(sandbox).rotate = rotate
    clock = FakeClock()
    p = await make_proxy(settings_for(sandbox, tmp_path), clock=clock)
    path = tmp_path / "tokens" / "main.json"
    for round_ in range(3):
        assert (await get(client, f"{p.url}/v1/companies/5001/products.json?start={round_}"))[
            0
        ] == 200
        clock.now += 3601
    stored = json.loads(path.read_text())
    assert oauth(sandbox).token_requests == 3
    if rotate:
        assert stored["refresh_token"] != SEED_REFRESH
        assert oauth(sandbox).by_refresh[SEED_REFRESH].revoked
    else:
        assert stored["refresh_token"] == SEED_REFRESH


async def test_two_proxies_sharing_one_token_file_refresh_once(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path
) -> None:
    oauth(sandbox).rotate = True  # a double refresh would now break one of them
    clock = FakeClock()
    path = tmp_path / "tokens" / "main.json"
    seed_file(
        sandbox,
        path,
        access="old-access",
        server_expires=time.time() + 3600,
        expires_at=time.time() + 3600,
    )
    settings = settings_for(sandbox, tmp_path)
    a = await make_proxy(settings, clock=clock)
    b = await make_proxy(dataclasses.replace(settings, state_dir=str(tmp_path / "b")), clock=clock)
    clock.now += 3601
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        results = await asyncio.gather(fire(client, a.url, 50), fire(client, b.url, 50))
    assert all(s == [200] * 50 for s, _ in results)
    assert oauth(sandbox).token_requests == 1
    assert provider(a)._token == provider(b)._token
    assert json.loads(path.read_text())["access_token"] == provider(a)._token.access_token  # type: ignore[union-attr]


async def test_background_refresh_happens_before_expiry(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    oauth(sandbox).lifetime = 2  # leeway = min(300, half of 2s) = 1s
    p = await make_proxy(settings_for(sandbox, tmp_path))
    assert (await get(client, p.url + ME))[0] == 200
    first = provider(p)._token
    # The provider's own token, not the sandbox's count: the sandbox counts a token request
    # when it arrives, before its answer reaches the provider (a race under load).
    for _ in range(60):
        if provider(p)._token != first:
            break
        await asyncio.sleep(0.05)
    renewed_at = time.time()
    assert provider(p)._token != first
    assert oauth(sandbox).token_requests == 2  # without any request asking
    assert first is not None and first.expires_at is not None
    assert renewed_at < first.expires_at  # before the old one expired


async def test_client_secret_basic_is_used_when_selected(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(settings_for(sandbox, tmp_path, token_auth="client_secret_basic"))
    assert (await get(client, p.url + ME))[0] == 200
    bad = settings_for(
        sandbox,
        tmp_path / "bad",
        token_auth="client_secret_basic",
        client_secret=Secret("wrong-secret"),
    )
    q = await make_proxy(bad)
    status, body = await get(client, q.url + ME)
    assert status == 502 and body["error"] == "invalid_client"
    assert "client_secret" in body["error_description"]


async def test_client_credentials_grant_needs_no_refresh_token(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    settings = settings_for(sandbox, tmp_path, grant="client_credentials", refresh_token=Secret(""))
    p = await make_proxy(settings, clock=clock)
    assert (await get(client, p.url + ME))[0] == 200
    clock.now += 3601
    assert (await get(client, p.url + "/v1/companies/5001.json"))[0] == 200
    assert oauth(sandbox).counters.grants == {"client_credentials": 2}
    assert json.loads((tmp_path / "tokens" / "main.json").read_text())["refresh_token"] == ""
