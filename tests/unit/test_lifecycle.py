"""The process lifecycle in-process: preflight, both listeners, SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from proxy.listener import StartupError
from proxy.ops import lifecycle
from proxy.settings import AdminSettings, CacheSettings, ServerSettings, Settings
from tests.conftest import proxy_settings


def test_directories_are_the_state_and_cache_dirs(tmp_path: Path) -> None:
    settings = proxy_settings("http://127.0.0.1:9", tmp_path)
    assert dict(lifecycle.directories(settings)) == {
        "state_dir": str(tmp_path / "state"),
        "cache.dir": str(tmp_path / "state" / "cache"),
    }
    elsewhere = dataclasses.replace(settings, cache=CacheSettings(dir=str(tmp_path / "c")))
    assert dict(lifecycle.directories(elsewhere))["cache.dir"] == str(tmp_path / "c")
    off = dataclasses.replace(settings, cache=CacheSettings(enabled=False))
    assert "cache.dir" not in dict(lifecycle.directories(off))


def test_preflight_creates_directories_and_refuses_unusable_ones(tmp_path: Path) -> None:
    settings = proxy_settings("http://127.0.0.1:9", tmp_path)
    lifecycle.preflight(settings)
    assert (tmp_path / "state" / "cache").is_dir()
    assert list((tmp_path / "state").iterdir()) == [tmp_path / "state" / "cache"]
    (tmp_path / "file").write_text("x")
    bad = dataclasses.replace(settings, cache=CacheSettings(dir=str(tmp_path / "file" / "c")))
    with pytest.raises(StartupError, match=r"^cache.dir .*/file/c is not a writable directory"):
        lifecycle.preflight(bad)


async def send_sigterm_once_handled() -> None:
    """SIGTERM to this process, once the proxy's handler is installed (never before)."""
    for _ in range(500):
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the SIGTERM handler was never installed")


async def start(settings: Settings) -> tuple[asyncio.Task[None], int, int | None]:
    started = asyncio.Event()
    ports: list[int | None] = []

    def announce(port: int, admin: int | None) -> None:
        ports.extend([port, admin])
        started.set()

    task = asyncio.create_task(lifecycle.serve(settings, announce=announce))
    await asyncio.wait_for(started.wait(), 10)
    assert ports[0] is not None
    return task, ports[0], ports[1]


async def test_serve_answers_on_both_ports_and_stops_on_sigterm(tmp_path: Path) -> None:
    settings = dataclasses.replace(
        proxy_settings("http://127.0.0.1:9", tmp_path),
        server=ServerSettings(host="127.0.0.1", port=0, shutdown_grace=1.0),
        admin=AdminSettings(host="127.0.0.1", port=0),
    )
    task, port, admin = await start(settings)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{admin}/readyz") as r:
            assert r.status == 200
        async with client.get(f"http://127.0.0.1:{port}/readyz") as r:
            assert r.status == 404
        await send_sigterm_once_handled()
        await asyncio.wait_for(task, 10)
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get(f"http://127.0.0.1:{admin}/healthz")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_admin_can_be_disabled(tmp_path: Path) -> None:
    settings = dataclasses.replace(
        proxy_settings("http://127.0.0.1:9", tmp_path),
        admin=AdminSettings(enabled=False),
    )
    task, _, admin = await start(settings)
    assert admin is None
    await send_sigterm_once_handled()
    await asyncio.wait_for(task, 10)


async def test_serve_freezes_start_ups_objects_and_unfreezes_them_when_it_stops(
    tmp_path: Path,
) -> None:
    settings = dataclasses.replace(
        proxy_settings("http://127.0.0.1:9", tmp_path), admin=AdminSettings(enabled=False)
    )
    assert gc.get_freeze_count() == 0
    task, _, _ = await start(settings)
    assert gc.get_freeze_count() > 0  # frozen before it says it started
    await send_sigterm_once_handled()
    await asyncio.wait_for(task, 10)
    assert gc.get_freeze_count() == 0
