"""Logging: one JSON object per line (or plain text for a terminal).

Events carry their data in ``extra={"fields": {...}}``; nothing here ever
formats a secret, because callers never pass one in.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from json.encoder import encode_basestring  # the string encoder of ensure_ascii=False
from typing import IO, Any

LOGGER = "kounta_proxy"
log = logging.getLogger(LOGGER)
# Set by `serve --workers N` in each worker (proxy.ops.workers): every line says which wrote it.
WORKER_ENV = "KOUNTA_WORKER_INDEX"
_worker: list[int | None] = [None]
_worker_field = [""]  # the worker's member of a Fixed line: "" or ',"worker":N'


def set_worker(index: int | None) -> None:
    """Stamp every log line of this process with ``"worker": index`` (None: no field)."""
    _worker[0] = index
    _worker_field[0] = "" if index is None else f',"worker":{_encoded(index)}'


def worker_from_env() -> int | None:
    """The worker index the ``serve --workers`` parent gave this process, if any."""
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


# One encoder for every line (json.dumps with these options builds one per call).
_JSON = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        exception = None
        if record.exc_info and record.exc_info[0] is not None:
            exception = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        fields = getattr(record, "fields", {})
        return json_line(
            record.created, record.levelname.lower(), record.getMessage(), fields, exception
        )


def json_line(
    created: float, level: str, message: str, fields: dict[str, Any], exception: str | None = None
) -> str:
    """One JSON log line (:class:`JsonFormatter`'s), without its newline."""
    entry: dict[str, Any] = {"time": _iso(created), "level": level, "event": message}
    if _worker[0] is not None:
        entry["worker"] = _worker[0]
    entry.update(fields)
    if exception is not None:
        entry["exception"] = exception
    return _JSON.encode(entry)


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
        if _worker[0] is not None:
            fields = {"worker": _worker[0], **fields}
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
# A line's milliseconds and "Z", by int(created % 1 * 1000) (1000 when the product rounds
# up to it, as the format "{:03d}" spelled it).
_MILLIS = tuple(f".{milli:03d}Z" for milli in range(1001))


def _iso(created: float) -> str:
    second = int(created)
    cached_second, prefix = _last_second[0]
    if second != cached_second:
        # strftime is the slow part; within one second every line shares the prefix.
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second[0] = (second, prefix)
    return prefix + _MILLIS[int(created % 1 * 1000)]


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
    if not log.isEnabledFor(level):
        return
    handler = _direct(level)
    if handler is None:
        log.log(level, name, extra={"fields": fields})
        return
    # The line the logging call would write, without its record (a LogRecord, the caller's
    # frame found, handlers looked up: more than half of an access line's cost).
    _emit(handler, level, name, json_line, logging.getLevelName(level).lower(), name, fields)


def _emit(
    handler: logging.StreamHandler[IO[str]],
    level: int,
    name: str,
    build: Callable[..., str],
    *args: Any,
) -> None:
    """Write ``build(now, *args)`` and the handler's newline to the handler's stream, as
    ``StreamHandler.emit`` does: under its lock, flushed, a failure reported, not raised."""
    created = time.time()
    handler.acquire()
    try:
        handler.stream.write(build(created, *args) + handler.terminator)
        handler.flush()
    except RecursionError:
        raise
    except Exception:  # as StreamHandler.emit: reported by the handler, never raised
        handler.handleError(log.makeRecord(LOGGER, level, __file__, 0, name, (), None))
    finally:
        handler.release()


class Fixed:
    """An event whose fields are the same keys in the same order every time (the access
    line): ``write(*values)`` writes the line :func:`event` would with those keys, the same
    bytes, from the keys encoded once and each value through json's own encodings (a str,
    int, float, bool or None as the JSON encoder spells it; anything else by the encoder).
    No field dict, no encoder built a line."""

    __slots__ = (
        "_count", "_encoders", "_kinds", "_known", "_template", "all_keys", "keys", "level",
        "name",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        keys: tuple[str, ...],
        level: int = logging.INFO,
        known: dict[str, Any] | None = None,
        kinds: dict[str, object] | None = None,
    ) -> None:
        """``known``: fields with the same value in every line (encoded into the line's
        template once); :attr:`keys` are the others, the values ``write`` takes.
        ``kinds``: fields whose value is always of one type (:meth:`typed`)."""
        self.name, self.all_keys, self.level = name, keys, level
        self._known = known = dict(known or {})
        self._kinds = kinds = dict(kinds or {})
        self.keys = tuple(key for key in keys if key not in known)
        self._count = len(self.keys)
        # Every value through its type's encoder, chosen here (typed); else None: each
        # value's type tested in line().
        self._encoders = (
            tuple(_KINDS[kinds[key]] if key in kinds else _encoded for key in self.keys)
            if kinds
            else None
        )
        level_name = logging.getLevelName(level).lower()
        # The whole line as one %-template: the time, the worker field ("" without one),
        # then each key and its value, encoded here when known, else a %s (the % of a key,
        # the name or a known value doubled). After the time: '","level":"info",...'.
        head = '",' + _JSON.encode({"level": level_name, "event": name})[1:-1]
        parts = ['{"time":"%s', head.replace("%", "%%"), "%s"]
        for key in keys:
            parts.append(f",{encode_basestring(key)}:".replace("%", "%%"))
            parts.append(_encoded(known[key]).replace("%", "%%") if key in known else "%s")
        self._template = "".join(parts) + "}"

    def knowing(self, **known: Any) -> Fixed:
        """This event with ``known`` fields the same in every line: its ``write`` takes
        the other fields' values, in order."""
        return Fixed(self.name, self.all_keys, self.level, {**self._known, **known}, self._kinds)

    def typed(self, **kinds: object) -> Fixed:
        """This event with each of ``kinds``' fields always of that type: ``str``,
        ``int``, ``float`` or ``str | None``. Its values are encoded by their type's
        encoder without a test a value; the line is the same (a str or int subclass, such
        as an enum, spelled as the JSON encoder spells it). The caller keeps to the kinds:
        a bool given for an int would be spelled ``True``, another type is reported as a
        failed line."""
        unknown = [kind for kind in kinds.values() if kind not in _KINDS]
        if unknown:
            raise ValueError(f"no encoder for the kinds {unknown}")
        return Fixed(self.name, self.all_keys, self.level, self._known, {**self._kinds, **kinds})

    def write(self, *values: Any) -> None:
        """The event with ``values`` (one for each of :attr:`keys`, in order)."""
        if not log.isEnabledFor(self.level):
            return
        handler = _direct(self.level)
        if handler is None:
            given = dict(zip(self.keys, values, strict=True))
            known = self._known
            fields = {key: given[key] if key in given else known[key] for key in self.all_keys}
            log.log(self.level, self.name, extra={"fields": fields})
            return
        _emit(handler, self.level, self.name, self.line, values)

    def line(self, created: float, values: tuple[Any, ...]) -> str:
        """:func:`json_line`'s line for these values, without its newline."""
        if len(values) != self._count:
            raise ValueError(f"{self._count} values expected, {len(values)} given")
        encoders = self._encoders
        # _iso's text is digits and "-T:.Z": nothing in it JSON escapes.
        if encoders is not None:
            return self._template % (
                _iso(created), _worker_field[0], *map(_call, encoders, values)
            )  # fmt: skip
        # Locals: a global or attribute looked up per value costs as much as its encoding.
        string, scalar, other = encode_basestring, _ENCODERS.get, _JSON.encode
        return self._template % (
            _iso(created),
            _worker_field[0],
            *[
                string(value)
                if type(value) is str
                else "null"
                if value is None
                else scalar(type(value), other)(value)
                for value in values
            ],
        )


def _float(value: float) -> str:
    """A float as the JSON encoder spells it (repr; NaN and the infinities as JavaScript's)."""
    text = float.__repr__(value)
    return _NONFINITE.get(text, text)


_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
# Exactly these types (a subclass, e.g. an enum, goes through the encoder).
_ENCODERS: dict[type, Callable[[Any], str]] = {
    str: encode_basestring,
    int: int.__repr__,
    float: _float,
    bool: {True: "true", False: "false"}.__getitem__,
    type(None): "null".format,  # format ignores its argument: "null"
}


def _encoded(value: Any) -> str:
    return _ENCODERS.get(type(value), _JSON.encode)(value)


def _text_or_null(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


_call = operator.call
# Fixed.typed's kinds and their encoders.
_KINDS: dict[object, Callable[[Any], str]] = {
    str: encode_basestring,
    int: int.__repr__,
    float: _float,
    str | None: _text_or_null,
}


def _direct(level: int) -> logging.StreamHandler[IO[str]] | None:
    """The handler :func:`configure` set up, when an event at ``level`` goes to it alone,
    unfiltered, as a JSON line: :func:`event` writes that line itself; else None (the
    logging call, e.g. a test capturing records)."""
    handlers = log.handlers
    if len(handlers) != 1 or log.propagate or log.filters or log.disabled:
        return None
    handler = handlers[0]
    if (
        type(handler) is not logging.StreamHandler
        or type(handler.formatter) is not JsonFormatter
        or handler.filters
        or level < handler.level
    ):
        return None
    return handler


def set_level(level: str) -> None:
    """Change the proxy's log level while it runs (a SIGHUP reload)."""
    logging.getLogger(LOGGER).setLevel(level.upper())


def debug(name: str, **fields: Any) -> None:
    """A ``debug`` event (``log.level = "debug"``), built only when someone reads it."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(name, extra={"fields": fields})


# --------------------------------------------------------------------------- request trace


@dataclass(slots=True)
class Trace:
    """What the layers below the edge learn about one request, for its access line (the
    edge creates one per request; the layers find it with :func:`trace`)."""

    request_id: str = ""
    budget_wait: float = 0.0  # seconds waited for the account's rate budget, all attempts
    retries: int = 0  # upstream attempts after the first (resends, 429 and 401 resends)
    fetched_by: str | None = None  # coalesced: the request id whose fetch answered this one
    failure: str | None = None  # the last upstream failure's error code, if any
    failure_detail: str | None = None  # what the log (never the caller) hears about it


_TRACE: ContextVar[Trace | None] = ContextVar("kounta_proxy_trace", default=None)


def begin_trace(request_id: str) -> Trace:
    """A new trace for the request this task now answers (tasks it starts share it)."""
    found = Trace(request_id)
    _TRACE.set(found)
    return found


def continue_trace(found: Trace) -> None:
    """Go on with ``found``, begun for the same request earlier (the fast path's)."""
    _TRACE.set(found)


def trace() -> Trace:
    """The current request's trace; a throwaway one outside any request."""
    return _TRACE.get() or Trace()


class Throttle:
    """At most one log line per key every ``interval`` seconds; the lines held back are
    counted and reported with the next one (``allow`` returns how many, or None: hold)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def allow(self, key: str) -> int | None:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last[key] = (now, 0)
        return 0 if last is None else last[1]

    def forget(self, key: str) -> None:
        """The next line for ``key`` is shown at once (its condition ended)."""
        self._last.pop(key, None)
