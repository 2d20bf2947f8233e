"""Cost as the cache grows (python -m bench.run --sizes; several minutes, mostly filling).

One proxy (its default event loop) in front of bench/origin.py, with a memory tier smaller
than every set (MEMORY_SIZE), so most hits are read from disk. For 1k, 10k and 100k stored
entries of 8 KB each: the fresh-hit rate over random stored keys, the miss → store rate
(unique keys, each fetched and stored), the entries on disk and the proxy's RSS. Then the
proxy is stopped and started again over the 100k entries: seconds to ready (/readyz 200) and
to the first answer read from disk. Targets (issue 21): rates within 20 % of each other,
ready in < 2 s, RSS ≤ cache.memory_size + 100 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from bench import cache_bench
from bench.cache_bench import TOKEN, free_port, process, rss_mb, wait_port, wrk
from bench.workers_bench import wait_ready

LEVELS = (1_000, 10_000, 100_000)
MEMORY_SIZE = 4 * 1024**2  # below 1k x 8 KB: the memory tier never holds a whole set
PATH = "/v1/companies/5001/products/{}.json"  # fresh for an hour (the rule below)
FILL_CONNECTIONS = 32

RANDOM_SCRIPT = """
local N = {n}
function setup(thread) thread:set("seed", math.random(1, 1000000)) end
function init() math.randomseed(seed) end
function request()
  return wrk.format(nil, "/v1/companies/5001/products/" .. math.random(0, N - 1) .. ".json")
end
"""


def config(directory: Path, upstream: str, port: int, admin: int) -> Path:
    path = directory / "proxy-sizes.toml"
    path.write_text(
        f'state_dir = "{directory / "state"}"\n'
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nbase_url = "{upstream}"\n'
        '[log]\nlevel = "warning"\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {admin}\n'
        f"[cache]\nmax_size = {8 * 1024**3}\nmemory_size = {MEMORY_SIZE}\n"
        '[[cache.rules]]\npath = "/v1/companies/*/products/*"\nfresh_for = 3600.0\n'
        f'[accounts.main]\nmode = "static"\ntoken = "{TOKEN}"\nrate_per_minute = 100000000\n'
    )
    return path


async def fill(base: str, start: int, stop: int) -> float:
    """Store ids start..stop-1 through the proxy; requests a second."""
    ids = iter(range(start, stop))
    began = time.monotonic()

    async def worker(session: aiohttp.ClientSession) -> None:
        for n in ids:
            async with session.get(base + PATH.format(n)) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"bench: fill answered {r.status}")

    # No Accept (a selecting header) nor Accept-Encoding, as wrk sends none: the stored
    # variant is the one wrk asks for.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, skip_auto_headers=("Accept", "Accept-Encoding")
    ) as session:
        await asyncio.gather(*(worker(session) for _ in range(FILL_CONNECTIONS)))
    return (stop - start) / max(1e-9, time.monotonic() - began)


def entries(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(r"^kounta_proxy_cache_entries (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else -1


def run() -> tuple[list[str], list[str]]:
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("bench: the size series needs wrk (apt-get install wrk)")
    directory = Path(tempfile.mkdtemp(prefix="kounta-sizes-"))
    origin_port, port, admin = free_port(), free_port(), free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    base = f"http://127.0.0.1:{port}"
    path = config(directory, origin, port, admin)
    serve = [sys.executable, "-m", "proxy", "serve", "--config", str(path)]
    rows, notes = [], []
    try:
        with contextlib.ExitStack() as stack:
            origin_args = [sys.executable, "-m", "bench.origin", "--port", str(origin_port)]
            stack.enter_context(process(origin_args, origin_port))
            with process(serve, port) as proc:
                stored = 0
                for level in LEVELS:
                    print(f"filling to {level} entries", file=sys.stderr, flush=True)
                    fill_rate = asyncio.run(fill(base, stored, level))
                    stored = level
                    rows.append(measure(binary, directory, base, admin, proc.pid, level, fill_rate))
                peak = rss_mb(proc.pid, "VmHWM")
                notes.append(f"peak RSS (VmHWM) over the series: {peak:.0f} MB")
            notes.extend(restart(serve, base, port, admin))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return rows, notes


def measure(
    binary: str, directory: Path, base: str, admin: int, pid: int, level: int, fill_rate: float
) -> str:
    script = directory / "random.lua"
    script.write_text(RANDOM_SCRIPT.replace("{n}", str(level)))
    hit = wrk(binary, base + PATH.format(0), {}, script)
    script = directory / "unique.lua"  # products/0.json?start=N: a new key every request
    base_id = 1_000_000_000 * (1 + LEVELS.index(level))
    script.write_text(f"local BASE = {base_id}\n{cache_bench.MISS_SCRIPT}")
    miss = wrk(binary, base + PATH.format(0), {}, script)
    rss = rss_mb(pid) or 0.0
    # Anonymous memory (the heap) apart from file pages (SQLite's mmap of the cache database,
    # where diskcache keeps bodies under 32 KB): the kernel reclaims the latter at will.
    anon, file = rss_mb(pid, "RssAnon") or 0.0, rss_mb(pid, "RssFile") or 0.0
    line = (
        f"| {level:,} | {entries(admin):,} | {hit.rps:.0f} | {hit.p99_ms:.2f} | {miss.rps:.0f} | "
        f"{miss.p99_ms:.2f} | {fill_rate:.0f} | {rss:.0f} ({anon:.0f} + {file:.0f}) |"
    )
    print(line, file=sys.stderr, flush=True)
    return line


def restart(serve: list[str], base: str, port: int, admin: int) -> list[str]:
    """Start the proxy again over the stored entries: to ready, to the first answer from disk."""
    started = time.monotonic()
    proc = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        wait_ready(admin, proc)
        ready = time.monotonic() - started
        with urllib.request.urlopen(base + PATH.format(LEVELS[-1] // 2), timeout=10) as r:
            r.read()
            cache = r.headers.get("X-Cache", "")
        first = time.monotonic() - started
        rss = rss_mb(proc.pid) or 0.0
        anon = rss_mb(proc.pid, "RssAnon") or 0.0
    finally:
        proc.terminate()
        proc.wait(30)
    return [
        f"start-up over {LEVELS[-1]:,} stored entries: ready in {ready:.2f} s, first stored "
        f"answer (X-Cache: {cache}) at {first:.2f} s, RSS then {rss:.0f} MB ({anon:.0f} anon)"
    ]


def main() -> int:
    started = time.monotonic()
    rows, notes = run()
    print(
        f"\n## Cost as the cache grows (8 KB entries on disk, memory tier "
        f"{MEMORY_SIZE // 1024**2} MB; wrk -t2 -c{cache_bench.CONNECTIONS} "
        f"-d{cache_bench.DURATION}s)\n"
    )
    print(
        "| stored | entries | fresh hit req/s | hit p99 ms | miss → store req/s | miss p99 ms "
        "| fill req/s (aiohttp client) | RSS MB (anon + file) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(row)
    print()
    for note in notes:
        print(note)
    print(f"\n(whole run {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0
