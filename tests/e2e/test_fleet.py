"""Three real ``kounta-proxy serve`` processes sharing one real Redis in front of one sandbox at
its real limit (with a shortened window): together they stay under it, Redis stopping leaves
them degraded but serving, and its return brings the shared budget back."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.sandbox import SandboxConfig
from tests.conftest import TOKEN, Sandbox
from tests.e2e.test_demo import COMMAND, free_port
from tests.redis_server import RedisServer

WINDOW = 2.0
LIMIT = 30
ME = "/v1/companies/me.json"


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(
        bearer_tokens=(TOKEN,),
        rate_per_minute_bearer=LIMIT,
        rate_per_minute_basic=LIMIT,
        rate_window=WINDOW,
    )


def config(
    tmp_path: Path, i: int, upstream: str, redis_url: str, prefix: str
) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    path = tmp_path / f"replica{i}.toml"
    path.write_text(
        f"""
state_dir = "{tmp_path / f"state{i}"}"
[server]
host = "127.0.0.1"
port = {port}
[admin]
port = {admin}
[upstream]
base_url = "{upstream}"
[cache]
enabled = false
[budget]
window = {WINDOW}
window_margin = 0.1
max_wait = 1.0
[shared]
backend = "redis"
url = "{redis_url}"
key_prefix = "{prefix}"
replicas = 3
timeout = 0.2
[accounts.main]
mode = "static"
token = "{TOKEN}"
rate_per_minute = {LIMIT}
"""
    )
    return path, port, admin


@pytest.fixture
async def fleet(
    tmp_path: Path, sandbox: Sandbox, redis_proc: RedisServer, redis_prefix: str
) -> AsyncIterator[list[tuple[str, str]]]:
    procs, urls = [], []
    for i in range(3):
        path, port, admin = config(tmp_path, i, sandbox.url, redis_proc.url, redis_prefix)
        procs.append(
            await asyncio.create_subprocess_exec(
                COMMAND, "serve", "--config", str(path),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        )  # fmt: skip
        urls.append((f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"))
    try:
        async with aiohttp.ClientSession() as client:
            for _, admin in urls:
                await until(lambda a=admin: ready(client, a), 20)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await proc.wait()


async def ready(client: aiohttp.ClientSession, admin: str) -> bool:
    try:
        async with client.get(f"{admin}/readyz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def until(check: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def gauge(client: aiohttp.ClientSession, admin: str, name: str) -> float:
    async with client.get(f"{admin}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


async def hammer(client: aiohttp.ClientSession, proxies: list[str], seconds: float) -> Counter[int]:
    stop = time.monotonic() + seconds
    statuses: Counter[int] = Counter()

    async def caller(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            async with client.get(proxies[(i + n) % 3] + ME) as r:
                await r.read()
                statuses[r.status] += 1
            n += 1

    await asyncio.gather(*(caller(i) for i in range(20)))
    return statuses


@pytest.mark.slow
async def test_three_serve_processes_share_the_budget_and_survive_redis_going_away(
    fleet: list[tuple[str, str]], sandbox: Sandbox, redis_proc: RedisServer
) -> None:
    proxies = [p for p, _ in fleet]
    admins = [a for _, a in fleet]
    async with aiohttp.ClientSession() as client:
        statuses = await hammer(client, proxies, 3.0)
        assert sandbox.state.limiter.refused == {}
        sent = sandbox.state.served("GET", ME)
        assert sent >= LIMIT * 3.0 / (WINDOW + 0.1) * 0.7, sent
        assert statuses[200] == sent and set(statuses) <= {200, 429}
        for admin in admins:
            assert await gauge(client, admin, "kounta_proxy_shared_backend_up") == 1

        redis_proc.stop()
        statuses = await hammer(client, proxies, 1.5)
        # Degraded: each replica on its own rate / 3, still answering, still under the limit.
        assert statuses[200] > 0 and set(statuses) <= {200, 429}
        assert sandbox.state.limiter.refused == {}
        for admin in admins:
            assert await gauge(client, admin, "kounta_proxy_shared_degraded") == 1
            async with client.get(f"{admin}/readyz") as r:
                body = await r.json()
                assert r.status == 200 and body["details"] == {"shared": "degraded"}, body

        redis_proc.start()
        for admin in admins:
            await until(lambda a=admin: _shared_again(client, a), 5)
        async with client.get(proxies[0] + ME) as r:
            assert r.status == 200


async def _shared_again(client: aiohttp.ClientSession, admin: str) -> bool:
    return await gauge(client, admin, "kounta_proxy_shared_backend_up") == 1


async def test_workers_with_the_local_backend_refuse_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "local.toml"
    path.write_text(f'[accounts.main]\nmode = "static"\ntoken = "{TOKEN}"\n')
    proc = await asyncio.create_subprocess_exec(
        COMMAND, "serve", "--workers", "2", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "--workers: 2 workers need [shared] backend = 'redis'" in lines[0]


async def requests_seen(client: aiohttp.ClientSession, admin: str) -> float:
    async with client.get(f"{admin}/metrics") as r:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in (await r.text()).splitlines()
            if line.startswith("kounta_proxy_requests_total{")
        )


@pytest.mark.slow
async def test_two_workers_share_one_port_reload_on_sighup_and_stop_together(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer, redis_prefix: str
) -> None:
    path, port, admin = config(tmp_path, 0, sandbox.url, redis_server.url, redis_prefix)
    with socket.socket() as s:  # admin + 1 must be free too
        s.bind(("127.0.0.1", admin + 1))
    log = tmp_path / "workers.log"
    with log.open("wb") as out:  # the workers log to the parent's stderr
        proc = await asyncio.create_subprocess_exec(
            COMMAND, "serve", "--workers", "2", "--config", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    admins = [f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{admin + 1}"]
    try:
        async with aiohttp.ClientSession() as client:
            for url in admins:
                await until(lambda u=url: ready(client, u), 20)
            # New connections each time: the kernel spreads them over the workers.
            fresh = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=fresh) as callers:
                for _ in range(24):
                    async with callers.get(f"http://127.0.0.1:{port}{ME}") as r:
                        assert r.status == 200
            seen = [await requests_seen(client, url) for url in admins]
            assert sum(seen) == 24 and min(seen) > 0, seen

            # SIGHUP to the parent is a reload of every worker; nothing stops.
            path.write_text(
                path.read_text().replace(
                    "max_wait = 1.0", 'max_wait = 1.0\n[log]\nlevel = "warning"'
                )
            )
            proc.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                return log.read_text().count('"event":"reloaded"') == 2

            await until(reloaded, 10)
            assert proc.returncode is None
            for url in admins:
                assert await ready(client, url)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        # Both workers drained and the parent exits 0, not killed.
        assert await asyncio.wait_for(proc.wait(), 20) == 0
