"""Real ``redis-server`` processes for the tests: on free loopback ports, in temp dirs, no
persistence. Never a shared system instance (tests stop and restart theirs) and never a fake.

- ``redis_server`` (session): one server for the whole run; each test keeps to its own
  ``key_prefix`` (fixture ``redis_prefix``), so sharing it is safe.
- ``redis_proc`` (function): a server of the test's own that it may ``stop()`` and
  ``start()`` again on the same port.

``redis-server`` comes from Debian's package (``./dev check`` installs it). When it is missing
it is installed with apt if possible; otherwise the test is skipped, or fails when ``CI`` is set.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ops_tools import system_tool

# Every ``backend = "redis"`` setup needs ``shared.token_key`` (tokens are encrypted and cache
# records and messages authenticated with it): the tests' one key (a Fernet key, not secret).
TOKEN_KEY = "G6lVdQ8yOXcSi9q3IPa7dxUiZ1r9JTJOOjRbySCXGHs="


def redis_server_path() -> str:
    return system_tool("redis-server", "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1; ``stop()`` and ``start()`` keep the port."""

    def __init__(self, directory: Path, password: str = "") -> None:
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            redis_server_path(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so tests can share the session server."""
    return f"test-{uuid.uuid4().hex[:10]}"
