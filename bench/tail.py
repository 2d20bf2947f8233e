"""What sets the p99: every request's latency matched with the proxy's collector passes.

``python -m bench.tail [--connections 32] [--seconds 3] [--scenarios fresh,reval,inm]``
(under ``flock /work/bench.lock``). The comparison's servers (bench/compare.py: the proxy on
each loop, nginx with bench/nginx.conf, bench/origin.py upstream), loaded by
bench/tail_client.c (compiled with gcc; a closed-loop client like wrk -t2 that writes every
request's timestamps), the proxy run through this module so that it records each garbage
collection (generation, start, duration: ``gc.callbacks``) on the same clock. Per row: p50
and p99 over the whole run (as wrk counts them) and in the steady part (the first and last
0.3 s left out), each connection's first request, the full passes (generation 2) and how
many of the steady p99 requests spanned one. docs/performance.md, "The tail", has results.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import compare
from bench.cache_bench import TOKEN, free_port, process

CLIENT = Path(__file__).with_name("tail_client.c")
EDGE_NS = 300_000_000  # the steady part leaves out this much at each end
PATHS = {"fresh": compare.FRESH, "reval": compare.REVALIDATED, "inm": compare.REVALIDATED}


def serve_recording(out: str, args: list[str]) -> int:
    """``kounta-proxy ARGS`` recording its collections; SIGUSR1 writes them to OUT, clears."""
    passes: list[tuple[int, int, int]] = []
    began = [0]

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.monotonic_ns()
        else:
            passes.append((info["generation"], began[0], time.monotonic_ns() - began[0]))

    def dump(*_: object) -> None:
        Path(out).write_text(json.dumps(passes))
        passes.clear()

    gc.callbacks.append(record)
    signal.signal(signal.SIGUSR1, dump)
    from proxy.cli import main

    sys.argv = ["kounta-proxy", *args]
    return main()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def summary(lines: list[str], passes: list[list[int]], seconds: float) -> dict[str, float]:
    rows = [tuple(map(int, line.split())) for line in lines]
    start, end = min(r[2] for r in rows), max(r[4] for r in rows)
    firsts: dict[tuple[int, int], tuple[int, ...]] = {}
    for r in sorted(rows, key=lambda r: r[2]):
        firsts.setdefault((r[0], r[1]), r)
    steady = [r for r in rows if r[2] > start + EDGE_NS and r[4] < end - EDGE_NS]
    ms = [(r[4] - r[2]) / 1e6 for r in steady]
    p99 = pct(ms, 0.99)
    full = [(b, d) for g, b, d in passes if g == 2 and start <= b <= end]
    tail = [r for r in steady if (r[4] - r[2]) / 1e6 >= p99]
    spanned = sum(1 for r in tail if any(r[2] <= b <= r[4] for b, _ in full))
    first = [(r[4] - r[2]) / 1e6 for r in firsts.values()]
    return {
        "rps": len(rows) / seconds,
        "p50 all": pct([(r[4] - r[2]) / 1e6 for r in rows], 0.5),
        "p99 all": pct([(r[4] - r[2]) / 1e6 for r in rows], 0.99),
        "p50": pct(ms, 0.5),
        "p99": p99,
        "first p50": pct(first, 0.5),
        "first max": max(first),
        "full passes": len(full),
        "full max": max((d / 1e6 for _, d in full), default=0.0),
        "spanned": spanned / max(1, len(tail)),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve-recording"]:
        return serve_recording(argv[1], argv[2:])
    p = argparse.ArgumentParser(prog="python -m bench.tail")
    p.add_argument("--connections", type=int, default=compare.DEFAULT_CONNECTIONS)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--scenarios", default="fresh,reval,inm")
    args = p.parse_args(argv)
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("bench.tail: needs a C compiler (apt-get install gcc)")
    directory = Path(tempfile.mkdtemp(prefix="kounta-tail-"))
    client = directory / "tail_client"
    subprocess.run([gcc, "-O2", "-pthread", "-o", str(client), str(CLIENT)], check=True)
    try:
        rows = measure(directory, str(client), args)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(table(rows, args.connections))
    return 0


def measure(
    directory: Path, client: str, args: argparse.Namespace
) -> list[tuple[str, str, dict[str, float]]]:
    py, origin_port = sys.executable, free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    servers: dict[str, tuple[str, int, int]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            process([py, "-m", "bench.origin", "--port", str(origin_port)], origin_port)
        )
        for loop in compare.LOOPS:
            port = free_port()
            config = compare.proxy_config(directory, origin, port, loop)
            record = str(directory / f"gc-{loop}.json")
            command = [py, "-m", "bench.tail", "--serve-recording", record]
            proc = stack.enter_context(process([*command, "serve", "--config", str(config)], port))
            servers[f"proxy, {loop}"] = (f"http://127.0.0.1:{port}", proc.pid, port)
        nginx = compare.ensure_nginx()
        if nginx:
            port = free_port()
            config = compare.nginx_config(directory / "nginx", port, origin_port)
            args_ = [nginx, "-p", str(config.parent), "-c", str(config)]
            proc = stack.enter_context(process([*args_, "-e", str(config.parent / "e.log")], port))
            servers["nginx proxy_cache"] = (f"http://127.0.0.1:{port}", proc.pid, port)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        etags = compare.warm({k: v[:2] for k, v in servers.items()}, auth)
        rows = []
        for scenario in args.scenarios.split(","):
            for name, (_, pid, port) in servers.items():
                headers = [f"Authorization: Bearer {TOKEN}"]
                if scenario == "inm":
                    headers.append(f"If-None-Match: {etags[name]}")
                out = directory / "latencies.txt"
                record = directory / f"gc-{name.split(', ')[-1]}.json"
                proxy = name.startswith("proxy")
                if proxy:
                    os.kill(pid, signal.SIGUSR1)  # clear what warming recorded
                    time.sleep(0.2)
                client_args = [str(args.connections), "2", str(args.seconds), str(out)]
                command = [client, str(port), PATHS[scenario], *client_args, *headers]
                subprocess.run(command, check=True, capture_output=True)
                passes = []
                if proxy:
                    os.kill(pid, signal.SIGUSR1)
                    time.sleep(0.2)
                    passes = json.loads(record.read_text())
                lines = out.read_text().splitlines()
                rows.append((scenario, name, summary(lines, passes, args.seconds)))
                print(f"  {scenario} {name}: {rows[-1][2]['rps']:.0f} req/s", file=sys.stderr)
    return rows


def table(rows: list[tuple[str, str, dict[str, float]]], connections: int) -> str:
    lines = [
        f"c={connections} | server | req/s | p50 / p99 ms, whole run | steady p50 / p99 ms "
        "| p99/p50 | first request p50 / max ms | full GC passes (max ms) | p99 spanning one |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario, name, s in rows:
        passes = "" if name.startswith("nginx") else f"{s['full passes']:.0f} ({s['full max']:.1f})"
        spanned = "" if name.startswith("nginx") else f"{s['spanned']:.0%}"
        lines.append(
            f"| {scenario} | {name} | {s['rps']:.0f} | {s['p50 all']:.2f} / {s['p99 all']:.2f} | "
            f"{s['p50']:.2f} / {s['p99']:.2f} | {s['p99'] / s['p50']:.2f} | "
            f"{s['first p50']:.1f} / {s['first max']:.1f} | {passes} | {spanned} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
