"""System tools the tests need from Debian's packages: ``prometheus`` (promtool, prometheus)
and ``redis-server``.

Installed with apt when missing (``./dev check`` installs them already); a test is skipped,
with the reason, only when the package cannot be installed here, and fails instead when
``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_tried: dict[str, str] = {}  # apt's outcome per package, tried once a run


def system_tool(name: str, package: str) -> str:
    """The path of command ``name`` from Debian package ``package``, installed if needed."""
    found = shutil.which(name)
    if found:
        return found
    if package not in _tried:
        _tried[package] = _install(package)
    found = shutil.which(name)
    if not found:
        why = f"{name} is not installed and apt could not install it: {_tried[package]}"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI installs it (./dev check): a missing tool there is a failure
        pytest.skip(why)
    return found


def prometheus_tool(name: str) -> str:
    """The path of ``promtool`` or ``prometheus``."""
    return system_tool(name, "prometheus")


def _install(package: str) -> str:
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return f"apt-get needs root (run: sudo apt-get install -y {package})"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", package],
        ):
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            if done.returncode != 0:
                return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get failed: {e}"
    return "installed"
