"""``serve --workers 2`` (real processes, a real redis-server) revalidating a large entry on
every request: each flight takes the key's fetch lock, and the claim reads only the head of
the 500 KB record under the key, not the body (proxy.cache.redis_records.PEEK)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import TOKEN, serve_handler
from tests.e2e.test_demo import COMMAND, free_port
from tests.e2e.test_fleet import ready, scrape, series, started_or_exited
from tests.integration.test_shared_claims import BODY, large_v1
from tests.redis_server import TOKEN_KEY, RedisServer

SIZE = len(BODY)
REQUESTS = 12


@pytest.mark.slow
async def test_two_workers_revalidating_a_large_entry_read_its_head_not_its_body(
    tmp_path: Path, redis_proc: RedisServer
) -> None:
    runner, upstream = await serve_handler(large_v1)
    port, admin = free_port(), free_port()
    path = tmp_path / "workers.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n[admin]\nport = {admin}\n'
        f'[upstream]\nbase_url = "{upstream}"\n'
        f'[shared]\nbackend = "redis"\nurl = "{redis_proc.url}"\ntoken_key = "{TOKEN_KEY}"\n'
        f'[accounts.main]\nmode = "static"\ntoken = "{TOKEN}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        COMMAND, "serve", "--workers", "2", "--config", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    admin_url = f"http://127.0.0.1:{admin}"
    try:
        async with aiohttp.ClientSession() as client, aioredis.from_url(redis_proc.url) as redis:
            assert await started_or_exited(proc, lambda: ready(client, admin_url), 40)
            before = int((await redis.info("stats"))["total_net_output_bytes"])
            fresh = aiohttp.TCPConnector(force_close=True)  # the kernel spreads them
            async with aiohttp.ClientSession(connector=fresh) as callers:
                for _ in range(REQUESTS):
                    url = f"http://127.0.0.1:{port}/v1/things.json"
                    async with callers.get(url) as r:
                        assert (r.status, await r.read() == BODY) == (200, True)
            sent = int((await redis.info("stats"))["total_net_output_bytes"]) - before
            counts = {
                labels["result"]: value
                for name, labels, value in series(await scrape(client, admin_url))
                if name == "kounta_proxy_cache_shared_total" and labels["op"] == "lock"
            }
    finally:
        await runner.cleanup()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)
    # Each worker's first request reads the entry whole (a miss, or a Redis hit); every later
    # one is a flight over its own stale copy: the claim reads the record's head only.
    assert sent < 3 * SIZE + REQUESTS * 64 * 1024, sent  # was REQUESTS x 500 KB
    assert counts["taken"] >= REQUESTS - 1
    assert counts.get("peeked", 0) >= REQUESTS - 2
