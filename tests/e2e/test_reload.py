"""SIGHUP reloads and SIGTERM's drain delay, through the real ``kounta-proxy serve``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_demo import COMMAND, free_port
from tests.e2e.test_lifecycle import (
    CALLER_KEY,
    SECRET_TOKEN,
    _refused,
    get,
    in_flight,
    post_json,
    wait_until,
)

NEW_KEY = "e2e-new-caller-key-do-not-log-0001"


def config_text(upstream: str, port: int, admin_port: int, **v: Any) -> str:
    return f"""
state_dir = {json.dumps(v["state"])}
[server]
host = "127.0.0.1"
port = {port}
{f"drain_delay = {v['drain']}" if "drain" in v else ""}
[admin]
port = {admin_port}
[upstream]
base_url = "{upstream}"
read_timeout = {v.get("read_timeout", 30)}
[log]
level = "{v.get("level", "debug")}"
[accounts.main]
mode = "static"
token = "{SECRET_TOKEN}"
rate_per_minute = {v.get("rate", 180)}
[callers.app]
key = "{v.get("key", CALLER_KEY)}"
"""


class Proxy:
    """``kounta-proxy serve`` with its log in a file, so it can be read while it runs."""

    def __init__(self, tmp_path: Path, upstream: str, **values: Any) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.upstream = upstream
        self.state = str(tmp_path / "state")
        self.config = tmp_path / "proxy.toml"
        self.log = tmp_path / "proxy.log"
        self.write(**values)
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [COMMAND, "serve", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        try:
            wait_until(lambda: get(f"{self.admin}/readyz")[0] == 200)
        except AssertionError:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(self.log.read_text()) from None

    def write(self, **values: Any) -> None:
        text = config_text(self.upstream, self.port, self.admin_port, state=self.state, **values)
        self.config.write_text(text)

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == name]

    def get(self, path: str, key: str) -> int:
        return get(f"{self.url}{path}", {"X-Proxy-Key": key})[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def proxy_factory(tmp_path: Path, sandbox_url: str) -> Iterator[Any]:
    started: list[Proxy] = []

    def make(**values: Any) -> Proxy:
        started.append(Proxy(tmp_path, sandbox_url, **values))
        return started[-1]

    yield make
    for proxy in started:
        proxy.stop()


def metric(admin: str, prefix: str) -> float:
    for line in get(f"{admin}/metrics")[1].decode().splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    raise AssertionError(f"no {prefix}")


@pytest.mark.slow
def test_sighup_reloads_live_settings_without_dropping_a_request(
    proxy_factory: Any, sandbox_url: str
) -> None:
    proxy = proxy_factory()
    assert proxy.get("/v1/companies/me.json", CALLER_KEY) == 200
    # A request in flight across the reload.
    assert post_json(f"{sandbox_url}/_sandbox/faults", {"latency": 1.5, "count": 1}) == 201
    slow: list[int] = []
    thread = threading.Thread(
        target=lambda: slow.append(proxy.get("/v1/companies/5001/sites.json", CALLER_KEY))
    )
    thread.start()
    wait_until(lambda: in_flight(proxy.admin) == 1)

    proxy.write(key=NEW_KEY, level="warning", rate=120, read_timeout=20)
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.named("reloaded"), timeout=5)
    thread.join(10)
    assert slow == [200]  # the in-flight request finished on its connection
    assert proxy.proc.poll() is None
    (line,) = proxy.named("reloaded")
    assert line["changed"] == [
        "accounts.main.rate_per_minute",
        "callers.app.key",
        "log.level",
    ]
    assert line["restart_needed"] == ["upstream.read_timeout"]
    assert line["level"] == "warning"  # something still needs a restart
    # Caller keys, the budget rate and the log level apply at once.
    assert proxy.get("/v1/companies/me.json", NEW_KEY) == 200
    # The previous key still works for inbound.key_overlap (rotation without downtime),
    # counted as such; the reload is counted as well.
    assert proxy.get("/v1/companies/me.json", CALLER_KEY) == 200
    retired = 'kounta_proxy_caller_retired_key_requests_total{caller="app"}'
    assert metric(proxy.admin, retired) == 1
    assert metric(proxy.admin, 'kounta_proxy_config_reloads_total{result="restart_needed"}') == 1
    assert metric(proxy.admin, 'kounta_proxy_budget_limit_per_minute{account="main"}') == 120
    requests_before = len(proxy.named("request"))
    assert proxy.get("/v1/companies/me.json", NEW_KEY) == 200
    assert len(proxy.named("request")) == requests_before  # info lines are off now

    # A bad file is refused with one line; the running settings stay.
    proxy.config.write_text("[server]\nport = 'eighty'\n[nonsense]\n")
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.named("reload_refused"), timeout=5)
    (refused,) = proxy.named("reload_refused")
    assert "server.port: must be an integer" in refused["error"]
    assert "nonsense: unknown key" in refused["error"]
    assert proxy.get("/v1/companies/me.json", NEW_KEY) == 200
    assert proxy.stop() == 0
    text = proxy.log.read_text()
    for secret in (SECRET_TOKEN, CALLER_KEY, NEW_KEY):
        assert secret not in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_drain_delay_serves_new_requests_after_sigterm_then_closes(proxy_factory: Any) -> None:
    proxy = proxy_factory(drain=1.5)
    sent = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: get(f"{proxy.admin}/readyz")[0] == 503, timeout=1)
    # Not ready, yet new connections are still answered during the delay.
    assert proxy.get("/v1/companies/me.json", CALLER_KEY) == 200
    assert time.monotonic() - sent < 1.2
    wait_until(lambda: _refused(proxy.port), timeout=5)
    assert time.monotonic() - sent >= 1.4
    assert proxy.proc.wait(10) == 0
    names = [e["event"] for e in proxy.events()]
    assert names.index("shutdown") < names.index("drain_delay_over") < names.index("stopped")


@pytest.mark.slow
def test_a_fifo_for_a_secret_is_refused_and_serving_goes_on(
    proxy_factory: Any, tmp_path: Path
) -> None:
    """A key_file that is a FIFO with no writer froze both listeners."""
    proxy = proxy_factory()
    assert proxy.get("/v1/companies/me.json", CALLER_KEY) == 200
    fifo = tmp_path / "key-fifo"
    os.mkfifo(fifo)
    text = proxy.config.read_text()
    proxy.config.write_text(text.replace(f'key = "{CALLER_KEY}"', f'key_file = "{fifo}"'))
    proxy.proc.send_signal(signal.SIGHUP)
    try:
        wait_until(lambda: proxy.named("reload_refused"), timeout=5)
        (refused,) = proxy.named("reload_refused")
        assert "callers.app.key_file" in refused["error"]
        assert "not a regular file (a FIFO)" in refused["error"]
        assert refused["kept"] == "running settings"
        # Both listeners answer, with the running settings.
        assert get(f"{proxy.admin}/readyz", timeout=3)[0] == 200
        assert get(f"{proxy.url}/v1/companies/me.json", {"X-Proxy-Key": CALLER_KEY}, 3)[0] == 200
    finally:
        with contextlib.suppress(OSError):  # the old code: a reader blocked in open()
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert proxy.stop() == 0
