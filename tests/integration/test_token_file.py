"""The token file: atomic, private, locked; and what a crash mid-refresh leaves behind."""

from __future__ import annotations

import asyncio
import json
import stat
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.auth.token_file import StoredToken, TokenFile, TokenFileError
from proxy.sandbox import SandboxConfig
from proxy.sandbox.oauth import SANDBOX_OAUTH
from tests.conftest import MakeProxy, Sandbox
from tests.integration.test_credentials import SEED_REFRESH, FakeClock, settings_for

ME = "/v1/companies/me.json"

# Starts a provider on a token file whose write is replaced by a crash: "before" dies
# between receiving the token answer and persisting it, "after" right after persisting.
CRASHER = """
import asyncio, os, sys
from pathlib import Path
import aiohttp
from proxy.auth.providers import OAuthProvider
from proxy.settings import AccountSettings, Secret
from proxy.auth.token_file import TokenFile

when, url, path, refresh = sys.argv[1:5]

class CrashingFile(TokenFile):
    def write(self, token):
        if when == "after":
            super().write(token)
        os._exit(17)

async def main():
    account = AccountSettings(
        mode="oauth", client_id="sandbox-client", client_secret=Secret("sandbox-secret"),
        token_url=url + "/v1/token", refresh_token=Secret(refresh),
    )
    provider = OAuthProvider("main", account, CrashingFile(Path(path)))
    async with aiohttp.ClientSession() as session:
        await provider.start(session)
        await provider.authorization()

asyncio.run(main())
"""


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(rate_per_minute_bearer=100_000, refresh_tokens=(SEED_REFRESH,))


async def crash(sandbox: Sandbox, path: Path, when: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHER, when, sandbox.url, str(path), SEED_REFRESH
    )
    assert await asyncio.wait_for(process.wait(), 30) == 17


def expired_file(path: Path) -> None:
    TokenFile(path).write(StoredToken("old-access", SEED_REFRESH, time.time() - 10))


async def test_killed_between_receiving_and_persisting_the_next_start_still_refreshes(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    path = tmp_path / "tokens" / "main.json"
    expired_file(path)
    await crash(sandbox, path, "before")
    assert sandbox.app[SANDBOX_OAUTH].token_requests == 1  # the answer arrived, then the kill
    left = json.loads(path.read_text())
    assert left["refresh_token"] == SEED_REFRESH  # the old file, whole
    assert list(path.parent.glob(".*.tmp")) == []
    p = await make_proxy(settings_for(sandbox, tmp_path))
    async with client.get(p.url + ME) as r:
        assert r.status == 200
    assert sandbox.app[SANDBOX_OAUTH].token_requests == 2


async def test_killed_after_persisting_a_rotated_token_the_next_start_uses_it(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    server = sandbox.app[SANDBOX_OAUTH]
    server.rotate = True
    path = tmp_path / "tokens" / "main.json"
    expired_file(path)
    await crash(sandbox, path, "after")
    stored = json.loads(path.read_text())
    assert stored["refresh_token"] != SEED_REFRESH  # the rotated one was saved before use
    assert server.by_refresh[SEED_REFRESH].revoked
    clock = FakeClock()
    p = await make_proxy(settings_for(sandbox, tmp_path), clock=clock)
    async with client.get(p.url + ME) as r:
        assert r.status == 200
    assert server.token_requests == 1  # the persisted access token was reused
    clock.now += 7200  # and its persisted refresh token works
    async with client.get(p.url + "/v1/companies/5001.json") as r:
        assert r.status == 200
    assert server.token_requests == 2


def test_write_is_private_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    file = TokenFile(tmp_path / "deep" / "tokens" / "a.json")
    file.write(StoredToken("access", "refresh", 123.5, obtained_at=100.0))
    file.write(StoredToken("access2", "refresh2", 456.0, obtained_at=400.0))
    assert stat.S_IMODE(file.path.stat().st_mode) == 0o600
    assert [p.name for p in file.path.parent.iterdir()] == ["a.json"]
    assert file.read() == StoredToken("access2", "refresh2", 456.0, obtained_at=400.0)
    assert "access2" not in repr(file.read())


def test_a_corrupt_file_is_a_clear_error_without_its_contents(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('{"access_token": "secret-value", ')
    with pytest.raises(TokenFileError, match="not a valid token file") as caught:
        TokenFile(path).read()
    assert "secret-value" not in str(caught.value)
    assert TokenFile(tmp_path / "missing.json").read() is None


async def test_the_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    a, b = TokenFile(tmp_path / "t.json"), TokenFile(tmp_path / "t.json")
    order: list[str] = []

    async def hold(file: TokenFile, name: str) -> None:
        async with file.locked():
            order.append(f"{name} in")
            await asyncio.sleep(0.05)
            order.append(f"{name} out")

    await asyncio.gather(hold(a, "a"), hold(b, "b"))
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
    async with a.locked():
        with pytest.raises(TokenFileError, match="stayed locked"):
            async with b.locked(0.05):
                pass
