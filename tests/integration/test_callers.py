"""Inbound callers: keys, accounts, and what never reaches Kounta."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.cli import main
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.settings import (
    AccountSettings,
    CallerSettings,
    ConfigError,
    InboundSettings,
    Secret,
    load,
)
from tests.conftest import MakeProxy, proxy_settings

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
ME = "/v1/companies/me.json"


class Recorder:
    """The bottom layer: remembers what would have gone to Kounta and answers 200."""

    def __init__(self) -> None:
        self.seen: list[ProxyRequest] = []

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        self.seen.append(request)
        return ProxyResponse(200, CIMultiDict({"Content-Type": "application/json"}), b"{}")


def two_accounts(tmp_path: Path, **inbound: Any) -> Any:
    return proxy_settings(
        "http://127.0.0.1:9",
        tmp_path,
        accounts={
            "main": AccountSettings(mode="static", token=Secret("main-token-xyz")),
            "shop": AccountSettings(
                mode="basic", client_id="shop-client", client_secret=Secret("shop-secret-xyz")
            ),
        },
        callers={
            "svc-a": CallerSettings(key=Secret(KEY_A), account="main"),
            "svc-b": CallerSettings(key=Secret(KEY_B), account="shop"),
        },
        inbound=InboundSettings(**inbound),
    )


@pytest.fixture
async def recorded(make_proxy: MakeProxy, tmp_path: Path) -> tuple[str, Recorder]:
    recorder = Recorder()
    p = await make_proxy(two_accounts(tmp_path), upstream=recorder)
    return p.url, recorder


@pytest.mark.parametrize(
    ("headers", "description"),
    [
        ({}, "required"),
        ({"X-Proxy-Key": "nope-nope-nope-nope"}, "not known"),
        ({"Authorization": "Bearer nope-nope-nope-nope"}, "not known"),
        ({"X-Proxy-Key": KEY_A[:-1]}, "not known"),
    ],
)
async def test_missing_or_unknown_key_gets_401_json(
    recorded: tuple[str, Recorder],
    client: aiohttp.ClientSession,
    headers: dict[str, str],
    description: str,
) -> None:
    url, recorder = recorded
    async with client.get(url + ME, headers=headers) as r:
        assert r.status == 401
        body = await r.json()
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert body["error"] == "invalid_client"
    assert description in body["error_description"]
    assert recorder.seen == []


async def test_keys_map_callers_to_accounts_and_never_reach_kounta(
    recorded: tuple[str, Recorder], client: aiohttp.ClientSession
) -> None:
    url, recorder = recorded
    async with client.get(url + ME, headers={"X-Proxy-Key": KEY_A}) as r:
        assert r.status == 200
    async with client.get(url + ME, headers={"Authorization": f"Bearer {KEY_B}"}) as r:
        assert r.status == 200
    first, second = recorder.seen
    assert (first.caller, first.account) == ("svc-a", "main")
    assert (second.caller, second.account) == ("svc-b", "shop")
    assert "X-Proxy-Key" not in first.headers
    assert first.headers["Authorization"] == "Bearer main-token-xyz"
    basic = base64.b64encode(b"shop-client:shop-secret-xyz").decode()
    assert second.headers["Authorization"] == f"Basic {basic}"
    assert KEY_B not in str(dict(second.headers))


async def test_loopback_with_one_account_needs_no_key_and_drops_the_callers_authorization(
    make_proxy: MakeProxy, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    recorder = Recorder()
    p = await make_proxy(proxy_settings("http://127.0.0.1:9", tmp_path), upstream=recorder)
    async with client.get(p.url + ME, headers={"Authorization": "Bearer callers-own"}) as r:
        assert r.status == 200
    assert recorder.seen[0].caller == "anonymous"
    assert recorder.seen[0].headers["Authorization"] == "Bearer sandbox-token"


def test_listening_beyond_loopback_without_keys_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\n[accounts.main]\nmode = "static"\ntoken = "t"\n')
    with pytest.raises(ConfigError, match="allow_anonymous"):
        load(config, env={})
    assert main(["check-config", "--config", str(config)]) == 2
    env = {"KOUNTA_PROXY_INBOUND__ALLOW_ANONYMOUS": "true"}
    assert load(config, env=env).inbound.allow_anonymous
    env = {"KOUNTA_PROXY_CALLERS__SVC__KEY": KEY_A}
    assert load(config, env=env).callers["svc"].key.reveal() == KEY_A


def test_caller_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"callers\.svc\.account"):
        load(
            None,
            env={
                "KOUNTA_PROXY_CALLERS__SVC__KEY": KEY_A,
                "KOUNTA_PROXY_CALLERS__SVC__ACCOUNT": "ghost",
            },
        )
    with pytest.raises(ConfigError, match="at least 16"):
        load(None, env={"KOUNTA_PROXY_CALLERS__SVC__KEY": "short"})
    with pytest.raises(ConfigError, match="key_header"):
        load(None, env={"KOUNTA_PROXY_INBOUND__KEY_HEADER": "Authorization"})
