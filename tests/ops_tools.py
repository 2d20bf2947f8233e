"""Operations tools the tests need: Debian's ``prometheus`` package (promtool, prometheus).

Installed with apt when missing (CI installs it in ``.ci/run`` already); a test is
skipped, with the reason, only when the package cannot be installed here, and fails
instead when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_tried: dict[str, str] = {}


def prometheus_tool(name: str) -> str:
    """The path of ``promtool`` or ``prometheus``; installs the package once if needed."""
    found = shutil.which(name)
    if found:
        return found
    if "install" not in _tried:
        _tried["install"] = _install()
    found = shutil.which(name)
    if not found:
        why = f"{name} is not installed and apt could not install it: {_tried['install']}"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI installs it (.ci/run): a missing tool there is a failure
        pytest.skip(why)
    return found


def _install() -> str:
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "apt-get needs root (run: sudo apt-get install -y prometheus)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "prometheus"],
        ):
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            if done.returncode != 0:
                return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get failed: {e}"
    return "installed"
