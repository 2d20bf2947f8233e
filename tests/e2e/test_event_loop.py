"""``server.event_loop``: the real ``kounta-proxy serve`` under each choice says which loop
runs (the ``started`` log line and ``kounta_proxy_build_info``), and "uvloop" without uvloop
is one start-up line (docs/configuration.md)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_demo import COMMAND, free_port
from tests.e2e.test_lifecycle import CALLER_KEY, get, wait_until, write_config

pytest.importorskip("uvloop", reason="the dev extra installs kounta-proxy[fast] (uvloop)")

BUILD_INFO = re.compile(r"^kounta_proxy_build_info\{([^}]*)\} 1\.0$", re.MULTILINE)


def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment where ``import uvloop`` fails, as on a machine without the extra: a
    package of that name first on the path that raises ImportError."""
    shadow = tmp_path / "no-uvloop" / "uvloop"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("uvloop is not installed here")\n')
    return {"PYTHONPATH": str(shadow.parent)}


def serve(config: Path, choice: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [COMMAND, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "KOUNTA_PROXY_SERVER__EVENT_LOOP": choice,
            **(env or {}),
        },
    )


def loop_reported(tmp_path: Path, upstream: str, choice: str, env: dict[str, str] | None) -> str:
    """Serve under ``choice``, answer one request through the sandbox, stop; the loop named by
    the build_info metric (which must agree with the ``started`` line)."""
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, upstream, port, admin_port)
    proc = serve(config, choice, env)
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        wait_until(lambda: get(f"{admin}/readyz")[0] == 200)
        status, _ = get(
            f"http://127.0.0.1:{port}/v1/companies/me.json", {"X-Proxy-Key": CALLER_KEY}
        )
        assert status == 200
        _, metrics = get(f"{admin}/metrics")
        [labels] = BUILD_INFO.findall(metrics.decode())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    [started] = [
        e
        for e in (json.loads(line) for line in err.splitlines() if line.startswith("{"))
        if e["event"] == "started"
    ]
    label = dict(re.findall(r'(\w+)="([^"]*)"', labels))["event_loop"]
    assert started["event_loop"] == label
    return label


@pytest.mark.slow
@pytest.mark.parametrize(
    ("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")]
)
def test_serve_reports_the_loop_it_runs_on(
    tmp_path: Path, sandbox_url: str, choice: str, expected: str
) -> None:
    assert loop_reported(tmp_path, sandbox_url, choice, None) == expected


@pytest.mark.slow
def test_auto_without_uvloop_runs_on_asyncio(tmp_path: Path, sandbox_url: str) -> None:
    assert loop_reported(tmp_path, sandbox_url, "auto", without_uvloop(tmp_path)) == "asyncio"


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_uvloop_required_but_missing_is_one_line(tmp_path: Path, command: str) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", free_port(), free_port())
    done = subprocess.run(
        [COMMAND, command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "KOUNTA_PROXY_SERVER__EVENT_LOOP": "uvloop",
            **without_uvloop(tmp_path),
        },
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "kounta-proxy: config error: server.event_loop: is 'uvloop' but uvloop is not "
        "installed: pip install 'kounta-proxy[fast]', or set it to 'auto' or 'asyncio'"
    ]
    assert "Traceback" not in done.stderr


def test_an_unknown_loop_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", free_port(), free_port())
    done = subprocess.run(
        [COMMAND, "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KOUNTA_PROXY_SERVER__EVENT_LOOP": "trio"},
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "kounta-proxy: config error: KOUNTA_PROXY_SERVER__EVENT_LOOP (server.event_loop): "
        "must be one of 'auto', 'asyncio', 'uvloop', got 'trio'"
    ]
