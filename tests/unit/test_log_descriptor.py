"""configure()'s handler writing lines straight to the process's stderr descriptor: the
bytes the stream would have written, in order, nothing lost on a full non-blocking pipe."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from proxy.edge.middlewares import plain_line
from proxy.logs import configure, event, log
from tests.unit.test_access_line import REQUESTS
from tests.unit.test_logs import restore_logging  # noqa: F401 (the fixture)

# The lines both sides write: events with awkward values, the fast path's access line,
# a record through logging (a filter-free handler's own emit), after a part line written
# straight to the stream.
WRITE = """
import logging, sys, time
time.time = lambda: 1765000000.1234
from proxy.edge.middlewares import plain_line
from proxy.logs import configure, event, log
from tests.unit.test_access_line import REQUESTS
from tests.unit.test_log_descriptor import write_lines
"""

FIELDS: dict[str, Any] = {
    "path": '/v1/ä?x="1"\\ \u2028 😀',
    "lone": "\ud800 surrogate",
    "control": "\x00\n\t",
    "ms": 0.05,
    "nothing": None,
    "n": [1, "two"],
}


def write_lines(count: int) -> None:
    """What the child and the parent both write after configure()."""
    sys.stderr.write("part line, then ")
    for index in range(count):
        event("request", index=index, **FIELDS)
        request = REQUESTS[index % len(REQUESTS)]
        plain_line(request, f"id{index}", "pos-1", "acct-9", "/v1/products", 200, "HIT", 8, 0.5)  # type: ignore[arg-type]
        log.warning("record", extra={"fields": {"index": index, "lone": "\udcff"}})


def expected(count: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """The text the same calls write through a text stream (the old way)."""
    monkeypatch.setattr("time.time", lambda: 1765000000.1234)
    out = io.StringIO()
    configure("info", "json", out)
    original, sys.stderr = sys.stderr, out
    try:
        write_lines(count)
    finally:
        sys.stderr = original
    return out.getvalue()


def child(code: str, unbuffered: bool = False, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Python running ``code``; its stderr line-buffered (the default) or, ``unbuffered``,
    written through to the descriptor (PYTHONUNBUFFERED, as containers often set)."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([sys.executable, "-c", WRITE + code], cwd=root, env=env, **kwargs)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("unbuffered", [False, True])
def test_lines_to_the_processs_stderr_are_the_streams_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unbuffered: bool
) -> None:
    """The deployed log (the process's stderr, here a file): configure()'s handler writes
    the lines to the descriptor itself, each the bytes the stream's encoder and error
    handler make (a lone surrogate backslash-escaped), after what was written through the
    stream before, records in between in order."""
    code = """
configure("info", "json")
print(log.handlers[0]._raw is not None, sys.stderr.encoding, sys.stderr.errors)
write_lines(3)
"""
    with (tmp_path / "stderr").open("wb") as err:
        proc = child(code, unbuffered, stdout=subprocess.PIPE, stderr=err)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    direct, encoding, errors = out.decode().split()
    assert direct == "True"  # the descriptor's way was taken
    written = (tmp_path / "stderr").read_bytes()
    assert written == expected(3, monkeypatch).encode(encoding, errors)
    assert b"\\ud800 surrogate" in written and written.count(b"\n") == 9


@pytest.mark.usefixtures("restore_logging")
def test_a_full_non_blocking_pipe_holds_the_lines_as_the_stream_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stderr (line-buffered, the default) a non-blocking pipe nobody reads yet, filled:
    the lines written meanwhile are held in the stream's buffer as it holds its own (not
    raised, not lost) and written whole and in order once the pipe drains."""
    code = """
import os
logging.raiseExceptions = False  # the failed flushes unreported: only the lines on stderr
configure("info", "json")
os.set_blocking(2, False)
try:
    while True:
        os.write(2, b"#" * 4095 + b"\\n")  # whole filler lines (a pipe's atomic size)
except BlockingIOError:
    pass
write_lines(2)  # held: the pipe is full
print("full", flush=True)
sys.stdin.readline()  # the parent reads the pipe now
os.set_blocking(2, True)
write_lines(2)
"""
    with child(code, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
        assert proc.stdout.readline() == b"full\n"
        read: list[bytes] = []
        reader = threading.Thread(target=lambda: read.append(proc.stderr.read()))  # type: ignore[union-attr]
        reader.start()
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        reader.join(timeout=60)
    ours = [line for line in read[0].split(b"\n") if not line.startswith(b"#")]
    once = expected(2, monkeypatch).encode("utf-8", "backslashreplace").split(b"\n")[:-1]
    assert ours == [*once, *once, b""]


def test_a_stream_other_than_the_processs_own_is_written_through_the_stream(
    tmp_path: Path,
) -> None:
    """Any other text file (its newline translation cannot be asked) goes through the
    stream, as before: the same lines."""
    with (tmp_path / "log").open("w", buffering=1, newline="\r\n", encoding="utf-8") as f:
        configure("info", "json", f)
        try:
            assert log.handlers[0]._raw is None  # type: ignore[attr-defined]
            event("request", status=200)
        finally:
            logging.getLogger("kounta_proxy").handlers[:] = []
    assert (tmp_path / "log").read_bytes().endswith(b'"status":200}\r\n')
