"""The token file: atomic, private, locked; and what a crash mid-refresh leaves behind."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.auth.token_file import StoredToken, TokenFile, TokenFileCorrupt, TokenFileError
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


CORRUPT = [
    b'{"access_token": "leaked-access-value", "refresh_token": "leaked-refresh-value", ',
    b'["leaked-access-value"]',
    b'{"access_token": "leaked-access-value", "expires_at": "tomorrow"}',
    b"\xff\xfeleaked-access-value\x00",
    b"",
]


@pytest.mark.parametrize("content", CORRUPT, ids=["torn", "array", "bad-field", "binary", "empty"])
async def test_a_corrupt_token_file_at_start_falls_back_to_the_configured_refresh_token(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    path = tmp_path / "tokens" / "main.json"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(content)
    path.chmod(0o600)
    p = await make_proxy(settings_for(sandbox, tmp_path))
    async with client.get(p.url + ME) as r:
        assert r.status == 200, await r.text()  # not an outage for the account
    assert sandbox.app[SANDBOX_OAUTH].token_requests == 1  # the configured refresh_token
    # The corrupt file is kept aside, as it was; a good one took its place.
    [aside] = path.parent.glob("main.json.corrupt-*")
    assert aside.read_bytes() == content
    assert stat.S_IMODE(aside.stat().st_mode) == 0o600
    assert TokenFile(path).read() is not None
    said = {r.getMessage(): r for r in caplog.records}
    assert said["token_file_corrupt"].fields["fallback"] == "configured refresh_token"  # type: ignore[attr-defined]
    assert said["token_file_set_aside"].fields["moved_to"] == str(aside)  # type: ignore[attr-defined]
    logged = " ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    for secret in ("leaked-access-value", "leaked-refresh-value", SEED_REFRESH):
        assert secret not in logged


def test_a_corrupt_file_is_set_aside_under_a_new_name_each_time(tmp_path: Path) -> None:
    file = TokenFile(tmp_path / "a.json")
    names = []
    for i in range(3):
        file.path.write_text(f"not json {i}")
        with pytest.raises(TokenFileCorrupt):
            file.read()
        names.append(file.set_aside(1_700_000_000.0).name)
    assert names == [
        "a.json.corrupt-20231114T221320Z",
        "a.json.corrupt-20231114T221320Z-1",
        "a.json.corrupt-20231114T221320Z-2",
    ]
    assert file.read() is None


def test_an_unreadable_file_is_not_taken_for_a_corrupt_one(tmp_path: Path) -> None:
    directory = tmp_path / "a.json"
    directory.mkdir()  # reading it fails with an OS error: not ours to move
    with pytest.raises(TokenFileError) as caught:
        TokenFile(directory).read()
    assert not isinstance(caught.value, TokenFileCorrupt)


def test_a_token_file_that_is_a_fifo_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """For the token file: opening a FIFO waits for a writer."""
    path = tmp_path / "main.json"
    os.mkfifo(path)
    result: list[BaseException] = []

    def read() -> None:
        try:
            TokenFile(path).read()
        except BaseException as e:
            result.append(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # the old code: release the blocked open() before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("reading a FIFO token file blocked")
    (error,) = result
    assert isinstance(error, TokenFileError) and not isinstance(error, TokenFileCorrupt)
    assert "not a regular file (a FIFO)" in str(error)
