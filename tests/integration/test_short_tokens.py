"""Short-lived access tokens under a busy budget: Kounta never sees an expired token.

The sandbox issues tokens that live 2 s and rotates refresh tokens; the proxy's budget lets 4
requests a second through while callers keep about 8 waiting, so a request waits a lifetime's
worth in the queue. A token taken before that wait would reach Kounta expired (a 401 that
spends budget); taken right before sending, never.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.sandbox import SandboxConfig
from proxy.sandbox.oauth import SANDBOX_OAUTH
from proxy.settings import BudgetSettings
from tests.conftest import MakeProxy, Sandbox, proxy_settings
from tests.integration.test_credentials import SEED_REFRESH, account

LIFETIME = 2.0
RUN = 6.0  # three lifetimes
ORDERS = "/v1/companies/5001/orders"


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    rotating = {"access_token_lifetime": LIFETIME, "rotate_refresh_tokens": True}
    return SandboxConfig(rate_per_minute_bearer=10_000, refresh_tokens=(SEED_REFRESH,), **rotating)


async def test_tokens_that_live_two_seconds_never_reach_kounta_expired(
    sandbox: Sandbox, make_proxy: MakeProxy, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    settings = proxy_settings(
        sandbox.url,
        tmp_path,
        accounts={"main": account(sandbox, tmp_path, rate_per_minute=240, burst=1)},
        budget=BudgetSettings(max_wait=10.0),
    )
    proxy = await make_proxy(settings)
    ids = iter(sorted(sandbox.state.store["orders"].records))
    statuses: list[int] = []
    started = time.monotonic()
    until = started + RUN

    async def caller() -> None:
        while time.monotonic() < until:
            async with client.get(f"{proxy.url}{ORDERS}/{next(ids)}.json") as r:
                await r.read()
                statuses.append(r.status)

    await asyncio.gather(*(caller() for _ in range(8)))
    took = time.monotonic() - started  # the last requests end after ``until``
    upstream = sandbox.state.statuses()
    assert upstream.get(401, 0) == 0, upstream
    assert set(statuses) == {200} and len(statuses) >= RUN * 3
    # One token request per half lifetime at most (and the first one).
    assert sandbox.app[SANDBOX_OAUTH].token_requests <= took / (LIFETIME / 2) + 1
