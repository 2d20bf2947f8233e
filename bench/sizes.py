"""Cost as the cache grows (python -m bench.run --sizes; a few minutes).

Three proxies (their default event loop) in front of bench/origin.py, each over a cache of
its own holding 1k, 10k or 100k entries of 8 KB (one product fetched through the proxy, then
copied under the other ids as the store writes records: :func:`populate`), with a memory
tier smaller than every set (MEMORY_SIZE), so most hits are read from disk. In ROUNDS
interleaved rounds, for each proxy: the fresh-hit rate over random stored keys, the
miss → store rate (unique keys, each fetched and stored) and the proxy's RSS (VmRSS: anonymous
+ file pages, and apart) after each run; min-max over the rounds. Start-up over 100k entries:
``--startup`` (bench/startup.py). Targets (issue 21): the rates within 20 % of each other, RSS
≤ cache.memory_size + 100 MB throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import cache_bench
from bench.cache_bench import TOKEN, cpu_seconds, free_port, process, rss_mb, wrk
from bench.workers_bench import wait_ready
from proxy.cache.keys import cache_key
from proxy.cache.memory import Stored
from proxy.cache.store import CacheStore
from proxy.cache.store import _share as share

LEVELS = (1_000, 10_000, 100_000)
MEMORY_SIZE = 4 * 1024**2  # below 1k x 8 KB: the memory tier never holds a whole set
PATH = "/v1/companies/5001/products/{}.json"  # fresh for an hour (the rule below)
ROUNDS = 3
HERE = str(Path(__file__).resolve().parent.parent)
BATCH = 5000  # records copied in one transaction

RANDOM_SCRIPT = """
local N = {n}
function setup(thread) thread:set("seed", math.random(1, 1000000)) end
function init() math.randomseed(seed) end
function request()
  return wrk.format(nil, "/v1/companies/5001/products/" .. math.random(0, N - 1) .. ".json")
