"""The comparison's scenarios through ``kounta-proxy serve --workers 2`` against one process
(python -m bench.run --workers): a fresh hit, a revalidated 8 KB and 500 KB answer and a
caller's If-None-Match on bench/origin.py (bench/compare.py's scenarios), through one process
(the default local backend), ``--workers 1`` and ``--workers 2`` (N processes on one port,
SO_REUSEPORT, sharing state in a Redis of the bench's own), every server started first, then
interleaved rounds. wrk shares the two cores with them, so the target is 1.3x, not 2x. Per row:
req/s and p99 (the round with the median req/s), upstream requests per caller request (from
the origin), and Redis round trips per request from the workers' own
``kounta_proxy_shared_calls_total``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
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
    """Other workers' 304 notes heard by waiting flights so far, by result (proxy.cache.notes)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    pattern = r'^kounta_proxy_cache_shared_total\{op="note",result="(\w+)"\} (\S+)$'
    counts: dict[str, float] = {}
    for result, value in re.findall(pattern, text, re.M):
        counts[result] = counts.get(result, 0.0) + float(value)
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


def start(
    stack: contextlib.ExitStack,
    directory: Path,
    upstream: str,
    redis: str,
    workers: int | None,
) -> tuple[str, int | None]:
    """A proxy on ``upstream`` (one process, or ``serve --workers N`` on ``redis``), every
    path stored in every worker's memory tier: its URL and admin port."""
    port = cache_bench.free_port()
    if workers is None:
        path = compare.proxy_config(directory, upstream, port, "auto")
        args = [sys.executable, "-m", "proxy", "serve", "--config", str(path)]
        stack.enter_context(cache_bench.process(args, port))
        admin = None
    else:
        admin = cache_bench.free_port() + 100
        path = config(directory, upstream, redis, port, admin)
        args = [sys.executable, "-m", "proxy", "serve", "--config", str(path)]
        proc = stack.enter_context(cache_bench.process([*args, "--workers", str(workers)], port))
        wait_ready(admin, proc)  # every worker has started
    url = f"http://127.0.0.1:{port}"
    for s in compare.SCENARIOS:
        for _ in range(8 * (workers or 1)):  # each worker stores it in its own memory tier
            cache_bench.fetch(url + s.path)
    return url, admin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run --workers")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--connections", type=int, default=cache_bench.CONNECTIONS)
    args = p.parse_args(argv)
    wrk = cache_bench.ensure_wrk()
    if wrk is None:
        print("--workers needs wrk", file=sys.stderr)
        return 1
    directory = Path(tempfile.mkdtemp(prefix="kounta-workers-"))
    origin_port = cache_bench.free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    started = time.monotonic()
    # (scenario key, server label) -> per round (req/s, p99 ms, upstream/req, Redis/req)
    rows: dict[tuple[str, str], list[tuple[float, float, float, float | None]]] = {}
    with contextlib.ExitStack() as stack:
        origin_args = [sys.executable, "-m", "bench.origin", "--port", str(origin_port)]
        stack.enter_context(cache_bench.process(origin_args, origin_port))
        redis = stack.enter_context(own_redis(str(directory)))
        servers = [
            Server(label, *start(stack, directory, origin, redis, workers))
            for label, workers in SERVERS
        ]
        etag = cache_bench.fetch(servers[0].url + compare.REVALIDATED)[1]["etag"]
        noted: dict[str, dict[str, float]] = {}
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no} of {args.rounds}", file=sys.stderr, flush=True)
            for scenario in compare.SCENARIOS:
                headers = {"If-None-Match": etag} if scenario.inm else {}
                for server in servers:
                    calls = None if server.admin is None else shared_calls(server.admin)
                    served = compare.served(origin)
                    r = cache_bench.wrk(wrk, server.url + scenario.path, headers, None,
                                        args.connections)  # fmt: skip
                    asked = max(1, r.requests)
                    up = (compare.served(origin) - served) / asked
                    redis_calls = None
                    if calls is not None and server.admin is not None:
                        redis_calls = (shared_calls(server.admin) - calls) / asked
                    row = (r.rps, r.p99_ms, up, redis_calls)
                    rows.setdefault((scenario.key, server.label), []).append(row)
        for server in servers:
            if server.admin is not None:
                noted[server.label] = notes(server.admin)
    print(f"\n## By workers (wrk -t2 -c{args.connections}, median of {args.rounds} rounds)\n")
    print("| scenario | server | req/s | p99 ms | upstream/req | Redis round trips/req |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    medians: dict[tuple[str, str], float] = {}
    for scenario in compare.SCENARIOS:
        for label, _ in SERVERS:
            runs = rows[(scenario.key, label)]
            rps, p99, up, calls = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # median
            medians[(scenario.key, label)] = rps
            shown = "" if calls is None else f"{calls:.3f}"
            print(f"| {scenario.label} | {label} | {rps:.0f} | {p99:.2f} | {up:.3f} | {shown} |")
    print("\n| scenario | --workers 2 / one process | --workers 2 / --workers 1 |")
    print("| --- | ---: | ---: |")
    for scenario in compare.SCENARIOS:
        two = medians[(scenario.key, "--workers 2")]
        one, w1 = medians[(scenario.key, "one process")], medians[(scenario.key, "--workers 1")]
        print(f"| {scenario.label} | {two / one:.2f} | {two / w1:.2f} |")
    print("\n(target: no scenario below 1.0; 1.3 for fresh hits on two shared cores)")
    for server in servers:
        if server.admin is not None:
            heard = ", ".join(f"{k} {v:.0f}" for k, v in sorted(noted[server.label].items()))
            print(f"\n{server.label}: other workers' 304 notes over the run: {heard or 'none'}")
    print(f"\n(whole run {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0
