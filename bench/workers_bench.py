"""The comparison's scenarios through ``kounta-proxy serve --workers 2`` against one process
(python -m bench.run --workers): a fresh hit, a revalidated 8 KB and 500 KB answer and a
caller's If-None-Match on bench/origin.py (bench/compare.py's scenarios), through one process
(the default local backend), ``--workers 1`` and ``--workers 2`` (N processes on one port,
SO_REUSEPORT, sharing state in a Redis of the bench's own), every server started first, then
interleaved rounds (every other one in the reverse order). wrk shares the two cores with them,
so the target is 1.3x, not 2x. Per row: req/s and p99 (the round with the median req/s),
upstream requests per caller request (from the origin), Redis round trips per request from the
workers' own ``kounta_proxy_shared_calls_total``, the server's CPU (its processes' user +
system time per second of the run, in cores) and the machine's headroom (its idle cores over
the run, from /proc/stat). ``--old DIR`` adds ``--workers 1`` and ``2`` of the proxy package in
DIR (``git archive REV proxy | tar -x -C DIR``, as bench.ab) to the same interleaved rounds;
``--unix`` adds ``--workers 1`` and ``2`` on the same Redis over its Unix socket (``shared.url
= "unix://..."``) instead of loopback TCP. ``--profile PREFIX`` measures nothing of the above:
it starts ``--workers 2`` (``--profile-workers N``) alone and records each worker with
``py-spy record -f raw`` while wrk runs ``--scenario`` (PREFIX-w1.txt, PREFIX-w2.txt, ...),
then prints each worker's CPU µs a request of the run's requests, its time on a CPU and
waiting on the run queue (/proc/PID/task/*/schedstat), upstream/req and the notes and claims
counted over the run (``--no-spy``: the same run without py-spy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet

from bench import cache_bench, compare
from bench.fleet import own_redis

ROUNDS = 3
# (label, workers): None is one process on the local backend (no Redis).
SERVERS: tuple[tuple[str, int | None], ...] = (
    ("one process", None),
    ("--workers 1", 1),
    ("--workers 2", 2),
)


def config(directory: Path, upstream: str, redis: str, port: int, admin: int) -> Path:
    path = directory / f"workers-{port}.toml"
    path.write_text(
        f'state_dir = "{directory / f"state-{port}"}"\n'
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nbase_url = "{upstream}"\n'
        '[log]\nlevel = "warning"\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {admin}\n'
        '[[cache.rules]]\npath = "/v1/companies/*/products/*"\nfresh_for = 3600.0\n'
        f'[shared]\nbackend = "redis"\nurl = "{redis}"\nkey_prefix = "bench-{port}"\n'
        f'token_key = "{Fernet.generate_key().decode()}"\n'
        f'[accounts.main]\nmode = "static"\ntoken = "{cache_bench.TOKEN}"\n'
        "rate_per_minute = 100000000\n"
    )
    return path


def shared_calls(admin: int) -> float:
    """Redis round trips so far, from the admin listener (the parent's merges the workers)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(m) for m in re.findall(r"^kounta_proxy_shared_calls_total\{.*\} (\S+)$", text, re.M)
    )


def notes(admin: int) -> dict[str, float]:
    """Other workers' 304 notes heard by waiting flights so far, by result (proxy.cache.notes);
    the fetch locks' claims (``lock taken``, ``lock waited``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    pattern = r'^kounta_proxy_cache_shared_total\{op="(note|lock)",result="(\w+)"\} (\S+)$'
    counts: dict[str, float] = {}
    for op, result, value in re.findall(pattern, text, re.M):
        name = result if op == "note" else f"{op} {result}"
        counts[name] = counts.get(name, 0.0) + float(value)
    return counts


def wait_ready(admin: int, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    """Until /readyz says 200 (under --workers: every worker is ready)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the proxy exited with {proc.returncode}")
        url = f"http://127.0.0.1:{admin}/readyz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise SystemExit("the proxy did not get ready")


