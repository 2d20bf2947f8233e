"""``./dev bench``'s own options: help and a mistyped option answer at once, in one line,
instead of starting the two-minute run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench import run


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_modes_and_runs_nothing(flag: str) -> None:
    done = bench(flag)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: ./dev bench")
    assert "--redis-tier" in done.stdout and "round 1" not in done.stdout


@pytest.mark.parametrize(
    "args", [["--conections", "8"], ["--connections"], ["--connections", "x"], ["--nope"]]
)
def test_a_mistyped_option_is_one_line_and_exit_2(args: list[str]) -> None:
    done = bench(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench: unknown or incomplete options")
    assert done.stdout == ""


def test_connections_is_read() -> None:
    assert run._connections(["--connections", "128"]) == 128
    assert run._connections([]) == run.compare.DEFAULT_CONNECTIONS
