"""Before/after: the proxy of another checkout against this one (python -m bench.ab --old DIR).

DIR holds the other ``proxy`` package, e.g. ``mkdir /tmp/old && git archive REV proxy | tar -x
-C /tmp/old``; its proxies run with DIR as their working directory, so ``python -m proxy``
imports that package first. Both trees serve bench/origin.py's paths (fresh hit 8 KB and
revalidated 8 KB, ``--inm`` adds a caller's If-None-Match), each on asyncio's loop and on
uvloop, in ``--rounds`` interleaved rounds (each scenario's servers in an order turned by one
each round: :func:`turned`); per row the medians of requests/s, the proxy's
CPU time per request (steadier than req/s on a shared machine), p99 and upstream requests per
caller request, the proxy's CPU seconds per second of the run (``busy``: below 1 it waited,
e.g. on the upstream), and the min-max over the rounds of req/s over the same server's fresh
hit in the same round. Pinned as the comparison is (bench.cache_bench.pin:
``KOUNTA_BENCH_PIN=0`` turns it off). ``--log-level info``: the proxies write an access line
a request (to /dev/null), as a deployment does by default; the bench's own level is warning.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import compare
from bench.cache_bench import LOAD, SERVER, cpu_seconds, free_port, process, wrk

HERE = str(Path(__file__).resolve().parent.parent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab")
    p.add_argument("--old", required=True, help="a directory holding the other proxy package")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--inm", action="store_true", help="also a caller's If-None-Match (304)")
    p.add_argument("--connections", type=int, default=compare.DEFAULT_CONNECTIONS)
    p.add_argument(
        "--log-level",
        choices=("warning", "info"),
        default="warning",
        help="the proxies' log level (info: an access line a request, to /dev/null)",
    )
    args = p.parse_args(argv)
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("bench: needs wrk (apt-get install wrk)")
    scenarios = [s for s in compare.SCENARIOS if s.key in ("fresh", "reval", "inm")]
    if not args.inm:
        scenarios = [s for s in scenarios if s.key != "inm"]
    directory = Path(tempfile.mkdtemp(prefix="kounta-ab-"))
    origin_port = free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    servers: dict[str, tuple[str, int]] = {}
    results: dict[tuple[str, str], list[tuple[float, float, float, float, float]]] = {}
    # Each round's req/s over the same server's fresh hit in that round (min-max printed).
    ratios: dict[tuple[str, str], list[float]] = {}
    try:
        with contextlib.ExitStack() as stack:
            origin_args = [sys.executable, "-m", "bench.origin", "--port", str(origin_port)]
            stack.enter_context(process(origin_args, origin_port, role=LOAD))
            for tree, cwd in (("old", args.old), ("new", HERE)):
                for loop in compare.LOOPS:
                    port = free_port()
                    sub = directory / tree
                    sub.mkdir(exist_ok=True)
                    config = compare.proxy_config(sub, origin, port, loop, args.log_level)
                    serve = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
                    err = subprocess.DEVNULL if args.log_level == "info" else subprocess.PIPE
                    proc = stack.enter_context(
                        process(serve, port, cwd=cwd, role=SERVER, stderr=err)
                    )
                    servers[f"{tree}, {loop}"] = (f"http://127.0.0.1:{port}", proc.pid)
            etags = compare.warm(servers, {})
            names = list(servers)
            for round_no in range(1, args.rounds + 1):
                print(f"round {round_no} of {args.rounds}", file=sys.stderr, flush=True)
                for s in scenarios:
                    for name in turned(names, round_no - 1):
                        url, pid = servers[name]
                        headers = {"If-None-Match": etags[name]} if s.inm else {}
                        cpu, before = cpu_seconds(pid), compare.served(origin)
                        r = wrk(binary, url + s.path, headers, None, args.connections, LOAD)
                        used = cpu_seconds(pid) - cpu
                        spent = used * 1e6 / max(1, r.requests)
                        up = (compare.served(origin) - before) / max(1, r.requests)
                        # CPU seconds per second of the run: how busy the proxy's one thread
                        # was (a revalidating proxy idles while every caller waits on a flight).
                        busy = used * r.rps / max(1, r.requests)
                        row = (r.rps, spent, r.p99_ms, up, busy)
                        results.setdefault((s.key, name), []).append(row)
                        fresh = results.get(("fresh", name))
                        if fresh is not None:  # this round's fresh hit, same server
                            ratios.setdefault((s.key, name), []).append(r.rps / fresh[-1][0])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    labels = {s.key: s.label for s in scenarios}
    head = "| scenario | tree, loop | req/s | CPU µs/req | p99 ms | upstream/req | busy |"
    print(head + " / own fresh |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (key, name), runs in results.items():
        rps, cpu, p99, up, busy = (statistics.median(c) for c in zip(*runs, strict=True))
        each = ratios[(key, name)]
        spread = f"{min(each):.2f}-{max(each):.2f}"
        cells = f"{rps:.0f} | {cpu:.1f} | {p99:.2f} | {up:.3f} | {busy:.2f} | {spread}"
        print(f"| {labels[key]} | {name} | {cells} |")
    return 0


def turned(names: list[str], round_no: int) -> list[str]:
    """The servers' order in round ``round_no`` (from 0): turned by one each round, so that
    no tree and loop is always measured first or last in a scenario (a fixed order read the
    last server's fresh hit slower in every run, the same code in both trees included)."""
    turn = round_no % len(names)
    return names[turn:] + names[:turn]


if __name__ == "__main__":
    sys.exit(main())