end
"""


def config(
    directory: Path, upstream: str, port: int, admin: int, memory: int = MEMORY_SIZE, more: str = ""
) -> Path:
    """A proxy whose rule makes the products fresh for an hour; ``more``: further sections."""
    path = directory / "proxy-sizes.toml"
    path.write_text(
        f'state_dir = "{directory / "state"}"\n'
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nbase_url = "{upstream}"\n'
        '[log]\nlevel = "warning"\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {admin}\n'
        f"[cache]\nmax_size = {8 * 1024**3}\nmemory_size = {memory}\n"
        '[[cache.rules]]\npath = "/v1/companies/*/products/*"\nfresh_for = 3600.0\n'
        f'[accounts.main]\nmode = "static"\ntoken = "{TOKEN}"\nrate_per_minute = 100000000\n'
        f"{more}"
    )
    return path


def entries(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(r"^kounta_proxy_cache_entries (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else -1


@dataclass
class Level:
    """One proxy over a cache of ``stored`` entries, and what its runs measured."""

    tree: str
    stored: int
    base: str
    admin: int
    pid: int
    hits: list[float] = field(default_factory=list)
    hit_p99: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # µs of the proxy's CPU per fresh hit
    misses: list[float] = field(default_factory=list)
    miss_p99: list[float] = field(default_factory=list)
    rss: list[tuple[float, float, float]] = field(default_factory=list)  # all, anon, file

    def sample(self) -> None:
        fields = ("VmRSS", "RssAnon", "RssFile")
        found = [rss_mb(self.pid, name) or 0.0 for name in fields]
        self.rss.append((found[0], found[1], found[2]))


async def populate(directory: Path, count: int, first: int = 0) -> None:
    """Copy the one stored product (products/0) under the ids ``first`` .. ``count`` - 1, as
    the store writes records, BATCH to a transaction."""
    store = await CacheStore.open(directory, 8 * 1024**3, 0)
    try:
        template = await store.get(cache_key("main", PATH.format(0), "", {}))
        if template is None or template.body is None:
            raise SystemExit("bench: the template entry was not stored")
        for start in range(first, count, BATCH):
            batch = []
            for n in range(start, min(count, start + BATCH)):
                path = PATH.format(n)
                entry = dataclasses.replace(template.entry, path=path)
                batch.append((cache_key("main", path, "", {}), Stored(entry, template.body)))
            await store._run(_write, store, batch)
    finally:
        await store.close()


def _write(store: CacheStore, batch: list[tuple[str, Stored]]) -> None:
    """As the store writes a record (tagged with its share), many in one transaction."""
    with store.disk.transact():
        for key, stored in batch:
            store.disk.set(key, stored, tag=share(key, stored))


def start(
    stack: contextlib.ExitStack,
    directory: Path,
    upstream: str,
    stored: int,
    tree: str,
    cwd: str,
    memory: int = MEMORY_SIZE,
) -> Level:
    """A proxy of the tree in ``cwd`` over a cache of ``stored`` entries (one fetched by a
    proxy of this tree, the others copied in before it starts)."""
    port, admin = free_port(), free_port()
    sub = directory / f"{len(tree)}-{stored}"
    sub.mkdir()
    path = config(sub, upstream, port, admin, memory)
    serve = [sys.executable, "-m", "proxy", "serve", "--config", str(path)]
    base = f"http://127.0.0.1:{port}"
    with process(serve, port):
        cache_bench.fetch(base + PATH.format(0))  # the template, stored by the proxy itself
    asyncio.run(populate(sub / "state" / "cache", stored, 1))
    proc = subprocess.Popen(serve, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(_stop, proc)
    wait_ready(admin, proc, 120.0)  # before issue 21, start-up walked every key
    return Level(tree, stored, base, admin, proc.pid)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(binary: str, directory: Path, level: Level, round_no: int) -> None:
    script = directory / f"random-{level.stored}.lua"
    script.write_text(RANDOM_SCRIPT.replace("{n}", str(level.stored)))
    cpu = cpu_seconds(level.pid)
    hit = wrk(binary, level.base + PATH.format(0), {}, script)
    level.cpu.append((cpu_seconds(level.pid) - cpu) * 1e6 / max(1, hit.requests))
    level.sample()
    script = directory / "unique.lua"  # products/0.json?start=N: a new key every request
    base_id = 1_000_000_000 * (1 + round_no)
    script.write_text(f"local BASE = {base_id}\n{cache_bench.MISS_SCRIPT}")
    miss = wrk(binary, level.base + PATH.format(0), {}, script)
    level.sample()
    level.hits.append(hit.rps)
    level.hit_p99.append(hit.p99_ms)
    level.misses.append(miss.rps)
    level.miss_p99.append(miss.p99_ms)
    print(
        f"{level.tree} {level.stored}: hit {hit.rps:.0f}/s {level.cpu[-1]:.0f} µs, "
        f"miss {miss.rps:.0f}/s, RSS {level.rss[-1]}",
        file=sys.stderr,
        flush=True,
    )


def span(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def row(level: Level) -> str:
    peak = max(level.rss)
    measured = (level.hits, level.hit_p99, level.cpu, level.misses, level.miss_p99)
    hwm = rss_mb(level.pid, "VmHWM") or 0.0
    cells = [level.tree, f"{level.stored:,}", f"{entries(level.admin):,}"]
    cells += [span(values) for values in measured]
    cells += [f"{peak[0]:.0f} ({peak[1]:.0f} + {peak[2]:.0f})", f"{hwm:.0f}"]
    return f"| {' | '.join(cells)} |"


def spread(levels: list[Level], pick: str) -> str:
    """Largest / smallest median across the sizes (the goal: within 20 %)."""
    medians = [statistics.median(getattr(level, pick)) for level in levels]
    return f"{max(medians) / max(1e-9, min(medians)):.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run --sizes")
    p.add_argument("--old", help="a directory holding another proxy package (as bench.ab)")
    p.add_argument("--memory", type=float, default=MEMORY_SIZE / 1024**2, help="memory tier, MB")
    args = p.parse_args(argv)
    trees = [("this tree", HERE)] + ([("--old", args.old)] if args.old else [])
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("bench: the size series needs wrk (apt-get install wrk)")
    began = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="kounta-sizes-"))
    origin_port = free_port()
    upstream = f"http://127.0.0.1:{origin_port}"
    try:
        with contextlib.ExitStack() as stack:
            origin = [sys.executable, "-m", "bench.origin", "--port", str(origin_port)]
            stack.enter_context(process(origin, origin_port))
            levels = [
                start(stack, directory, upstream, n, tree, cwd, int(args.memory * 1024**2))
                for tree, cwd in trees
                for n in LEVELS
            ]
            print(f"filled in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
            for round_no in range(ROUNDS):
                for level in levels if round_no % 2 == 0 else levels[::-1]:
                    measure(binary, directory, level, round_no)
            rows = [row(level) for level in levels]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(
        f"\n## Cost as the cache grows (8 KB entries on disk, memory tier "
        f"{args.memory:g} MB; wrk -t2 -c{cache_bench.CONNECTIONS} "
        f"-d{cache_bench.DURATION}s; min-max of {ROUNDS} interleaved rounds)\n"
    )
    print(
        "| proxy | stored | entries at the end | fresh hit req/s | hit p99 ms | CPU µs per hit "
        "| miss → store req/s | miss p99 ms | peak RSS MB (anon + file) | VmHWM MB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for line in rows:
        print(line)
    print("\nLargest / smallest median over the sizes (goal ≤ 1.20):\n")
    for tree, _ in trees:
        mine = [level for level in levels if level.tree == tree]
        print(
            f"- {tree}: fresh hit {spread(mine, 'hits')}, CPU per hit {spread(mine, 'cpu')}, "
            f"miss → store {spread(mine, 'misses')}"
        )
    print(f"\n(whole run {time.monotonic() - began:.0f} s)", file=sys.stderr)
    return 0
