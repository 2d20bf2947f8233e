"""The access log of the real ``kounta-proxy serve``: its lines reach stderr whole, in
order, while the proxy runs, and before it ends, by SIGTERM's drain or by a second SIGTERM
at once (what batching the lines' writes would have to keep; docs/performance.md, "The
access line's write")."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.e2e.test_demo import COMMAND, free_port
from tests.e2e.test_lifecycle import CALLER_KEY, get, wait_until, write_config

THREADS, EACH = 4, 30


@dataclass
class Serving:
    proc: subprocess.Popen[bytes]
    err: IO[str]
    url: str


@contextlib.contextmanager
def serving(tmp_path: Path, sandbox_url: str, drain_delay: float = 0.0) -> Iterator[Serving]:
    """``serve`` at log level info, its stderr a file read while it runs; killed if left."""
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, sandbox_url, port, admin_port)
    text = config.read_text().replace('level = "debug"', 'level = "info"')
    config.write_text(text.replace("[server]\n", f"[server]\ndrain_delay = {drain_delay}\n"))
    with (tmp_path / "stderr").open("w+") as err:
        proc = subprocess.Popen(
            [COMMAND, "serve", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            wait_until(lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200)
            yield Serving(proc, err, f"http://127.0.0.1:{port}")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def lines(err: IO[str]) -> list[dict[str, Any]]:
    """Every line so far, each one whole JSON object (a torn line fails json.loads)."""
    text = (err.seek(0), err.read())[1]
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def requests(proxy: str, tag: str) -> None:
    """THREADS callers at once, EACH requests one after the other, ids tagged in order."""

    def caller(k: int) -> None:
        for n in range(EACH):
            headers = {"X-Proxy-Key": CALLER_KEY, "X-Request-ID": f"{tag}-{k}-{n:03d}"}
            assert get(f"{proxy}/v1/companies/me.json?n={n}", headers)[0] == 200

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def access_ids(found: list[dict[str, Any]], tag: str) -> list[str]:
    return [e["request_id"] for e in found if e["event"] == "request" and tag in e["request_id"]]


def in_order(ids: list[str], tag: str) -> None:
    """Every request's line once; each caller's lines in the order it asked."""
    assert sorted(ids) == sorted(f"{tag}-{k}-{n:03d}" for k in range(THREADS) for n in range(EACH))
    for k in range(THREADS):
        mine = [i for i in ids if i.startswith(f"{tag}-{k}-")]
        assert mine == sorted(mine)


def test_access_lines_are_out_while_serving_whole_in_order_and_the_last_before_exit(
    tmp_path: Path, sandbox_url: str
) -> None:
    with serving(tmp_path, sandbox_url) as proxy:
        requests(proxy.url, "a")
        # Out while the proxy runs, not only when it ends.
        wait_until(lambda: len(access_ids(lines(proxy.err), "a")) == THREADS * EACH, timeout=5)
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(15) == 0
        found = lines(proxy.err)
    in_order(access_ids(found, "a"), "a")
    assert found[-1]["event"] == "stopped"


def test_a_second_sigterm_in_the_drain_ends_at_once_with_every_line_written(
    tmp_path: Path, sandbox_url: str
) -> None:
    """Requests answered during the drain delay, then a second SIGTERM: the process ends by
    the signal at once, and every answer's line is in the log."""
    with serving(tmp_path, sandbox_url, drain_delay=30) as proxy:
        proxy.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: any(e["event"] == "shutdown" for e in lines(proxy.err)), timeout=5)
        requests(proxy.url, "d")
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(5) == -signal.SIGTERM
        found = lines(proxy.err)
    in_order(access_ids(found, "d"), "d")
    assert "stopped" not in [e["event"] for e in found]
