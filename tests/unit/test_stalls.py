"""The suite's stall watchdog (tests/stalls.py): a test that waits forever fails with where it
waits, and the run goes on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STALLING = """
import asyncio
import time

import pytest


@pytest.fixture
async def stuck_on_the_way_out():
    yield
    await asyncio.get_running_loop().create_future()


async def waits_for_an_event_nobody_sets(event):
    await event.wait()


async def test_async_stall():
    await waits_for_an_event_nobody_sets(asyncio.Event())


def test_sync_stall():
    time.sleep(60)


async def test_teardown_stall(stuck_on_the_way_out):
    pass


async def test_after_the_stalls():
    await asyncio.sleep(0)
"""


@pytest.mark.slow
def test_a_stalled_test_fails_with_the_await_it_is_stuck_in_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_stalling.py").write_text(STALLING)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.stalls",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            "--rootdir",
            str(tmp_path),
            "-q",
            str(tmp_path / "test_stalling.py"),
        ],
        cwd=ROOT,
        env={**os.environ, "KP_TEST_STALL_SECONDS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "2 failed, 2 passed, 1 error" in out, out
    assert "test_async_stall stalled for 1s: tasks cancelled" in out, out
    assert "-> waits_for_an_event_nobody_sets (" in out, out  # the await chain, not select()
    assert "test_sync_stall: no end after 1s" in out, out
    # A fixture's teardown: the generator it waits in, and the future it waits for.
    assert "teardown of test_stalling.py::test_teardown_stall stalled for 1s" in out, out
    assert "-> stuck_on_the_way_out (" in out and "-> <Future pending" in out, out
