"""The e2e tests' Kounta: one sandbox subprocess for the session, reset before each test."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_container import DEBIAN_PYTHON, Install
from tests.e2e.test_demo import free_port
from tests.e2e.test_lifecycle import SECRET_TOKEN, get, wait_until


@pytest.fixture(scope="session")
def sandbox_process() -> Iterator[str]:
    """``python -m proxy.sandbox`` on a free port (started once: its start-up, imports and
    seeded data cost more than most of the tests using it); its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.sandbox", "--port", str(port), "--token", SECRET_TOKEN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get(f"{url}/_sandbox/stats")[0] == 200)
        yield url
    finally:
        proc.kill()  # a test double: no need to wait for its own drain
        proc.wait(10)


@pytest.fixture
def sandbox_url(sandbox_process: str) -> str:
    """The session's sandbox as new: counters, faults and rate windows cleared, the records
    seeded again (``POST /_sandbox/reset?data=1``)."""
    reset = urllib.request.Request(f"{sandbox_process}/_sandbox/reset?data=1", method="POST")
    with urllib.request.urlopen(reset, timeout=10) as r:
        assert r.status == 200
    return sandbox_process


@pytest.fixture(scope="session")
def installs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Install]]:
    """The image's install of the lock with this Python and with Debian's, both at once, in
    the background: each is ~15 s of one core's unpacking and compiling."""
    started = {sys.executable: Install(tmp_path_factory.mktemp("image"), sys.executable)}
    if Path(DEBIAN_PYTHON).exists():
        started[DEBIAN_PYTHON] = Install(tmp_path_factory.mktemp("debian"), DEBIAN_PYTHON)
    yield started
    for install in started.values():
        install.stop()


@pytest.fixture(scope="session", autouse=True)
def _installs_early(request: pytest.FixtureRequest) -> None:
    """Start the installs with the session's first e2e test when a test that needs them is
    selected: they run beside the e2e tests before them (mostly waiting on subprocesses)
    instead of being waited for by test_container.py."""
    if any("installs" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("installs")