@dataclass
class Server:
    label: str
    url: str
    admin: int | None  # the admin port whose /metrics counts Redis round trips
    pids: list[int]  # the server's processes (a parent and its workers)


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system seconds the processes have used (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def idle_seconds() -> float:
    """The machine's idle core-seconds so far (/proc/stat: idle + iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / TICKS


def family(pid: int) -> list[int]:
    """The process and its children (``serve --workers``: the parent and its workers)."""
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *map(int, children)]
    return [pid]


def start(
    stack: contextlib.ExitStack,
    directory: Path,
    upstream: str,
    redis: str,
    workers: int | None,
    cwd: str | None = None,
) -> tuple[str, int | None, list[int]]:
    """A proxy on ``upstream`` (one process, or ``serve --workers N`` on ``redis``; the
    package in ``cwd``, else this tree's), every path stored in every worker's memory tier:
    its URL, admin port and processes."""
    port = cache_bench.free_port()
    if workers is None:
        path = compare.proxy_config(directory, upstream, port, "auto")
        args = [sys.executable, "-m", "proxy", "serve", "--config", str(path)]
        proc = stack.enter_context(cache_bench.process(args, port, cwd=cwd))
        admin = None
    else:
        admin = cache_bench.free_port() + 100
        path = config(directory, upstream, redis, port, admin)
        args = [sys.executable, "-m", "proxy", "serve", "--config", str(path)]
        served = [*args, "--workers", str(workers)]
        proc = stack.enter_context(cache_bench.process(served, port, cwd=cwd))
        wait_ready(admin, proc)  # every worker has started
    url = f"http://127.0.0.1:{port}"
    for s in compare.SCENARIOS:
        for _ in range(8 * (workers or 1)):  # each worker stores it in its own memory tier
            cache_bench.fetch(url + s.path)
    return url, admin, family(proc.pid)


def schedstat(pid: int) -> tuple[int, int, int, int]:
    """The process's threads' time on a CPU and waiting on a run queue (ns) (/proc/PID/task/
    */schedstat, summed), and its event loop's thread's voluntary and involuntary context
    switches (/proc/PID/status: the times it slept, and was put off a CPU while runnable)."""
    total = [0, 0, 0, 0]
    for path in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError):
            for i, value in enumerate(path.read_text().split()[:2]):
                total[i] += int(value)
    with contextlib.suppress(OSError):
        found = re.findall(r"^(non)?voluntary_ctxt_switches:\s+(\d+)$",
                           Path(f"/proc/{pid}/status").read_text(), re.M)  # fmt: skip
        for non, count in found:
            total[3 if non else 2] = int(count)
    return total[0], total[1], total[2], total[3]


def profile(
    wrk: str,
    prefix: str,
    scenario: str,
    seconds: int,
    connections: int,
    count: int = 2,
    spied: bool = True,
) -> int:
    """``serve --workers N`` alone (``count``), each worker under ``py-spy record`` (unless not
    ``spied``) during one wrk run of ``scenario`` (compare.SCENARIOS' key): per worker its raw
    samples, its CPU µs a request (of all the run's requests: the workers' shares add up to
    the server's), its time on a CPU and waiting to run (/proc schedstat), then
    upstream/req and the notes and claims counted over the run."""
    chosen = next((s for s in compare.SCENARIOS if s.key == scenario), None)
    if chosen is None:
        print(f"--scenario: one of {', '.join(s.key for s in compare.SCENARIOS)}", file=sys.stderr)
        return 2
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    directory = Path(tempfile.mkdtemp(prefix="kounta-workers-"))
    origin_port = cache_bench.free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    with contextlib.ExitStack() as stack:
        origin_args = [sys.executable, "-m", "bench.origin", "--port", str(origin_port)]
        stack.enter_context(cache_bench.process(origin_args, origin_port))
        redis = stack.enter_context(own_redis(str(directory)))
        url, admin, pids = start(stack, directory, origin, redis, count)
        assert admin is not None
        headers = {}
        if chosen.inm:
            headers["If-None-Match"] = cache_bench.fetch(url + compare.REVALIDATED)[1]["etag"]
        before = notes(admin)
        served = compare.served(origin)
        workers = pids[1:] or pids  # --workers 1 serves in its own process
        cpu = [cpu_seconds([pid]) for pid in workers]
        sched = [schedstat(pid) for pid in workers]
        record = [spy, "record", "-r", "200", "-d", str(seconds), "-f", "raw"]
        spies = [
            subprocess.Popen([*record, "-o", f"{prefix}-w{n}.txt", "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for n, pid in enumerate(workers, 1) if spied
        ]  # fmt: skip
        saved = cache_bench.DURATION
        cache_bench.DURATION = seconds
        try:
            r = cache_bench.wrk(wrk, url + chosen.path, headers, None, connections)
        finally:
            cache_bench.DURATION = saved
        for s in spies:
            s.wait()
        asked = max(1, r.requests)
        up = (compare.served(origin) - served) / asked
        after = notes(admin)
        for n, (pid, was, ran) in enumerate(zip(workers, cpu, sched, strict=True), 1):
            spent = (cpu_seconds([pid]) - was) * 1e6 / asked
            on, queued, slept, put_off = (b - a for a, b in zip(ran, schedstat(pid), strict=True))
            samples = f"; samples {prefix}-w{n}.txt" if spied else ""
            print(f"worker {n} (pid {pid}): {spent:.0f} µs/req; on a CPU {on / 1e3 / asked:.0f}, "
                  f"waiting to run {queued / 1e3 / asked:.0f} µs/req; slept {slept / asked:.3f}, "
                  f"put off {put_off / asked:.3f} times a request{samples}")  # fmt: skip
        counted = ", ".join(f"{k} {after[k] - before.get(k, 0.0):.0f}" for k in sorted(after))
        under = " (under py-spy)" if spied else ""
        print(f"{chosen.label}: {r.rps:.0f} req/s{under}, upstream/req {up:.3f}")
        print(f"notes and claims over the run: {counted or 'none'}")
    shutil.rmtree(directory, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run --workers")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--connections", type=int, default=cache_bench.CONNECTIONS)
    p.add_argument("--old", help="a directory holding another proxy package (as bench.ab)")
    p.add_argument("--unix", action="store_true", help="workers on Redis's Unix socket too")
    p.add_argument("--redis-nice", type=int, default=0, help="redis-server's nice (-20..19)")
    p.add_argument("--profile", metavar="PREFIX", help="py-spy on both workers; no measuring")
    p.add_argument("--scenario", default="reval", help="--profile's scenario (fresh, reval, ...)")
    p.add_argument("--seconds", type=int, default=5, help="--profile's wrk run")
    p.add_argument("--profile-workers", type=int, default=2, help="--profile's serve --workers")
    p.add_argument("--no-spy", action="store_true", help="--profile's run without py-spy")
    args = p.parse_args(argv)
    # (label, workers, package directory, on the Unix socket)
    chosen: list[tuple[str, int | None, str | None, bool]]
    chosen = [(lb, w, None, False) for lb, w in SERVERS]
    variants = [(", --old", args.old, False)] * bool(args.old)
    variants += [(", unix", None, True)] * args.unix
    for suffix, cwd, unix in variants:
        chosen += [(label + suffix, w, cwd, unix) for label, w in SERVERS if w is not None]
    wrk = cache_bench.ensure_wrk()
    if wrk is None:
        print("--workers needs wrk", file=sys.stderr)
        return 1
    if args.profile:
        return profile(
            wrk, args.profile, args.scenario, args.seconds, args.connections,
            args.profile_workers, not args.no_spy,
        )  # fmt: skip
    directory = Path(tempfile.mkdtemp(prefix="kounta-workers-"))
    origin_port = cache_bench.free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    started = time.monotonic()
    # (scenario key, server label) -> per round (req/s, p99 ms, upstream/req, Redis/req,
    # the server's CPU in cores, the machine's idle cores)
    rows: dict[tuple[str, str], list[tuple[float, float, float, float | None, float, float]]]
    rows = {}
    with contextlib.ExitStack() as stack:
        origin_args = [sys.executable, "-m", "bench.origin", "--port", str(origin_port)]
        stack.enter_context(cache_bench.process(origin_args, origin_port))
        socket_path = directory / "redis.sock"
        redis = stack.enter_context(own_redis(str(directory), str(socket_path), args.redis_nice))
        servers = [
            Server(label, *start(stack, directory, origin,
                                 f"unix://{socket_path}?db=0" if unix else redis, workers, cwd))
            for label, workers, cwd, unix in chosen
        ]  # fmt: skip
        etag = cache_bench.fetch(servers[0].url + compare.REVALIDATED)[1]["etag"]
        noted: dict[str, dict[str, float]] = {}
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no} of {args.rounds}", file=sys.stderr, flush=True)
            for scenario in compare.SCENARIOS:
                headers = {"If-None-Match": etag} if scenario.inm else {}
                # Every other round in the reverse order: a server's place in the round
                # counts for 0.1-0.3 of a ratio on this machine (docs/performance.md).
                for server in servers if round_no % 2 else servers[::-1]:
                    calls = None if server.admin is None else shared_calls(server.admin)
                    served = compare.served(origin)
                    cpu, idle, began = cpu_seconds(server.pids), idle_seconds(), time.monotonic()
                    r = cache_bench.wrk(wrk, server.url + scenario.path, headers, None,
                                        args.connections)  # fmt: skip
                    took = time.monotonic() - began
                    busy = (cpu_seconds(server.pids) - cpu) / took
                    spare = (idle_seconds() - idle) / took
                    asked = max(1, r.requests)
                    up = (compare.served(origin) - served) / asked
                    redis_calls = None
                    if calls is not None and server.admin is not None:
                        redis_calls = (shared_calls(server.admin) - calls) / asked
                    row = (r.rps, r.p99_ms, up, redis_calls, busy, spare)
                    rows.setdefault((scenario.key, server.label), []).append(row)
        for server in servers:
            if server.admin is not None:
                noted[server.label] = notes(server.admin)
    print(f"\n## By workers (wrk -t2 -c{args.connections}, median of {args.rounds} rounds)\n")
    print("| scenario | server | req/s | p99 ms | upstream/req | Redis round trips/req "
          "| CPU (cores) | CPU µs/req | idle cores |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    medians: dict[tuple[str, str], float] = {}
    for scenario in compare.SCENARIOS:
        for label, *_ in chosen:
            runs = rows[(scenario.key, label)]
            rps, p99, up, calls, busy, spare = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            medians[(scenario.key, label)] = rps
            shown = "" if calls is None else f"{calls:.3f}"
            print(f"| {scenario.label} | {label} | {rps:.0f} | {p99:.2f} | {up:.3f} | {shown} "
                  f"| {busy:.2f} | {busy / rps * 1e6:.0f} | {spare:.2f} |")  # fmt: skip
    more = "".join(
        f" | --workers 2{suffix} / one process | --workers 1{suffix} / one process"
        for suffix, *_ in variants
    )
    print(f"\n| scenario | --workers 2 / one process | --workers 2 / --workers 1 "
          f"| --workers 1 / one process{more} |")  # fmt: skip
    print("| --- | ---: | ---: | ---: |" + " ---: | ---: |" * len(variants))
    for scenario in compare.SCENARIOS:
        m = {label: medians[(scenario.key, label)] for label, *_ in chosen}
        two, one, w1 = m["--workers 2"], m["one process"], m["--workers 1"]
        cells = [two / one, two / w1, w1 / one]
        for suffix, *_ in variants:
            cells += [m[f"--workers 2{suffix}"] / one, m[f"--workers 1{suffix}"] / one]
        print(f"| {scenario.label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    print("\n(target: no scenario below 1.0; 1.3 for fresh hits on two shared cores)")
    for server in servers:
        if server.admin is not None:
            heard = ", ".join(f"{k} {v:.0f}" for k, v in sorted(noted[server.label].items()))
            print(
                f"\n{server.label}: other workers' 304 notes (and claims) over the run: "
                f"{heard or 'none'}"
            )
    print(f"\n(whole run {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0
