"""The installed command, started the way a user starts it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

COMMAND = shutil.which("kounta-proxy") or str(Path(sys.executable).parent / "kounta-proxy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 20) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if re.search(pattern, line):
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no line matching {pattern!r} (exit {proc.poll()})")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port, sandbox_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            COMMAND,
            "demo",
            "--port",
            str(port),
            "--sandbox-port",
            str(sandbox_port),
            "--state-dir",
            str(tmp_path / "state"),
            "--webhook-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # an ordinary HTTP client
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.slow
def test_demo_prints_a_working_curl_line_and_stops_on_sigterm(
    demo: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = demo
    started = wait_for_line(proc, r"sandbox on http://")
    line = wait_for_line(proc, r"curl -i http://")
    url = re.search(r"(http://\S+)", line)
    assert url is not None
    status, headers, body = get(url.group(1))
    assert status == 200
    assert json.loads(body)["id"] == 5001

    status, headers, body = get(f"http://127.0.0.1:{port}/v1/companies/5001/products.json")
    assert status == 200
    assert len(json.loads(body)) == 25
    next_page = headers["X-Next-Page"]
    assert next_page.startswith(f"http://127.0.0.1:{port}/v1/"), next_page
    status, _, body = get(next_page)
    assert status == 200
    assert len(json.loads(body)) == 25

    status, _, body = get(f"http://127.0.0.1:{port}/v1/../secret")
    assert status in (400, 404)
    assert "error" in json.loads(body)

    # A change made elsewhere (at a till) arrives through the demo's own webhook: the next
    # reads show it, and the background refetch makes them HITs again.
    sandbox = re.search(r"sandbox on (http://\S+),", started)
    assert sandbox is not None
    product = f"http://127.0.0.1:{port}/v1/companies/5001/products/100001.json"
    assert get(product)[1]["X-Cache"] == "MISS"
    status, headers, body = get(product)
    assert (status, headers["X-Cache"]) == (200, "HIT")
    assert "detail=webhooks" in headers["Cache-Status"]
    old = json.loads(body)["updated_at"]
    touch = urllib.request.Request(
        f"{sandbox.group(1)}/_sandbox/touch",
        data=json.dumps({"kind": "products", "id": 100001}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(touch, timeout=10) as r:
        assert r.status == 204
    touched = time.monotonic()
    while True:
        _, headers, body = get(product)
        if json.loads(body)["updated_at"] != old and headers["X-Cache"] == "HIT":
            break
        assert time.monotonic() - touched < 5, "the change did not arrive"
        time.sleep(0.02)
    print(f"demo: a change at a till answered as a HIT after {time.monotonic() - touched:.3f} s")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert proc.stderr is not None
    logs = proc.stderr.read().splitlines()
    events = [json.loads(entry)["event"] for entry in logs if entry.startswith("{")]
    assert "request" in events
    assert "shutdown" in events
    assert not any("Traceback" in entry for entry in logs)


@pytest.mark.slow
def test_demo_on_a_busy_port_exits_2_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                COMMAND,
                "demo",
                "--port",
                str(port),
                "--sandbox-port",
                str(free_port()),
                "--state-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"kounta-proxy: cannot listen on 127.0.0.1:{port}: the port is already in use"
    )
    assert "Traceback" not in result.stderr
