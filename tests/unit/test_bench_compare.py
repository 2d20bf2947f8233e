"""bench.compare's rounds, pairing and pinning (the bench prints numbers; nothing here asserts
a rate)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import cache_bench
from bench.cache_bench import LOAD, SERVER, Result, cpu_sets, pin
from bench.compare import SCENARIOS, Row, p99_split, paired, round_order, table

NAMES = ["proxy, asyncio", "proxy, uvloop", "nginx proxy_cache"]


def test_every_round_runs_every_server_and_scenario_once_each_server_back_to_back() -> None:
    for round_no in range(7):
        runs = round_order(round_no, NAMES)
        assert sorted((n, s.key) for n, s in runs) == sorted(
            (n, s.key) for n in NAMES for s in SCENARIOS
        )
        servers = [n for n, _ in runs]
        # Each server's four scenarios are consecutive.
        assert [servers[i] for i in range(0, len(runs), len(SCENARIOS))] == list(
            dict.fromkeys(servers)
        )


def test_over_as_many_rounds_as_scenarios_each_takes_every_place_once() -> None:
    places: dict[str, set[int]] = {s.key: set() for s in SCENARIOS}
    for round_no in range(len(SCENARIOS)):
        runs = [s.key for n, s in round_order(round_no, NAMES) if n == NAMES[0]]
        for place, key in enumerate(runs):
            places[key].add(place)
    assert all(p == set(range(len(SCENARIOS))) for p in places.values())
    firsts = {round_order(r, NAMES)[0][0] for r in range(len(NAMES))}
    assert firsts == set(NAMES)  # and each server comes first in turn


def result(rps: float, cpu_us: float | None) -> Result:
    return Result("", rps, 1.0, 2.0, int(rps * 3), cpu_us=cpu_us)


def test_each_round_is_paired_with_the_same_rounds_fresh_hit() -> None:
    fresh = [result(1000, 100), result(500, 110), result(800, 90)]
    reval = [result(900, 125), result(300, 220), result(800, 100)]
    by_rps, by_cpu = paired(reval, fresh)
    assert by_rps == [0.9, 0.6, 1.0]
    assert by_cpu == [0.8, 0.5, 0.9]
    # nginx: no CPU read, so no CPU ratio (not a partial list)
    assert paired([result(10, None)] * 3, [result(20, None)] * 3) == ([0.5] * 3, [])


def test_the_p99_against_nginx_is_split_into_the_rate_and_the_tails_shape() -> None:
    # Little's law: at one connection count each mean latency is connections / req/s, so a
    # server at half nginx's rate has twice its mean; a p99 3x nginx's is then 2 (rate) times
    # 1.5 (its p99 / mean over nginx's).
    proxy = Result("", 20000, 1.5, 3.0, 60000)
    nginx = Result("", 40000, 0.7, 1.0, 120000)
    rate, shape = p99_split(proxy, nginx)
    assert (rate, shape) == (2.0, 1.5)
    rows = [
        Row(SCENARIOS[0], "proxy, asyncio", proxy),
        Row(SCENARIOS[0], "nginx proxy_cache", nginx),
    ]
    for row in rows:
        row.by_rps = [1.0]
    proxy_line, nginx_line = table(rows).splitlines()[2:]
    assert "| 3.0x | 2.00 * 1.50 |" in proxy_line
    assert nginx_line.endswith("|  |  |  |")  # the reference has no ratio to itself


def test_servers_go_on_the_last_core_and_the_load_on_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    assert cpu_sets() == {SERVER: {3}, LOAD: {0, 1, 2}}
    monkeypatch.setenv("KOUNTA_BENCH_PIN", "0")
    assert cpu_sets() is None and pin(SERVER) is None
    monkeypatch.delenv("KOUNTA_BENCH_PIN")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {5})
    assert cpu_sets() is None  # one core: nothing to split
    assert pin(None) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_pinned_child_runs_on_its_roles_cores_only() -> None:
    for role in (SERVER, LOAD):
        code = "import os; print(sorted(os.sched_getaffinity(0)))"
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            preexec_fn=pin(role),
        ).stdout
        sets = cache_bench.cpu_sets()
        assert sets is not None
        assert out.strip() == str(sorted(sets[role]))
