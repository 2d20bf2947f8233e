"""A revalidation's flight alone: CPU µs per request with every request a flight.

One proxy (one process, the local tier, asyncio's loop unless ``--loop``) in front of
bench/origin.py, pinned as bench/compare.py pins (the proxy on the server core, the origin
and wrk on the other); ``wrk -t1 -c1`` on the revalidated path (no cache rule), so each
request waits for its own conditional GET answered 304: the proxy's CPU per request is a
flight's cost plus one answer's (``--connections N``: N at once, flights shared). With
``--old DIR`` the proxy package in DIR is measured too, round after round interleaved;
``--profile OUT`` records the (first) proxy with ``py-spy record -f raw`` instead of
measuring (docs/performance.md, "A revalidation's flight, part by part"). ``--fresh``: the
fresh-hit path instead (a cache rule, no flight); ``--log-level info``: an access line a
request, to /dev/null (``--log-pipe``: to a pipe this process reads, as a container
runtime's), as a deployment writes by default.

    python -m bench.flight [--old DIR] [--rounds 3] [--seconds 5] [--profile OUT]
                           [--fresh] [--log-level info] [--log-pipe]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from bench import cache_bench
from bench.cache_bench import LOAD, SERVER, TOKEN, cpu_seconds, free_port, pin, process
from bench.compare import FRESH, REVALIDATED, get, served


def measure(
    wrk_binary: str, url: str, origin: str, pid: int, seconds: int, connections: int = 1
) -> tuple[float, float]:
    """CPU µs per request and upstream requests per request over one ``wrk -t1`` run."""
    before, cpu = served(origin), cpu_seconds(pid)
    args = [wrk_binary, "-t1", f"-c{connections}", f"-d{seconds}s"]
    args += ["-H", f"Authorization: Bearer {TOKEN}"]
    out = subprocess.run(
        [*args, url], capture_output=True, text=True, check=True, preexec_fn=pin(LOAD)
    ).stdout
    total = int(out.split(" requests in", 1)[0].rsplit(None, 1)[-1])
    spent = cpu_seconds(pid) - cpu
    return spent * 1e6 / max(1, total), (served(origin) - before) / max(1, total)


def drain(stream: IO[bytes] | None) -> None:
    """Read a proxy's stderr until it closes (the reader a deployment's log pipe has)."""
    while stream is not None and stream.read1(1 << 16):
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flight")
    p.add_argument("--old", help="a directory holding the other proxy package")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"))
    p.add_argument("--connections", type=int, default=1, help="wrk's (1: every request a flight)")
    p.add_argument("--profile", help="py-spy's raw output for the (new) proxy; no measuring")
    p.add_argument("--fresh", action="store_true", help="the fresh-hit path (no flight)")
    p.add_argument("--log-level", choices=("warning", "info"), default="warning")
    p.add_argument("--log-pipe", action="store_true", help="stderr a pipe read here, not /dev/null")
    a = p.parse_args(argv)
    wrk_binary = shutil.which("wrk")
    if wrk_binary is None:
        raise SystemExit("bench: needs wrk (apt-get install wrk)")
    trees = {"new": str(Path.cwd())}
    if a.old:
        trees["old"] = str(Path(a.old).resolve())
    directory = Path(tempfile.mkdtemp(prefix="kounta-flight-"))
    origin_port = free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    py = sys.executable
    try:
        with contextlib.ExitStack() as stack:
            origin_args = [py, "-m", "bench.origin", "--port", str(origin_port)]
            stack.enter_context(process(origin_args, origin_port, role=LOAD))
            servers = {}
            for name, tree in trees.items():
                port = free_port()
                rule = "/v1/companies/*/products/*" if a.fresh else "/v1/none"
                config = cache_bench.proxy_config(
                    directory, origin, port, True, rule=rule, event_loop=a.loop,
                    log_level=a.log_level,
                )  # fmt: skip
                args = [py, "-m", "proxy", "serve", "--config", str(config)]
                # An access line a request: nobody reads a pipe while it runs.
                err = subprocess.DEVNULL if a.log_level == "info" else subprocess.PIPE
                if a.log_pipe:  # read as a container runtime reads it, by a thread here
                    err = subprocess.PIPE
                proc = stack.enter_context(process(args, port, cwd=tree, role=SERVER, stderr=err))
                if a.log_pipe:
                    threading.Thread(target=drain, args=(proc.stderr,), daemon=True).start()
                url = f"http://127.0.0.1:{port}{FRESH if a.fresh else REVALIDATED}"
                for _ in range(3):
                    status, _ = get(url, {"Authorization": f"Bearer {TOKEN}"})
                    if status != 200:
                        raise SystemExit(f"bench: {name} answered {status}")
                servers[name] = (url, proc.pid)
            if a.profile:
                url, pid = servers["new"]
                spy = [shutil.which("py-spy") or str(Path(py).with_name("py-spy")), "record"]
                spy += ["-r", "500", "-d", str(a.seconds), "-f", "raw", "-o", a.profile]
                with subprocess.Popen([*spy, "-p", str(pid)]) as recording:
                    measured = measure(wrk_binary, url, origin, pid, a.seconds, a.connections)
                    recording.wait()
                spent, up = measured
                per_flight = f", µs per flight (all of it) {spent / up:.0f}" if up else ""
                print(f"profiled: {spent:.0f} µs/req, upstream/req {up:.3f}{per_flight}")
                return 0
            found: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
            for round_no in range(a.rounds):
                order = list(servers) if round_no % 2 == 0 else list(reversed(servers))
                for name in order:
                    url, pid = servers[name]
                    result = measure(wrk_binary, url, origin, pid, a.seconds, a.connections)
                    found[name].append(result)
            for name, each in found.items():
                cpu = [c for c, _ in each]
                ups = [u for _, u in each]
                print(
                    f"{name}: CPU µs/req median {statistics.median(cpu):.0f} "
                    f"(min-max {min(cpu):.0f}-{max(cpu):.0f}), rounds "
                    f"{', '.join(f'{c:.0f}' for c in cpu)}; upstream/req "
                    f"{min(ups):.3f}-{max(ups):.3f}"
                )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
