"""`kounta-proxy authorize` as a subprocess against the sandbox's OAuth server."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import sys
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from cryptography.fernet import Fernet
from yarl import URL

from proxy.sandbox.oauth import SANDBOX_OAUTH
from tests.conftest import Sandbox
from tests.redis_server import RedisServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, sandbox: Sandbox, secret: str = "sandbox-secret") -> Path:
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
[upstream]
base_url = "{sandbox.url}"
[accounts.main]
mode = "oauth"
client_id = "sandbox-client"
client_secret = "{secret}"
token_url = "{sandbox.url}/v1/token"
authorize_url = "{sandbox.url}/authorize"
redirect_uri = "http://127.0.0.1:{free_port()}/callback"
"""
    )
    return config


class Run:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def line_starting(self, prefix: str) -> str:
        assert self.process.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.process.stdout.readline(), 20)
            assert raw, f"no line starting {prefix!r} in {self.lines}"
            line = raw.decode().strip()
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    async def finish(self) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.process.communicate(), 20)
        code = self.process.returncode
        assert code is not None
        return code, "\n".join(self.lines) + out.decode(), err.decode()


async def start(config: Path, *extra: str) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "authorize",
        "--config",
        str(config),
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Run(process)


async def browse(run: Run, client: aiohttp.ClientSession) -> None:
    """Act as the browser: open the printed URL and follow the redirect to the listener."""
    url = await run.line_starting("http")
    await run.line_starting("Waiting for the redirect")
    async with client.get(url) as r:
        await r.read()


async def test_authorize_writes_a_working_token_file(
    sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    run = await start(write_config(tmp_path, sandbox))
    await browse(run, client)
    code, out, err = await run.finish()
    assert code == 0, err
    assert "Authorized account 'main'" in out
    path = tmp_path / "state" / "tokens" / "main.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["access_token"] in sandbox.app[SANDBOX_OAUTH].by_access
    assert stored["access_token"] not in out + err
    assert stored["refresh_token"] not in out + err
    async with client.get(
        f"{sandbox.url}/v1/companies/me.json",
        headers={"Authorization": f"Bearer {stored['access_token']}"},
    ) as r:
        assert r.status == 200


async def test_denied_consent_is_one_clear_line(
    sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    sandbox.app[SANDBOX_OAUTH].deny = True
    run = await start(write_config(tmp_path, sandbox))
    await browse(run, client)
    code, _, err = await run.finish()
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "kounta-proxy: authorize failed: consent was denied (access_denied): nothing was saved"
    )
    assert not (tmp_path / "state" / "tokens" / "main.json").exists()


async def test_bad_client_secret_is_named(
    sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    run = await start(write_config(tmp_path, sandbox, secret="wrong-secret-value"))
    await browse(run, client)
    code, out, err = await run.finish()
    assert code == 1
    assert "rejected the client credentials (invalid_client)" in err
    assert "wrong-secret-value" not in out + err


async def test_pasted_redirect_with_a_foreign_state_is_refused(
    sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    run = await start(write_config(tmp_path, sandbox), "--paste")
    url = await run.line_starting("http")
    await run.line_starting("Paste")
    async with client.get(url, allow_redirects=False) as r:
        location = URL(r.headers["Location"])
    forged = location.update_query(state="someone-elses-state")
    assert run.process.stdin is not None
    run.process.stdin.write(f"{forged}\n".encode())
    await run.process.stdin.drain()
    code, _, err = await run.finish()
    assert code == 1
    assert "state mismatch" in err
    assert sandbox.app[SANDBOX_OAUTH].token_requests == 0  # the code was never exchanged


@pytest.mark.parametrize("pasted", ["url", "code"])
async def test_pasted_redirect_or_code_is_exchanged(
    sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession, pasted: str
) -> None:
    run = await start(write_config(tmp_path, sandbox), "--paste")
    url = await run.line_starting("http")
    async with client.get(url, allow_redirects=False) as r:
        location = URL(r.headers["Location"])
    text = str(location) if pasted == "url" else location.query["code"]
    assert run.process.stdin is not None
    run.process.stdin.write(f"{text}\n".encode())
    await run.process.stdin.drain()
    code, _, err = await run.finish()
    assert code == 0, err
    assert sandbox.app[SANDBOX_OAUTH].token_requests == 1


async def test_authorize_with_the_redis_backend_writes_the_encrypted_record(
    sandbox: Sandbox,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    key = Fernet.generate_key()
    (tmp_path / "token.key").write_bytes(key)
    config = write_config(tmp_path, sandbox)
    config.write_text(
        config.read_text().replace(
            "[accounts.main]",
            f'[shared]\nbackend = "redis"\nurl = "{redis_server.url}"\n'
            f'key_prefix = "{redis_prefix}"\ntoken_key_file = "{tmp_path / "token.key"}"\n'
            "[accounts.main]",
        )
    )
    before = await check_config(config)
    assert "has no token yet in the shared store (Redis at 127.0.0.1:" in before
    run = await start(config)
    await browse(run, client)
    code, out, err = await run.finish()
    assert code == 0, err
    assert not (tmp_path / "state" / "tokens" / "main.json").exists()  # Redis, not the file
    # It says where the token went, and check-config asks Redis rather than the file.
    assert "token saved to the shared store (Redis at 127.0.0.1:" in out
    assert "tokens/main.json" not in out
    assert "no token yet" not in await check_config(config)
    reader = aioredis.Redis.from_url(redis_server.url)
    try:
        version, data = await reader.hmget(f"{redis_prefix}:token:main", ["version", "data"])
    finally:
        await reader.aclose()
    # Above any version a replica may hold (the time in ms), so a fresh authorization wins.
    assert int(version) > 10**12
    stored = json.loads(Fernet(key).decrypt(data))
    assert stored["access_token"] in sandbox.app[SANDBOX_OAUTH].by_access
    assert stored["access_token"].encode() not in data
    assert stored["access_token"] not in out + err


async def test_authorize_with_redis_away_says_so_and_saves_nothing(
    sandbox: Sandbox, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    (tmp_path / "token.key").write_bytes(Fernet.generate_key())
    config = write_config(tmp_path, sandbox)
    config.write_text(
        config.read_text().replace(
            "[accounts.main]",
            f'[shared]\nbackend = "redis"\nurl = "redis://127.0.0.1:{free_port()}/0"\n'
            f'timeout = 0.3\ntoken_key_file = "{tmp_path / "token.key"}"\n[accounts.main]',
        )
    )
    run = await start(config)
    await browse(run, client)
    code, _, err = await run.finish()
    assert code == 1
    assert "the shared store at shared.url is not answering" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    # check-config cannot tell either, and says so (within its wait, no traceback).
    said = await check_config(config)
    assert "cannot tell whether account(s) 'main' have a token" in said
    assert "Traceback" not in said and "no token yet" not in said


async def check_config(config: Path) -> str:
    """check-config's warnings (stderr); it must succeed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "check-config",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    return err.decode()
