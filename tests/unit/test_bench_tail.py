"""bench.tail's reading of per-request timestamps: the steady part, first requests, GC passes."""

from __future__ import annotations

from bench.tail import EDGE_NS, summary

MS = 1_000_000


def test_summary_finds_the_p99_requests_that_spanned_a_full_pass() -> None:
    lines = []
    # 2 connections, a request every ms for 2 s; 3 ms each, 30 ms across a pause at 1 s.
    for conn in (0, 1):
        for i in range(2000):
            sent = i * MS
            took = 30 * MS if 1000 * MS <= sent < 1030 * MS else 3 * MS
            took = 200 * MS if i == 0 else took  # the connection's first request: slow start
            lines.append(f"0 {conn} {sent} {sent + MS} {sent + took}")
    pause = [[2, 1029 * MS, 25 * MS], [1, 1500 * MS, MS]]  # generation 1 passes do not count
    s = summary(lines, pause, 2.0)
    assert s["first p50"] == s["first max"] == 200.0
    assert s["p99"] == s["p99 all"] == 30.0
    assert s["p50"] == 3.0
    assert s["full passes"] == 1 and s["full max"] == 25.0
    assert s["spanned"] == 1.0  # every steady p99 request spanned the pass
    assert EDGE_NS == 300 * MS
