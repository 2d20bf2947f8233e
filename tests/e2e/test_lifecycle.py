"""The real ``kounta-proxy serve`` as a subprocess: drain on SIGTERM, fail fast on start-up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_demo import COMMAND, free_port

SECRET_TOKEN = "e2e-account-token-do-not-log-1234"
CALLER_KEY = "e2e-caller-key-do-not-log-5678"


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_json(url: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.status


def wait_until(probe: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {probe}")


def write_config(tmp_path: Path, upstream: str, port: int, admin_port: int, **extra: str) -> Path:
    state = extra.pop("state_dir", str(tmp_path / "state"))
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
state_dir = {json.dumps(state)}
[server]
host = "127.0.0.1"
port = {port}
shutdown_grace = {extra.pop("grace", "10.0")}
[admin]
port = {admin_port}
[upstream]
base_url = "{upstream}"
[log]
level = "debug"
format = "{extra.pop("log_format", "json")}"
[accounts.main]
mode = "static"
token = "{SECRET_TOKEN}"
[callers.app]
key = "{CALLER_KEY}"
"""
    )
    return config


def start_serve(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [COMMAND, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def in_flight(admin: str) -> float:
    _, text = get(f"{admin}/metrics")
    for line in text.decode().splitlines():
        if line.startswith("kounta_proxy_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path: Path, sandbox_url: str) -> None:
    port, admin_port = free_port(), free_port()
    proc = start_serve(write_config(tmp_path, sandbox_url, port, admin_port))
    proxy, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        wait_until(lambda: get(f"{admin}/readyz")[0] == 200)
        assert post_json(f"{sandbox_url}/_sandbox/faults", {"latency": 1.5, "count": 3}) == 201
        results: list[tuple[int, bytes]] = []
        auth = {"X-Proxy-Key": CALLER_KEY, "Authorization": "Bearer caller-own-secret"}

        def slow(i: int) -> None:
            results.append(get(f"{proxy}/v1/companies/5001/products.json?slow={i}", auth))

        threads = [threading.Thread(target=slow, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: in_flight(admin) == 3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # Readiness turns false at once, while the in-flight requests are still running.
        wait_until(lambda: get(f"{admin}/readyz")[0] == 503, timeout=1)
        _, body = get(f"{admin}/readyz")
        assert json.loads(body)["failing"] == ["shutdown"]
        # The proxy port no longer accepts new connections.
        wait_until(lambda: _refused(port), timeout=1)
        for t in threads:
            t.join(10)
        code = proc.wait(15)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert code == 0, err
    assert [s for s, _ in results] == [200, 200, 200]
    assert all(json.loads(b) for _, b in results)
    assert elapsed < 10
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.index("started") < names.index("shutdown") < names.index("stopped")
    assert next(e for e in events if e["event"] == "shutdown")["signal"] == "SIGTERM"
    served = [e for e in events if e["event"] == "request" and e["status"] == 200]
    assert len(served) == 3
    assert all(e["upstream_ms"] >= 1400 and e["ms"] >= e["upstream_ms"] for e in served)
    # Debug level, and still no secret anywhere in the log.
    for secret in (SECRET_TOKEN, CALLER_KEY, "caller-own-secret"):
        assert secret not in err


def test_requests_longer_than_the_grace_are_cut_and_exit_is_still_0(
    tmp_path: Path, sandbox_url: str
) -> None:
    port, admin_port = free_port(), free_port()
    proc = start_serve(write_config(tmp_path, sandbox_url, port, admin_port, grace="0.5"))
    admin = f"http://127.0.0.1:{admin_port}"
    outcome: list[object] = []
    try:
        wait_until(lambda: get(f"{admin}/readyz")[0] == 200)
        post_json(f"{sandbox_url}/_sandbox/faults", {"latency": 5, "count": 1})

        def slow() -> None:
            try:
                outcome.append(
                    get(
                        f"http://127.0.0.1:{port}/v1/companies/me.json", {"X-Proxy-Key": CALLER_KEY}
                    )[0]
                )
            except OSError as e:
                outcome.append(type(e).__name__)

        thread = threading.Thread(target=slow)
        thread.start()
        wait_until(lambda: in_flight(admin) == 1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        elapsed = time.monotonic() - sent
        thread.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    assert code == 0
    assert elapsed < 3, elapsed  # 0.5 s grace (+ as long again for the cancelled handler)
    assert outcome and outcome[0] != 200


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_sigint_on_an_idle_proxy_exits_0_with_text_logs(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, "http://127.0.0.1:9", port, admin_port, log_format="text")
    proc = start_serve(config)
    try:
        wait_until(lambda: get(f"http://127.0.0.1:{admin_port}/healthz")[0] == 200)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert code == 0, err
    lines = err.splitlines()
    assert any(" started " in line and f"listen=127.0.0.1:{port}" in line for line in lines)
    assert any(" shutdown " in line and "signal=SIGINT" in line for line in lines)
    assert SECRET_TOKEN not in err and CALLER_KEY not in err


def _occupied() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("which", ["server", "admin"])
def test_occupied_port_fails_fast_with_one_line(tmp_path: Path, which: str) -> None:
    for busy in _occupied():
        port, admin_port = (busy, free_port()) if which == "server" else (free_port(), busy)
        proc = start_serve(write_config(tmp_path, "http://127.0.0.1:9", port, admin_port))
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 2, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("kounta-proxy: ")
        assert f"127.0.0.1:{busy}" in last and "already in use" in last
        if which == "admin":
            assert "admin listener" in last
        assert "Traceback" not in err


def test_unwritable_state_dir_fails_fast_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    config = write_config(
        tmp_path, "http://127.0.0.1:9", free_port(), free_port(), state_dir=str(blocker / "state")
    )
    proc = start_serve(config)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [
        f"kounta-proxy: state_dir {blocker / 'state'} is not a writable directory: Not a directory"
    ]


def test_bad_admin_setting_fails_fast_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[admin]\nport = "metrics"\n[accounts.main]\ntoken = "x"\n')
    proc = start_serve(config)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert err.strip() == "kounta-proxy: config error: admin.port: must be an integer, got a string"
