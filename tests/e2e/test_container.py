"""The Dockerfile's own install and start commands, run in a clean virtual environment.

The test suite runs no container engine, so this is how a green test run says the image would
start: the files the Dockerfile copies, its RUN line, its ENV, its ENTRYPOINT and CMD and its
HEALTHCHECK command, each taken from the Dockerfile itself rather than restated here. The real
build (podman on a debootstrap base) and the same checks in the built image are
scripts/image-check, which CI runs after the tests (docs/container.md).
"""

from __future__ import annotations

import importlib.util
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
from collections.abc import Callable
from itertools import product
from pathlib import Path
from types import ModuleType

import pytest
from packaging.markers import Marker
from packaging.specifiers import SpecifierSet

from tests.e2e.test_demo import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV = "/opt/kounta-proxy"
OFFICIAL_BASE = "python:3.11.13-slim-bookworm"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of every stage in order, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    found = [line.split(" ", 1) for line in lines if line and not line.startswith("#")]
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "") for parts in found]


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each FROM stage (the global ARGs before the first FROM left out)."""
    found: list[list[tuple[str, str]]] = []
    for inst, args in instructions():
        if inst == "FROM":
            found.append([])
        if found:
            found[-1].append((inst, args))
    return found


def one(name: str) -> str:
    values = [args for inst, args in stages()[-1] if inst == name]
    assert values, f"no {name} in the final stage of the Dockerfile"
    return values[-1]


def without_flags(args: str) -> str:
    """A RUN line without its --mount=... flags."""
    return re.sub(r"^(--\S+\s+)+", "", args)


def container_env(venv: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for inst, args in stages()[-1]:
        if inst == "ENV" and "=" in args:
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    env["PATH"] = env["PATH"].replace(VENV, str(venv)).replace("$PATH", os.environ["PATH"])
    return env


def image_file(path: str) -> Path:
    """The repository file the final stage COPYs to ``path`` in the image."""
    for inst, args in stages()[-1]:
        if inst == "COPY" and "--from" not in args:
            *sources, dest = args.split()
            if dest == path:
                assert len(sources) == 1
                return ROOT / sources[0]
    raise AssertionError(f"nothing is copied to {path} in the final stage")


def healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "scripts/healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def normal(requirement: str) -> str:
    """PEP 503 name normalisation, so prometheus_client==1 and prometheus-client==1 match."""
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}"


def locked() -> list[tuple[str, Marker | None]]:
    """(name==version, environment marker or None) of every requirement in requirements.lock."""
    text = re.sub(r"\\\n", " ", (ROOT / "requirements.lock").read_text())
    found = []
    for line in text.splitlines():
        line = line.split("--hash", 1)[0].strip()
        if line and not line.startswith("#"):
            pin, _, marker = line.partition(";")
            found.append((normal(pin.strip()), Marker(marker) if marker.strip() else None))
    return found


def lock_lines(environment: dict[str, str] | None = None) -> list[str]:
    """The pins of requirements.lock that apply to ``environment`` (default: this Python)."""
    return [pin for pin, marker in locked() if marker is None or marker.evaluate(environment)]


# PEP 508's marker variables of the Python that runs this (packaging.markers.default_environment,
# which cannot be imported there: a bare venv has no packaging).
MARKER_ENVIRONMENT = """
import json, os, platform, sys
info = sys.implementation.version
version = f"{info.major}.{info.minor}.{info.micro}"
if info.releaselevel != "final":
    version += info.releaselevel[0] + str(info.serial)
