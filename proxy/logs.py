"""Logging: one JSON object per line (or plain text for a terminal).

Events carry their data in ``extra={"fields": {...}}``; nothing here ever
formats a secret, because callers never pass one in.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

LOGGER = "kounta_proxy"
log = logging.getLogger(LOGGER)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(entry, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``12:04:05.123 info    request  method=GET status=200 ...`` for a terminal.

    Values with spaces are quoted, nested values are compact JSON; the level is
    coloured only when ``color`` is set (a TTY without ``NO_COLOR``).
    """

    COLORS = {"debug": "2", "info": "32", "warning": "33", "error": "31", "critical": "1;31"}

    def __init__(self, color: bool = False) -> None:
        super().__init__()
        self.color = color

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        tail = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        level = record.levelname.lower()
        shown = f"{level:7}"
        if self.color:
            shown = f"\x1b[{self.COLORS.get(level, '0')}m{shown}\x1b[0m"
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{clock}.{int(record.created % 1 * 1000):03d} {shown} {record.getMessage():16}"
        if record.exc_info and record.exc_info[0] is not None:
            tail += (
                f" exception={_text_value(f'{record.exc_info[0].__name__}: {record.exc_info[1]}')}"
            )
        return f"{text} {tail}".rstrip()


def _text_value(value: Any) -> str:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


_last_second: list[tuple[int, str]] = [(-1, "")]


def _iso(created: float) -> str:
    second = int(created)
    cached_second, prefix = _last_second[0]
    if second != cached_second:
        # strftime is the slow part; within one second every line shares the prefix.
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second[0] = (second, prefix)
    return f"{prefix}.{int(created % 1 * 1000):03d}Z"


def configure(level: str = "info", fmt: str = "json", stream: IO[str] | None = None) -> None:
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    color = out.isatty() and not os.environ.get("NO_COLOR")
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(color=color))
    root = logging.getLogger(LOGGER)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # aiohttp's own loggers: keep their warnings, in our format, without tracebacks spam.
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.client", "asyncio"):
        other = logging.getLogger(name)
        other.handlers[:] = [handler]
        other.setLevel(logging.WARNING)
        other.propagate = False


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, name, extra={"fields": fields})


def set_level(level: str) -> None:
    """Change the proxy's log level while it runs (a SIGHUP reload)."""
    logging.getLogger(LOGGER).setLevel(level.upper())
