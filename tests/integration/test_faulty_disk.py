"""A faulty disk under a running proxy: body files truncated, changed or deleted, a corrupt
``cache.db``, and who may read what the cache keeps. Real diskcache on a real directory,
a real upstream on loopback, real callers.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.auth.token_file import StoredToken, TokenFile
from proxy.cache.store import CacheStore
from proxy.edge.services import SERVICES
from proxy.ops.admin import create_admin_app
from proxy.ops.lifecycle import preflight
from proxy.settings import CacheSettings
from tests.conftest import MakeProxy, Proxy, proxy_settings, serve, serve_handler

MIB = 1024 * 1024


def body_of(path: str) -> bytes:
    """A body per path whose size the path names (``/v1/b/<bytes>``), its bytes varied."""
    size = int(path.rsplit("/", 1)[1])
    seed = hashlib.sha256(path.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@dataclass
class Origin:
    url: str
    served: list[str]


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    served: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        served.append(request.path)
        headers = {"Cache-Control": "max-age=600", "ETag": f'"{len(served)}"'}
        return web.Response(body=body_of(request.path), headers=headers)

    runner, url = await serve_handler(handler)
    yield Origin(url, served)
    await runner.cleanup()


@pytest.fixture
async def disk_proxy(make_proxy: MakeProxy, origin: Origin, tmp_path: Path) -> Proxy:
    # No memory tier: every lookup reads the disk.
    cache = CacheSettings(memory_size=0)
    return await make_proxy(proxy_settings(origin.url, tmp_path, cache=cache))


def store_of(p: Proxy) -> CacheStore:
    store = p.app[SERVICES].store
    assert store is not None
    return store


async def fetch(url: str, **headers: str) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as client, client.get(url, headers=headers) as r:
        return r.status, r.headers.get("X-Cache", ""), await r.read()


async def settle(p: Proxy) -> None:
    """Wait until every fetch has finished storing (a large body commits after the answer)."""
    cache = p.app[SERVICES].cache
    assert cache is not None
    for _ in range(500):
        if not cache.flights and not store_of(p)._pending:
            break
        await asyncio.sleep(0.01)
    await store_of(p).flush()


def body_files(p: Proxy) -> list[Path]:
    return sorted(store_of(p).directory.rglob("*.val"))


def mismatches(p: Proxy) -> float:
    return p.registry.get_sample_value("kounta_proxy_cache_body_mismatches_total") or 0.0


# -- stored body integrity on read ---------------------------------------------------------


def truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def flip(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated": truncate,
    "changed": flip,
    "deleted": Path.unlink,
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("size", [200_000, 2 * MIB], ids=["read-whole", "streamed"])
async def test_a_damaged_body_file_is_dropped_counted_and_fetched_again(
    disk_proxy: Proxy, origin: Origin, damage: str, size: int
) -> None:
    p, url = disk_proxy, f"{disk_proxy.url}/v1/b/{size}"
    want = body_of(f"/v1/b/{size}")
    assert await fetch(url) == (200, "MISS", want)
    await settle(p)
    assert await fetch(url) == (200, "HIT", want)
    (body_file,) = body_files(p)
    DAMAGE[damage](body_file)
    if size > 1 * MIB and damage == "changed":
        # Same size: only the CRC32 tells, at the end of the stream. The answer is broken
        # off rather than completed, and the entry is gone for the next caller.
        with pytest.raises(aiohttp.ClientPayloadError):
            await fetch(url)
    else:
        assert await fetch(url) == (200, "MISS", want)
    assert mismatches(p) == 1
    await settle(p)
    assert (await fetch(url))[1:] in (("MISS", want), ("HIT", want))
    await settle(p)
    assert await fetch(url) == (200, "HIT", want)


# -- a corrupt cache.db under a running proxy ----------------------------------------------


def corrupt_database(directory: Path) -> None:
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        path = directory / name
        if path.exists():
            with path.open("r+b") as f:
                f.write(os.urandom(max(path.stat().st_size, 4096)))


async def test_a_corrupt_cache_db_is_a_storing_problem_and_stats_still_answer(
    disk_proxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    p = disk_proxy
    store = store_of(p)
    admin_runner, admin_port = await serve(create_admin_app(p.app[SERVICES]))
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        assert (await fetch(f"{p.url}/v1/b/100"))[0] == 200
        await store.flush()
        corrupt_database(store.directory)
        for n in range(4):
            status, cache, body = await fetch(f"{p.url}/v1/b/{200 + n}")
            assert (status, cache, body) == (200, "MISS", body_of(f"/v1/b/{200 + n}"))
            await store.flush()
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{admin}/readyz") as r:
                ready = await r.json()
                assert r.status == 200  # a cache that cannot store is degraded, not unready
                assert ready["degraded"] == ["cache"]
            async with client.get(f"{admin}/cache/stats") as r:
                stats = await r.json()
                assert r.status == 200
    finally:
        await admin_runner.cleanup()
    assert ready["checks"]["cache"].startswith("3 writes in a row failed: DatabaseError")
    assert stats["entries"] is None and "DatabaseError" in stats["error"]
    assert stats["storing"] == ready["checks"]["cache"]
    sample = p.registry.get_sample_value
    assert (sample("kounta_proxy_cache_store_errors_total", {"op": "write"}) or 0) >= 3
    assert sample("kounta_proxy_cache_storing_disabled") == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "cache_storing_disabled" in warnings
    # Reads of the broken database are misses, never errors: a stored key is fetched again.
    assert await fetch(f"{p.url}/v1/b/100") == (200, "MISS", body_of("/v1/b/100"))


# -- who may read the cache ----------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """The modes of every file and every directory under ``root``."""
    found = {str(p.relative_to(root)): p for p in root.rglob("*")}
    files = {name: mode(p) for name, p in found.items() if p.is_file()}
    return files, {name: mode(p) for name, p in found.items() if p.is_dir()}


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Any:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


async def test_state_and_cache_are_the_proxy_users_alone_whatever_the_umask(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path, umask: int
) -> None:
    settings = proxy_settings(origin.url, tmp_path / "deep", cache=CacheSettings(memory_size=0))
    preflight(settings)  # what `serve` does first: makes the state and cache directories
    state = Path(settings.state_dir)
    assert (mode(tmp_path / "deep"), mode(state), mode(state / "cache")) == (0o700,) * 3
    p = await make_proxy(settings)
    for size in (100, 100_000, 2 * MIB):  # inline, a body value, a spilled body
        assert (await fetch(f"{p.url}/v1/b/{size}"))[0] == 200
    await settle(p)
    files, dirs = modes(state)
    assert len(body_files(p)) == 2 and "cache/cache.db" in files
    assert files == dict.fromkeys(files, 0o600)
    assert dirs == dict.fromkeys(dirs, 0o700)
    token = TokenFile(state / "tokens" / "main.json")
    token.write(StoredToken(access_token="a", refresh_token="r", expires_at=0.0))
    assert (mode(state / "tokens"), mode(state / "tokens" / "main.json")) == (0o700, 0o600)


async def test_an_existing_directory_keeps_its_mode(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    shared = tmp_path / "state" / "cache"
    shared.mkdir(parents=True)
    shared.chmod(0o750)  # an operator's choice (say, a backup group): left alone
    p = await make_proxy(proxy_settings(origin.url, tmp_path))
    assert (await fetch(f"{p.url}/v1/b/100000"))[0] == 200
    await settle(p)
    assert mode(shared) == 0o750
    assert {mode(f) for f in body_files(p)} == {0o600}
    await asyncio.sleep(0)


# -- an idle proxy keeps saying the disk is full ------------------------------------------


async def test_an_idle_proxy_probes_the_full_disk_on_a_timer(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no traffic, storing must not read "ok" again while the disk is still full, and
    must read ok again once space is back, without a request to find out."""
    monkeypatch.setattr("proxy.cache.store.FULL_DISK_RETRY", 0.3)
    monkeypatch.setattr("proxy.edge.services.STORE_WATCH_SECONDS", 0.1)
    p = await make_proxy(proxy_settings(origin.url, tmp_path))
    store = store_of(p)
    writes = store.disk.set

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    store.disk.set = full  # type: ignore[method-assign]
    assert (await fetch(f"{p.url}/v1/b/100"))[0] == 200
    await store.flush()
    gauge = "kounta_proxy_cache_storing_disabled"
    assert p.registry.get_sample_value(gauge) == 1
    await asyncio.sleep(1.5)  # five retry periods, no request: still full, still said so
    assert p.registry.get_sample_value(gauge) == 1
    assert "disk full" in str(p.app[SERVICES].checks["cache"]())
    full_events = p.registry.get_sample_value(
        "kounta_proxy_cache_store_errors_total", {"op": "full"}
    )
    assert full_events == 1  # one disk-full episode, however often it was probed
    store.disk.set = writes  # type: ignore[method-assign]  # space is back
    deadline = asyncio.get_running_loop().time() + 3
    while p.registry.get_sample_value(gauge) != 0:
        assert asyncio.get_running_loop().time() < deadline, "storing never came back"
        await asyncio.sleep(0.05)
    assert p.app[SERVICES].checks["cache"]() is None
    assert (await fetch(f"{p.url}/v1/b/200"))[1] == "MISS"
    await store.flush()
    assert (await fetch(f"{p.url}/v1/b/200"))[1] == "HIT"
