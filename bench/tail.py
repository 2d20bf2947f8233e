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

``--entries 1000,10000,100000 [--loop asyncio] [--old DIR]``: the tail as the memory tier
grows. Per level N, one proxy (each tree's, ``--old`` as bench.ab) with a memory tier large
enough for N entries of 8 KB, filled through the proxy itself (N/2 products, fresh for an
hour, and N/2 customers, revalidated on every request: each a miss, fetched and stored), then
fresh hits over the products and revalidations over the customers, each request a random
key (no coalescing: a revalidation a request). Per row also the proxy's CPU a request (user
and system time of all its threads over the phase, by its requests: what a request costs,
less moved than req/s by what else the machine runs), the objects the collector tracks
(``gc.get_objects()``) and the RSS after the runs; the fill prints its rate and its CPU an
entry, and the next phase waits until the proxy is idle (its disk writes done). Levels and
trees interleaved.
Between the fill and the fresh phase each product is asked once more, in order (the
"first touch" row: each a fresh hit of a key that has answered no fresh hit before, the rate
over the whole pass), so that the fresh phase measures a steady state, not first touches (at
100k, 3 s of random keys ask most products for the first time); ``--no-touch``: no such pass,
the fresh phase's random keys touch them first as before. ``--again N``: the fresh phase N
times more over the same keys. Each row's rate is also given against the smallest level's
(same tree and phase): the goal is the fresh hit's within 20 % across the levels.
"""

from __future__ import annotations

import argparse
import collections
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
from collections.abc import Iterator
from pathlib import Path

from bench import compare
from bench.cache_bench import TOKEN, cpu_seconds, free_port, process, rss_mb, wait_port

CLIENT = Path(__file__).with_name("tail_client.c")
EDGE_NS = 300_000_000  # the steady part leaves out this much at each end
PATHS = {"fresh": compare.FRESH, "reval": compare.REVALIDATED, "inm": compare.REVALIDATED}
# The entries series: the scenario's path with the key's id, and the memory tier per entry.
KEYED = {
    "fresh": f"{compare.COMPANY}/products/%d.json",
    "reval": f"{compare.COMPANY}/customers/%d.json",
}
PER_ENTRY = 12 * 1024  # 8 KB body + the tier's overhead, with room
HERE = str(Path(__file__).resolve().parent.parent)


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
        tracked = gc.get_objects()
        Path(out + ".objects").write_text(str(len(tracked)))
        kinds = collections.Counter(type(o).__qualname__ for o in tracked).most_common(12)
        Path(out + ".types").write_text(json.dumps(kinds))
        del tracked
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
    p.add_argument("--entries", help="levels, e.g. 1000,10000,100000: the entries series")
    p.add_argument("--loop", default="asyncio", choices=compare.LOOPS, help="with --entries")
    p.add_argument("--old", help="with --entries: a directory holding another proxy package")
    p.add_argument(
        "--profile",
        help="with --entries: py-spy's raw output of the new tree's phases, "
        "PROFILE-N.txt (fresh), PROFILE-N-touch.txt, PROFILE-N-fill.txt, a level each",
    )
    p.add_argument(
        "--types", action="store_true", help="with --entries: the types tracked most, per row"
    )
    p.add_argument(
        "--no-touch",
        dest="touch",
        action="store_false",
        help="with --entries: no first-touch pass (each product asked once more, in order, "
        "after the fill): the fresh phase touches most keys first at 100k",
    )
    p.add_argument(
        "--again",
        type=int,
        default=0,
        help="with --entries: the fresh phase this many times more, over the same keys in the "
        "same order (the client's seeds are fixed): first touches against a steady state",
    )
    args = p.parse_args(argv)
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("bench.tail: needs a C compiler (apt-get install gcc)")
    directory = Path(tempfile.mkdtemp(prefix="kounta-tail-"))
    client = directory / "tail_client"
    subprocess.run([gcc, "-O2", "-pthread", "-o", str(client), str(CLIENT)], check=True)
    try:
        if args.entries:
            print(entries_table(measure_entries(directory, str(client), args), args))
            return 0
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
                recorded = directory / f"gc-{name.split(', ')[-1]}.json"
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
                    passes = json.loads(recorded.read_text())
                lines = out.read_text().splitlines()
                rows.append((scenario, name, summary(lines, passes, args.seconds)))
                print(f"  {scenario} {name}: {rows[-1][2]['rps']:.0f} req/s", file=sys.stderr)
    return rows


def run_client(client: str, port: int, path: str, env: dict[str, str], args_: list[str]) -> None:
    command = [client, str(port), path, *args_, f"Authorization: Bearer {TOKEN}"]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, **env})


def entries_config(directory: Path, origin: str, port: int, loop: str, stored: int) -> Path:
    """compare's proxy with a memory tier large enough for ``stored`` entries of 8 KB."""
    path = compare.proxy_config(directory, origin, port, loop)
    memory = stored * PER_ENTRY + 64 * 1024**2
    text = path.read_text().replace("[cache]\n", f"[cache]\nmemory_size = {memory}\n", 1)
    path.write_text(text)
    return path


