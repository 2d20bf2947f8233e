"""Readiness means "can serve" (DESIGN.md Resolutions "Readiness"): a failing
account or a full cache disk are details and metrics, never a 503 that takes the pod out of
its Service; only "can serve nothing" (no usable account, shutting down) is.

Real sockets: the sandbox as Kounta, a token URL on a closed port, the proxy and its admin
listener; the full disk is ENOSPC from the store's writes (as in test_cache.py).
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.edge.services import SERVICES
from proxy.settings import AccountSettings, CallerSettings, Secret
from tests.conftest import TOKEN, MakeProxy, Proxy, Sandbox, proxy_settings
from tests.integration.test_admin import StartAdmin, admin_raw, start_admin  # noqa: F401

KEY_GOOD = "caller-good-0123456789abcdef"
KEY_BROKEN = "caller-broken-0123456789abcd"
LIST = "/v1/companies/5001/products.json"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def two_accounts(sandbox: Sandbox, tmp_path: Path) -> Any:
    broken = AccountSettings(
        mode="oauth",
        client_id="sandbox-client",
        client_secret=Secret("sandbox-secret"),
        token_url=f"http://127.0.0.1:{closed_port()}/v1/token",  # connection refused
        refresh_token=Secret("seed-refresh-token"),
        token_path=str(tmp_path / "tokens" / "broken.json"),
        rate_per_minute=100_000,
    )
    good = AccountSettings(mode="static", token=Secret(TOKEN), rate_per_minute=100_000)
    return proxy_settings(
        sandbox.url,
        tmp_path,
        accounts={"good": good, "broken": broken},
        callers={
            "svc-good": CallerSettings(key=Secret(KEY_GOOD), account="good"),
            "svc-broken": CallerSettings(key=Secret(KEY_BROKEN), account="broken"),
        },
    )


async def get(proxy: Proxy, key: str) -> int:
    headers = {"X-Proxy-Key": key}
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url}{LIST}", headers=headers) as r,
    ):
        await r.read()
        return r.status


async def readyz(admin: str) -> tuple[int, dict[str, Any]]:
    status, payload = await admin_raw(admin, "GET", "/readyz", "Host: 10.244.1.7:9464")
    return status, json.loads(payload)


async def test_a_failing_account_and_a_full_disk_leave_the_proxy_ready(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    start_admin: StartAdmin,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = await make_proxy(two_accounts(sandbox, tmp_path))
    admin = await start_admin(proxy)
    store = proxy.app[SERVICES].store
    assert store is not None

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.disk, "set", full)
    assert await get(proxy, KEY_BROKEN) == 503  # the token URL refuses connections
    for _ in range(2):
        assert await get(proxy, KEY_GOOD) == 200  # served, uncached
        await store.flush()
    status, body = await readyz(admin)
    assert status == 200, body
    assert (body["status"], body["failing"]) == ("ready", [])
    assert body["degraded"] == ["cache", "token:broken"]
    assert "disk full" in body["checks"]["cache"]
    assert "token endpoint is failing" in body["checks"]["token:broken"]
    assert body["checks"]["token:good"] == "ok"
    sample = proxy.registry.get_sample_value
    assert sample("kounta_proxy_token_state", {"account": "broken", "state": "unavailable"}) == 1
    assert sample("kounta_proxy_token_state", {"account": "good", "state": "static"}) == 1
    assert sample("kounta_proxy_cache_storing_disabled") == 1
    assert (sample("kounta_proxy_cache_store_errors_total", {"op": "full"}) or 0) >= 1
    # The other account still answers, which is what readiness is about.
    assert await get(proxy, KEY_GOOD) == 200


async def test_no_usable_account_and_shutting_down_fail_readiness(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    start_admin: StartAdmin,  # noqa: F811
) -> None:
    settings = two_accounts(sandbox, tmp_path)
    only_broken = {"broken": settings.accounts["broken"]}
    proxy = await make_proxy(
        proxy_settings(sandbox.url, tmp_path, accounts=only_broken, callers={})
    )
    admin = await start_admin(proxy)
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}{LIST}") as r:
        assert r.status == 503
    status, body = await readyz(admin)
    assert (status, body["status"], body["failing"]) == (503, "not_ready", ["accounts"])
    assert body["degraded"] == ["token:broken"]
    assert body["checks"]["accounts"] == "no account can get a token"
    proxy.app[SERVICES].state.shutting_down = True
    status, body = await readyz(admin)
    assert (status, body["failing"]) == (503, ["accounts", "shutdown"])
    assert (await admin_raw(admin, "GET", "/livez", "Host: 10.244.1.7"))[0] == 200
