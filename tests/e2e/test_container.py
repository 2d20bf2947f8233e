"""The Dockerfile's own install and start commands, run in a clean virtual environment.

No Docker engine runs in CI, so this is how a green CI says the image would start: the
files the Dockerfile copies, its RUN line, its ENV, its ENTRYPOINT and its HEALTHCHECK
command, each taken from the Dockerfile itself rather than restated here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.e2e.test_demo import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV = "/opt/kounta-proxy"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage and the build stage, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    found = [line.split(" ", 1) for line in lines if line and not line.startswith("#")]
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "") for parts in found]


def one(name: str) -> str:
    values = [args for inst, args in instructions() if inst == name]
    assert values, f"no {name} in the Dockerfile"
    return values[-1]


def container_env(venv: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for inst, args in instructions():
        if inst == "ENV" and "=" in args:
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    env["PATH"] = env["PATH"].replace(VENV, str(venv)).replace("$PATH", os.environ["PATH"])
    return env


def normal(requirement: str) -> str:
    """PEP 503 name normalisation, so prometheus_client==1 and prometheus-client==1 match."""
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}"


def lock_lines() -> list[str]:
    text = (ROOT / "requirements.lock").read_text()
    return [normal(line) for line in text.splitlines() if line and not line.startswith("#")]


def test_the_lock_pins_the_declared_dependencies() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = set(lock_lines())
    for requirement in declared:
        assert normal(requirement) in pinned, f"{requirement} not in requirements.lock: make lock"


@pytest.mark.slow
def test_the_image_installs_and_starts(tmp_path: Path) -> None:
    # COPY: exactly the files the Dockerfile copies into /src.
    src = tmp_path / "src"
    src.mkdir()
    copies = [
        args.split() for inst, args in instructions() if inst == "COPY" and "--from" not in args
    ]
    for *sources, dest in copies:
        for name in sources:
            target = src / dest / name if dest.endswith("/") else src / dest
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / name, target)
    # RUN: the build stage's install line, with the venv in a temporary place.
    install = next(args for inst, args in instructions() if inst == "RUN" and "pip install" in args)
    venv = tmp_path / "venv"
    command = install.replace(VENV, str(venv)).replace(
        "python -m venv", f"{sys.executable} -m venv"
    )
    started = time.monotonic()
    done = subprocess.run(command, shell=True, cwd=src, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 120
    # Pinned: what got installed is exactly requirements.lock, transitive packages included.
    frozen = subprocess.run(
        [str(venv / "bin" / "pip"), "freeze", "--exclude", "kounta-proxy"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    installed = sorted(normal(line) for line in frozen.stdout.split())
    assert installed == sorted(lock_lines()), "run: make lock"
    # ENTRYPOINT + ENV: the image's start command, state volume and listeners (ports made free
    # and loopback here: this test must not listen beyond the machine).
    entrypoint = json.loads(one("ENTRYPOINT"))
    assert entrypoint == ["kounta-proxy", "serve"]
    env = container_env(venv)
    assert env["KOUNTA_PROXY_STATE_DIR"] == "/var/lib/kounta-proxy"
    assert env["KOUNTA_PROXY_SERVER__HOST"] == env["KOUNTA_PROXY_ADMIN__HOST"] == "0.0.0.0"
    admin_port = free_port()
    env.update(
        KOUNTA_PROXY_STATE_DIR=str(tmp_path / "state"),
        KOUNTA_PROXY_SERVER__HOST="127.0.0.1",
        KOUNTA_PROXY_SERVER__PORT=str(free_port()),
        KOUNTA_PROXY_ADMIN__HOST="127.0.0.1",
        KOUNTA_PROXY_ADMIN__PORT=str(admin_port),
        KOUNTA_PROXY_ACCOUNTS__MAIN__TOKEN="container-test-token",
    )
    executable = str(venv / "bin" / entrypoint[0])
    check = subprocess.run(
        [executable, "check-config", "--json"], env=env, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["accounts"]["main"]["token"] == "********"
    proc = subprocess.Popen(
        [executable, *entrypoint[1:]], env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        # HEALTHCHECK: the image's own command, with the image's python.
        health = json.loads(one("HEALTHCHECK").split("CMD", 1)[1])
        assert health[0] == "python"
        healthy = False
        deadline = time.monotonic() + 20
        while not healthy and time.monotonic() < deadline:
            probe = subprocess.run(
                [str(venv / "bin" / "python"), *health[1:]],
                env=env,
                capture_output=True,
                timeout=10,
            )
            healthy = probe.returncode == 0
            time.sleep(0.2)
        assert healthy, "the HEALTHCHECK command never passed"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert '"event":"started"' in err
    assert "container-test-token" not in err