Row = tuple[str, int, str, dict[str, float]]


def measure_entries(directory: Path, client: str, args: argparse.Namespace) -> list[Row]:
    """The entries series: per level and tree, a filled proxy's fresh hits and revalidations
    over random keys (see the module's docstring)."""
    py, origin_port = sys.executable, free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    levels = [int(n) for n in args.entries.split(",")]
    trees = [("new", HERE)] + ([("old", args.old)] if args.old else [])
    env = {**os.environ, "PYTHONPATH": HERE}  # bench from here, proxy from the tree's cwd
    rows: list[Row] = []
    with process([py, "-m", "bench.origin", "--port", str(origin_port)], origin_port):
        for i, level in enumerate(levels):
            for tree, cwd in trees if i % 2 == 0 else trees[::-1]:
                port = free_port()
                sub = directory / f"{tree}-{level}"
                sub.mkdir()
                config = entries_config(sub, origin, port, args.loop, level)
                record = str(sub / "gc.json")
                serve = [py, "-m", "bench.tail", "--serve-recording", record, "serve"]
                proc = subprocess.Popen(
                    [*serve, "--config", str(config)],
                    cwd=cwd,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    wait_port(port, proc)
                    rows += entries_level(client, port, proc.pid, record, level, tree, args)
                finally:
                    proc.terminate()
                    proc.wait(20)
                shutil.rmtree(sub, ignore_errors=True)
    return rows


def entries_level(
    client: str, port: int, pid: int, record: str, level: int, tree: str, a: argparse.Namespace
) -> list[Row]:
    began, cpu = time.monotonic(), cpu_seconds(pid)
    fill = f"{a.profile}-{level}-fill.txt" if a.profile and tree == "new" else None
    with profiled(pid, a, fill, None):
        for path in KEYED.values():  # each key once: a miss, fetched and stored
            args = ["32", "2", "600", os.devnull]
            run_client(client, port, path, {"FILL": str(level // 2)}, args)
    took = time.monotonic() - began
    settled = settle(pid)  # the fill's writes to the disk tier done
    used = (cpu_seconds(pid) - cpu) / (level // 2 * 2)
    print(
        f"  {tree} {level}: filled in {took:.0f} s ({level / took:.0f} a second, the proxy's "
        f"CPU {used * 1e6:.0f} µs an entry, busy {settled:.1f} s after)",
        file=sys.stderr,
    )
    rows = []
    out = str(Path(record).with_name("latencies.txt"))
    keys, touch = {"KEYS": str(level // 2)}, {"FILL": str(level // 2)}
    # (row, path, the client's keys, seconds (None: until each key is asked), profile suffix)
    phases: list[tuple[str, str, dict[str, str], float | None, str | None]] = []
    if a.touch:
        phases.append(("first touch", KEYED["fresh"], touch, None, "-touch"))
    phases.append(("fresh", KEYED["fresh"], keys, a.seconds, ""))
    for k in range(1, a.again + 1):
        phases.append((f"fresh+{k}", KEYED["fresh"], keys, a.seconds, f"-again{k}"))
    phases.append(("reval", KEYED["reval"], keys, a.seconds, None))
    for scenario, path, env, seconds, suffix in phases:
        os.kill(pid, signal.SIGUSR1)  # clear what the phase before recorded
        time.sleep(0.3)
        profile = (
            f"{a.profile}-{level}{suffix}.txt" if tree == "new" and suffix is not None else None
        )
        limit = str(a.seconds if seconds is not None else 600)
        cpu = cpu_seconds(pid)
        with profiled(pid, a, profile, seconds):
            run_client(client, port, path, env, [str(a.connections), "2", limit, out])
        cpu = cpu_seconds(pid) - cpu
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        passes = json.loads(Path(record).read_text())
        lines = Path(out).read_text().splitlines()
        s = summary(lines, passes, span(lines) if seconds is None else seconds)
        s["cpu"] = cpu / len(lines) * 1e6  # the proxy's, µs a request
        s["objects"] = float(Path(record + ".objects").read_text())
        s["rss"] = rss_mb(pid, "VmRSS") or 0.0
        rows.append((tree, level, scenario, s))
        print(f"  {tree} {level} {scenario}: {s['rps']:.0f} req/s", file=sys.stderr)
        if a.types:
            kinds = json.loads(Path(record + ".types").read_text())
            print("    " + ", ".join(f"{k} {n:,}" for k, n in kinds), file=sys.stderr)
    return rows


def settle(pid: int, most: float = 60.0) -> float:
    """Seconds until ``pid`` is idle (under 5 % of a core over 0.25 s; ``most`` at most): the
    fill's stores are written to the disk tier by its threads after their answers, and the
    next phase would pay for them."""
    began = time.monotonic()
    while time.monotonic() - began < most:
        cpu = cpu_seconds(pid)
        time.sleep(0.25)
        if cpu_seconds(pid) - cpu < 0.0125:
            break
    return time.monotonic() - began


def span(lines: list[str]) -> float:
    """Seconds from the first request sent to the last answer's end (a pass over the keys)."""
    rows = [tuple(map(int, line.split())) for line in lines]
    return (max(r[4] for r in rows) - min(r[2] for r in rows)) / 1e9


@contextlib.contextmanager
def profiled(
    pid: int, a: argparse.Namespace, out: str | None, seconds: float | None
) -> Iterator[None]:
    """py-spy recording ``pid`` into ``out`` (raw, 500 a second) for the block's length
    (``seconds``, or until the block ends: py-spy stopped by SIGINT, as Ctrl-C, writes it)."""
    if not a.profile or out is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "-r", "500", "-f", "raw", "-o", out, "-p", str(pid)]
    if seconds is not None:
        command += ["-d", f"{seconds:g}"]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL) as recording:
        yield
        if seconds is None:
            recording.send_signal(signal.SIGINT)
        recording.wait()


def entries_table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"c={args.connections}, {args.loop}, {args.seconds:g} s | tree | stored | req/s "
        "| / smallest level | proxy CPU µs a request | p50 / p99 ms, whole run "
        "| steady p50 / p99 ms | full GC passes | longest ms | p99 spanning one "
        "| objects tracked | RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    phases = list(dict.fromkeys(r[2] for r in rows))  # in the order they ran
    smallest = {}
    for tree, _, scenario, s in sorted(rows, key=lambda r: r[1], reverse=True):
        smallest[tree, scenario] = s["rps"]
    for tree, level, scenario, s in sorted(rows, key=lambda r: (phases.index(r[2]), r[1], r[0])):
        lines.append(
            f"| {scenario} | {tree} | {level:,} | {s['rps']:.0f} | "
            f"{s['rps'] / smallest[tree, scenario]:.2f} | {s['cpu']:.0f} | {s['p50 all']:.2f} / "
            f"{s['p99 all']:.2f} | {s['p50']:.2f} / {s['p99']:.2f} | {s['full passes']:.0f} | "
            f"{s['full max']:.1f} | {s['spanned']:.0%} | {s['objects']:,.0f} | {s['rss']:.0f} |"
        )
    return "\n".join(lines)


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