print(json.dumps({
    "implementation_name": sys.implementation.name,
    "implementation_version": version,
    "os_name": os.name,
    "platform_machine": platform.machine(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
}))
"""


def test_the_lock_pins_the_declared_dependencies() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {pin for pin, _ in locked()}
    for requirement in declared:
        assert normal(requirement) in pinned, f"{requirement} not in requirements.lock: ./dev lock"


def test_the_lock_pins_the_fast_extra() -> None:
    # The image runs on uvloop: ./dev lock compiles with --extra fast, markers kept.
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = dict(locked())
    for requirement in extra["fast"]:
        pin, _, marker = requirement.partition(";")
        assert normal(pin.strip()) in pinned, f"{pin} not in requirements.lock: ./dev lock"
        locked_marker = pinned[normal(pin.strip())]
        assert locked_marker is not None
        for platform, implementation in product(("linux", "darwin", "win32"), ("CPython", "PyPy")):
            env = {"sys_platform": platform, "platform_python_implementation": implementation}
            assert locked_marker.evaluate(env) == Marker(marker).evaluate(env), env


def test_the_lock_keeps_markers_for_every_admitted_python() -> None:
    # redis needs async-timeout below 3.11.3 only: a lock frozen on one Python drops or forces it.
    [(_, marker)] = [(pin, m) for pin, m in locked() if pin.startswith("async-timeout==")]
    assert marker is not None
    assert marker.evaluate({"python_full_version": "3.11.2", "python_version": "3.11"})
    assert not marker.evaluate({"python_full_version": "3.11.7", "python_version": "3.11"})


def test_every_lock_line_has_a_hash() -> None:
    text = re.sub(r"\\\n", " ", (ROOT / "requirements.lock").read_text())
    pins = [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert pins
    for line in pins:
        assert "--hash=sha256:" in line, line.split()[0]
    assert "index-url" not in text and "file://" not in text  # no index of this machine


@pytest.mark.slow
def test_the_lock_matches_pyproject() -> None:
    # uv compiles pyproject.toml again, keeping the file's pins (network: the package index).
    # The uv of the environment running the tests (a dev extra), so ./dev installs nothing.
    assert (Path(sys.prefix) / "bin" / "uv").exists(), "no uv here: pip install -e '.[dev]'"
    done = subprocess.run(
        [str(ROOT / "dev"), "lock", "--check"],
        env={**os.environ, "VENV": sys.prefix},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_base_is_an_argument_defaulting_to_the_official_image() -> None:
    # CI builds on a local debootstrap base (--build-arg BASE=...); real builds on the official one.
    args = [args for inst, args in instructions()[:1] if inst == "ARG"]
    assert args == [f"BASE={OFFICIAL_BASE}"]
    froms = [stage[0][1] for stage in stages()]
    assert froms == ["${BASE} AS build", "${BASE}"]
    # Both bases: the official image's python is in /usr/local/bin, Debian's in /usr/bin and
    # without a `python` command, so the build uses python3 and the image its venv's python.
    assert "python3 -m venv" in without_flags(
        next(args for inst, args in stages()[0] if inst == "RUN" and "pip install" in args)
    )


def test_no_volume_instruction_makes_anonymous_volumes() -> None:
    # VOLUME would create an anonymous volume on every `docker run` that nobody removes; the
    # state directory is mounted by the deployment instead (docs/container.md).
    assert [args for inst, args in instructions() if inst == "VOLUME"] == []


def test_entrypoint_is_the_command_and_serve_the_default() -> None:
    # `docker run IMAGE authorize --paste` must reach the authorize command.
    assert json.loads(one("ENTRYPOINT")) == ["kounta-proxy"]
    assert json.loads(one("CMD")) == ["serve"]


def test_dockerignore_lets_every_copied_file_through() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for stage in stages():
        for inst, args in stage:
            if inst == "COPY" and "--from" not in args:
                for source in args.split()[:-1]:
                    assert source.rstrip("/") in allowed, f"{source} is left out by .dockerignore"


FakeProc = Callable[..., Path]


@pytest.fixture
def fake_proc(tmp_path: Path) -> FakeProc:
    """A /proc with a PID 1 whose command line and working directory a test chooses."""

    def make(*args: str, cwd: Path) -> Path:
        proc = tmp_path / "proc"
        (proc / "1").mkdir(parents=True)
        (proc / "1" / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in args))
        (proc / "1" / "cwd").symlink_to(cwd)
        return proc

    return make


def write_admin(path: Path, **admin: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} = {json.dumps(v)}" for k, v in admin.items()]
    path.write_text("[server]\nport = 8080\n\n[admin]\n" + "\n".join(lines) + "\n")
    return path


def test_healthcheck_admin_address_precedence(tmp_path: Path, fake_proc: FakeProc) -> None:
    health = healthcheck_module()
    workdir = tmp_path / "etc"
    write_admin(workdir / "kounta-proxy.toml", port=9470)
    no_proc = tmp_path / "no-proc"
    # The file in the working directory, when PID 1 is not the proxy (and on a developer's host).
    assert health.admin_url({}, no_proc, workdir) == "http://127.0.0.1:9470/healthz"
    # The environment wins over the file, as in the proxy.
    env = {"KOUNTA_PROXY_ADMIN__PORT": "9471", "KOUNTA_PROXY_ADMIN__HOST": "0.0.0.0"}
    assert health.admin_url(env, no_proc, workdir) == "http://127.0.0.1:9471/healthz"
    # Neither: the proxy's default.
    assert health.admin_url({}, no_proc, tmp_path / "empty") == "http://127.0.0.1:9464/healthz"
    # A wildcard or a named host from the file.
    write_admin(workdir / "v6.toml", host="::", port=9472)
    write_admin(workdir / "named.toml", host="10.1.2.3", port=9473)
    proc = fake_proc("/opt/kounta-proxy/bin/python", "/opt/kounta-proxy/bin/kounta-proxy",
                     "serve", "--config", "v6.toml", cwd=workdir)  # fmt: skip
    assert health.admin_url({}, proc, tmp_path) == "http://[::1]:9472/healthz"


@pytest.mark.parametrize(
    "argv",
    [
        ["kounta-proxy", "serve", "--config", "/run/config/proxy.toml"],
        ["kounta-proxy", "serve", "--config=/run/config/proxy.toml"],
        # docker run --init: PID 1 is the init, which runs the proxy with the same arguments.
        ["/sbin/docker-init", "--", "kounta-proxy", "serve", "--config", "/run/config/proxy.toml"],
    ],
)
def test_healthcheck_reads_the_file_the_main_process_was_given(
    tmp_path: Path,
    fake_proc: FakeProc,
    argv: list[str],
) -> None:
    health = healthcheck_module()
    config = write_admin(tmp_path / "run/config/proxy.toml", port=9474)
    proc = fake_proc(*[a.replace("/run/", f"{tmp_path}/run/") for a in argv], cwd=tmp_path)
    assert health.config_path(proc, Path("/elsewhere")) == config
    assert health.admin_url({}, proc, Path("/elsewhere")) == "http://127.0.0.1:9474/healthz"


def test_healthcheck_ignores_a_main_process_that_is_not_the_proxy_serving(
    tmp_path: Path,
    fake_proc: FakeProc,
) -> None:
    health = healthcheck_module()
    proc = fake_proc("kounta-proxy", "authorize", "--config", "other.toml", cwd=tmp_path)
    assert health.config_path(proc, tmp_path / "w") == tmp_path / "w" / "kounta-proxy.toml"


class Install:
    """The build stage's COPY and install lines run with one Python, in the background."""

    def __init__(self, tmp_path: Path, python: str) -> None:
        # COPY: exactly the files the build stage copies into its WORKDIR (/src).
        src = tmp_path / "src"
        src.mkdir(parents=True)
        build = stages()[0]
        copies = [args.split() for inst, args in build if inst == "COPY" and "--from" not in args]
        for *sources, dest in copies:
            assert not dest.startswith("/"), dest
            for name in sources:
                target = src / dest / name if dest.endswith("/") else src / dest
                if (ROOT / name).is_dir():
                    ignore = shutil.ignore_patterns("__pycache__")
                    shutil.copytree(ROOT / name, target, ignore=ignore)
                else:
                    shutil.copy(ROOT / name, target)
        # RUN: the build stage's install line, with the venv in a temporary place.
        install = without_flags(
            next(args for inst, args in build if inst == "RUN" and "pip install" in args)
        )
        assert "--require-hashes -r requirements.lock" in install
        assert "--no-deps ." in install
        self.venv = tmp_path / "venv"
        command = install.replace(VENV, str(self.venv))
        command = command.replace("python3 -m venv", f"{python} -m venv")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            shell=True,
            cwd=src,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def venv_made(self) -> Path:
        """Wait for the install; its venv (the test fails with pip's last words otherwise)."""
        running = self.process.poll() is None
        try:
            _, stderr = self.process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        assert self.process.returncode == 0, stderr[-2000:]
        if running:  # else it ended before it was asked for, in less than the time since
            assert time.monotonic() - self.started < 150
        return self.venv

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


DEBIAN_PYTHON = "/usr/bin/python3"


def installed(venv: Path) -> list[str]:
    frozen = subprocess.run(
        [str(venv / "bin" / "pip"), "freeze", "--exclude", "kounta-proxy"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return sorted(normal(line) for line in frozen.stdout.split())


@pytest.mark.slow
def test_the_lock_installs_on_debians_python(installs: dict[str, Install]) -> None:
    # The oldest Python the machine can get: Debian's own (bookworm: 3.11.2, below the 3.11.3
    # that redis's async-timeout marker splits on). ./dev check installs python3-venv for it.
    if not Path(DEBIAN_PYTHON).exists():
        pytest.skip(f"no Debian python3 ({DEBIAN_PYTHON}) here: the lock was installed on "
                    f"{sys.version.split()[0]} only")  # fmt: skip
    version = subprocess.run(
        [DEBIAN_PYTHON, "-c", MARKER_ENVIRONMENT], capture_output=True, text=True, timeout=30
    )
    environment = json.loads(version.stdout)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    if not SpecifierSet(requires).contains(environment["python_full_version"]):
        pytest.skip(f"Debian's python3 is {environment['python_full_version']}, not {requires}")
    venv = installs[DEBIAN_PYTHON].venv_made()
    assert installed(venv) == sorted(lock_lines(environment)), "run: ./dev lock"
    checked = subprocess.run(
        [str(venv / "bin" / "pip"), "check"], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout
    started = subprocess.run(
        [str(venv / "bin" / "kounta-proxy"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("kounta-proxy ")


@pytest.mark.slow
def test_the_image_installs_and_starts(tmp_path: Path, installs: dict[str, Install]) -> None:
    venv = installs[sys.executable].venv_made()
    # Pinned: what got installed is exactly requirements.lock, transitive packages included.
    assert installed(venv) == sorted(lock_lines()), "run: ./dev lock"
    # RUN: pip and setuptools leave the environment; everything below runs without them.
    uninstall = next(
        args for inst, args in stages()[0] if inst == "RUN" and "pip uninstall" in args
    )
    done = subprocess.run(
        uninstall.replace(VENV, str(venv)), shell=True, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    left = [p for p in venv.glob("lib/*/site-packages/*") if p.name in ("pip", "setuptools")]
    assert left == [] and not (venv / "bin" / "pip").exists()
    # ENV: the state volume and wildcard listeners; the ports are left to the settings file.
    env = container_env(venv)
    assert env["KOUNTA_PROXY_STATE_DIR"] == "/var/lib/kounta-proxy"
    assert env["KOUNTA_PROXY_SERVER__HOST"] == env["KOUNTA_PROXY_ADMIN__HOST"] == "0.0.0.0"
    assert "KOUNTA_PROXY_ADMIN__PORT" not in env
    assert "KOUNTA_PROXY_SERVER__PORT" not in env
    # A sidecar keeps serving 5 s after SIGTERM (docs/container.md); shortened here.
    assert env["KOUNTA_PROXY_SERVER__DRAIN_DELAY"] == "5"
    # The settings file in the image's WORKDIR sets the ports (free ones here); the hosts are
    # made loopback through the environment: this test must not listen beyond the machine.
    workdir = tmp_path / one("WORKDIR").lstrip("/")
    admin_port = free_port()
    workdir.mkdir(parents=True)
    (workdir / "kounta-proxy.toml").write_text(
        f"[server]\nport = {free_port()}\n\n[admin]\nport = {admin_port}\n"
    )
    env.update(
        KOUNTA_PROXY_STATE_DIR=str(tmp_path / "state"),
        KOUNTA_PROXY_SERVER__HOST="127.0.0.1",
        KOUNTA_PROXY_ADMIN__HOST="127.0.0.1",
        KOUNTA_PROXY_ACCOUNTS__MAIN__TOKEN="container-test-token",
        KOUNTA_PROXY_SERVER__DRAIN_DELAY="0.5",
    )
    # ENTRYPOINT + arguments: any command, e.g. authorize (--paste: no listener in a container).
    entrypoint = json.loads(one("ENTRYPOINT"))
    executable = str(venv / "bin" / entrypoint[0])
    helped = subprocess.run(
        [executable, "authorize", "--help"], env=env, capture_output=True, text=True, timeout=30
    )
    assert helped.returncode == 0, helped.stderr
    assert "--paste" in helped.stdout
    check = subprocess.run(
        [executable, "check-config", "--json"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    settings = json.loads(check.stdout)
    assert settings["accounts"]["main"]["token"] == "********"
    assert settings["admin"]["port"] == admin_port
    # ENTRYPOINT + CMD: serve, from the WORKDIR.
    proc = subprocess.Popen(
        [executable, *entrypoint[1:], *json.loads(one("CMD"))],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
    )
    # HEALTHCHECK: the image's own command, with the image's python and the script it copies.
    health = json.loads(one("HEALTHCHECK").split("CMD", 1)[1])
    assert health[0] == "python"
    probe_command = [str(venv / "bin" / "python"), str(image_file(health[1])), *health[2:]]
    try:

        def probe() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                probe_command, env=env, cwd=workdir, capture_output=True, text=True, timeout=10
            )

        healthy = False
        deadline = time.monotonic() + 20
        while not healthy and time.monotonic() < deadline:
            healthy = probe().returncode == 0
            time.sleep(0.2)
        assert healthy, "the HEALTHCHECK command never passed"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        stopped = probe()
        assert stopped.returncode == 1
        assert f"127.0.0.1:{admin_port}/healthz" in stopped.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert '"event":"started"' in err
    assert '"event_loop":"uvloop"' in err  # the lock's fast extra: the image runs on uvloop
    assert f'"admin":"127.0.0.1:{admin_port}"' in err
    assert "container-test-token" not in err
