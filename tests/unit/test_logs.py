"""Log formatting: JSON lines and the terminal text format."""

from __future__ import annotations

import contextlib
import enum
import io
import json
import logging
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.logs import JsonFormatter, TextFormatter, configure, event


def record(**fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("kounta_proxy", logging.INFO, __file__, 1, "started", None, None)
    rec.fields = fields  # type: ignore[attr-defined]
    return rec


def test_text_format_quotes_values_with_spaces_and_shows_nested_data_as_json() -> None:
    line = TextFormatter().format(
        record(listen="127.0.0.1:8080", note="two words", empty="", settings={"a": [1]})
    )
    assert line.split()[1:3] == ["info", "started"]
    assert 'listen=127.0.0.1:8080 note="two words" empty="" settings={"a":[1]}' in line
    assert "\x1b[" not in line


def test_text_format_colours_the_level_only_when_asked() -> None:
    assert "\x1b[32minfo" in TextFormatter(color=True).format(record())


def test_json_format_is_one_object_a_line() -> None:
    line = JsonFormatter().format(record(note="a\nb"))
    assert "\n" not in line
    data = json.loads(line)
    assert (data["event"], data["level"], data["note"]) == ("started", "info", "a\nb")
    assert data["time"].endswith("Z")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() rewires these loggers; put them back so caplog works in other tests."""
    names = ("kounta_proxy", "aiohttp.server", "aiohttp.web", "aiohttp.client", "asyncio")
    saved = [(logging.getLogger(n), logging.getLogger(n).handlers[:]) for n in names]
    state = [(lg, lg.level, lg.propagate) for lg, _ in saved]
    yield
    for lg, handlers in saved:
        lg.handlers[:] = handlers
    for lg, level, propagate in state:
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.mark.usefixtures("restore_logging")
def test_level_is_configurable() -> None:
    out = io.StringIO()
    configure("warning", "json", out)
    event("quiet")
    event("loud", level=logging.WARNING)
    configure("debug", "text", out)
    event("detail", level=logging.DEBUG)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["event"] == "loud"
    assert " debug " in lines[1] and "detail" in lines[1]


def test_a_worker_stamps_every_line_with_its_index() -> None:
    from proxy.logs import set_worker

    set_worker(1)
    try:
        data = json.loads(JsonFormatter().format(record(note="x")))
        text = TextFormatter().format(record(note="x"))
    finally:
        set_worker(None)
    assert data["worker"] == 1 and "worker=1 note=x" in text
    assert "worker" not in json.loads(JsonFormatter().format(record(note="x")))


def anything(record: logging.LogRecord) -> bool:
    return True


class Unwritable(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("the log's pipe is gone")


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("worker", [None, 2])
def test_an_event_to_the_configured_json_stream_is_the_records_line_without_a_record(
    monkeypatch: pytest.MonkeyPatch, worker: int | None
) -> None:
    """configure()'s JSON stream alone: event() writes the line a LogRecord would be
    formatted into (the same bytes), and makes no record; with anything else listening
    (here a filter) the record goes through logging as before."""
    from proxy.logs import set_worker

    monkeypatch.setattr("time.time", lambda: 1765000000.1234)
    out = io.StringIO()
    configure("info", "json", out)
    set_worker(worker)
    with capture_records() as made:
        try:
            fields = {"status": 200, "ms": 0.05, "path": '/v1/ä?x="1"', "query": None, "n": [1]}
            event("request", **fields)
            assert made == []
            logging.getLogger("kounta_proxy").addFilter(anything)
            event("request", **fields)
            event("detail", level=logging.DEBUG)  # below the level: nothing either way
        finally:
            logging.getLogger("kounta_proxy").removeFilter(anything)
            set_worker(None)
    assert len(made) == 1
    direct, recorded = out.getvalue().splitlines(keepends=True)
    assert direct == recorded
    assert json.loads(direct)["time"] == "2025-12-06T05:46:40.123Z"


@pytest.mark.usefixtures("restore_logging")
def test_an_event_the_log_cannot_take_is_reported_not_raised(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("info", "json", Unwritable())
    event("request", status=200)  # no exception
    assert "the log's pipe is gone" in capsys.readouterr().err


class Colour(enum.IntEnum):
    RED = 1


class Shade(enum.StrEnum):
    DARK = 'da"rk'


AWKWARD: list[object] = [
    "plain",
    "",
    'quo"te \\ back\\slash /',
    "ä € 😀 ℵ",
    "\x00\x01\x1f\n\r\t\x7f\u2028\u2029",
    "\ud800 lone surrogate",
    0.1,
    -0.0,
    1e300,
    1e-7,
    round(0.015 * 1000, 2),
    float("nan"),
    float("inf"),
    float("-inf"),
    None,
    True,
    False,
    0,
    -17,
    2**100,
    -(2**64),
    Colour.RED,
    Shade.DARK,
    {"nested": ["ä", None, 1.5]},
    [1, "two"],
    (3, 4),
    b"by\x00tes",
    object,
]


def old_line(created: float, fields: dict[str, object]) -> str:
    """The line as the logging record's formatter wrote it before Fixed, an encoder built
    per line by json.dumps with the JSON format's options."""
    from proxy.logs import _iso, _worker

    entry: dict[str, object] = {"time": _iso(created), "level": "info", "event": "request"}
    if _worker[0] is not None:
        entry["worker"] = _worker[0]
    entry.update(fields)
    return json.dumps(entry, ensure_ascii=False, default=str, separators=(",", ":"))


@pytest.mark.parametrize("worker", [None, 3])
def test_a_fixed_events_line_is_the_encoders_byte_for_byte(worker: int | None) -> None:
    """Every awkward value in every place (first, middle, last), keys that need escaping,
    with and without a worker: Fixed's line equals json.dumps's."""
    from proxy.logs import Fixed, set_worker

    keys = (*(f"k{i}" for i in range(len(AWKWARD))), 'q"u\\o\nte', "ünï")
    fixed = Fixed("request", keys)
    set_worker(worker)
    try:
        for shift in range(len(AWKWARD)):
            values = [*AWKWARD[shift:], *AWKWARD[:shift], "x", 1.25]
            fields = dict(zip(keys, values, strict=True))
            assert fixed.line(1765000000.1234, tuple(values)) == old_line(1765000000.1234, fields)
    finally:
        set_worker(None)


scalars = st.text() | st.integers() | st.floats() | st.none() | st.booleans() | st.binary()


@given(st.lists(scalars, min_size=1, max_size=8), st.floats(0, 4e9))
def test_a_fixed_events_line_is_the_encoders_for_any_scalars(
    values: list[object], created: float
) -> None:
    from proxy.logs import Fixed

    keys = tuple(f"f{i}" for i in range(len(values)))
    fields = dict(zip(keys, values, strict=True))
    assert Fixed("request", keys).line(created, tuple(values)) == old_line(created, fields)


@given(st.lists(scalars, min_size=1, max_size=8), st.data())
def test_a_fixed_event_knowing_some_fields_writes_the_same_line(
    values: list[object], data: st.DataObject
) -> None:
    """knowing(): the known fields encoded into the template once, the others given to
    line() in order: the same bytes as json.dumps of them all (a % anywhere included)."""
    from proxy.logs import Fixed

    keys = tuple(f"f%{i}" for i in range(len(values)))
    fields = dict(zip(keys, values, strict=True))
    known = {k: v for k, v in fields.items() if data.draw(st.booleans())}
    fixed = Fixed("re%squest", keys).knowing(**known)
    rest = tuple(v for k, v in fields.items() if k not in known)
    assert fixed.keys == tuple(k for k in keys if k not in known)
    line = fixed.line(1765000000.1234, rest)
    expected = old_line(1765000000.1234, fields)
    assert line == expected.replace('"event":"request"', '"event":"re%squest"', 1)


KINDS: dict[object, st.SearchStrategy[object]] = {
    str: st.text() | st.just("\ud800 lone") | st.sampled_from(list(Shade)),
    int: st.integers() | st.sampled_from(list(Colour)),
    float: st.floats(),
    str | None: st.none() | st.text(),
}


@given(st.lists(st.sampled_from(list(KINDS)), min_size=1, max_size=8), st.data())
def test_a_typed_fixed_events_line_is_the_encoders_for_values_of_its_kinds(
    kinds: list[object], data: st.DataObject
) -> None:
    """typed(): each typed field's value by its kind's encoder, the others as before,
    some fields known: the same bytes as json.dumps of them all (an enum of the kind's
    type included), with and without a worker."""
    from proxy.logs import Fixed, set_worker

    keys = tuple(f"f{i}" for i in range(len(kinds)))
    values = [data.draw(KINDS[kind]) for kind in kinds]
    fields = dict(zip(keys, values, strict=True))
    typed = {k: kind for k, kind in zip(keys, kinds, strict=True) if data.draw(st.booleans())}
    known = {k: v for k, v in fields.items() if data.draw(st.booleans())}
    fixed = Fixed("request", keys).typed(**typed).knowing(**known)
    rest = tuple(v for k, v in fields.items() if k not in known)
    worker = data.draw(st.none() | st.integers(0, 64))
    set_worker(worker)
    try:
        assert fixed.line(1765000000.1234, rest) == old_line(1765000000.1234, fields)
    finally:
        set_worker(None)


def test_a_typed_fixed_event_takes_only_kinds_it_can_encode_and_every_value() -> None:
    from proxy.logs import Fixed

    with pytest.raises(ValueError, match="no encoder for the kinds"):
        Fixed("request", ("a",)).typed(a=bytes)
    fixed = Fixed("request", ("a", "b")).typed(a=str, b=int)
    with pytest.raises(ValueError, match="2 values expected, 1 given"):
        fixed.line(1765000000.1234, ("x",))


@pytest.mark.parametrize("fraction", [0.0, 0.0005, 0.999, 0.9995, 1 - 2**-40, 1 - 2**-52])
def test_a_lines_time_is_the_formats_at_every_millisecond(fraction: float) -> None:
    """_iso's milliseconds from a table: what f"{int(created % 1 * 1000):03d}" spelled."""
    import time

    from proxy.logs import _iso

    created = 1765000000 + fraction
    second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(created)))
    assert _iso(created) == f"{second}.{int(created % 1 * 1000):03d}Z"


@pytest.mark.usefixtures("restore_logging")
def test_a_fixed_event_knowing_fields_gives_logging_all_fields_in_order() -> None:
    """A filter on the logger: the record's fields are every key, known ones included, in
    the event's order."""
    from proxy.logs import Fixed

    fixed = Fixed("request", ("a", "b", "c")).knowing(b=None)
    configure("info", "json", io.StringIO())
    logger = logging.getLogger("kounta_proxy")
    with capture_records() as records:
        logger.addFilter(anything)
        try:
            fixed.write(1, "x")
        finally:
            logger.removeFilter(anything)
    assert [list(r.fields.items()) for r in records] == [[("a", 1), ("b", None), ("c", "x")]]  # type: ignore[attr-defined]


@pytest.mark.usefixtures("restore_logging")
def test_a_fixed_event_writes_the_records_line_and_reports_a_failed_write(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """configure()'s JSON stream: Fixed.write's line is the one logging's record makes
    of the same fields (a filter on the logger sends it through logging, fields as given);
    below the level nothing; an unwritable stream is reported, not raised."""
    from proxy.logs import Fixed

    monkeypatch.setattr("time.time", lambda: 1765000000.1234)  # both lines in one millisecond
    fixed = Fixed("request", ("status", "path", "ms", "query"))
    values = (200, '/v1/ä?x="1"', 0.05, None)
    out = io.StringIO()
    configure("info", "json", out)
    logger = logging.getLogger("kounta_proxy")
    with capture_records() as records:
        fixed.write(*values)
        assert records == []  # the line written without a record
        logger.addFilter(anything)
        try:
            fixed.write(*values)
        finally:
            logger.removeFilter(anything)
    direct, recorded = out.getvalue().splitlines(keepends=True)
    assert direct == recorded and direct.endswith("}\n")
    assert [r.fields for r in records] == [dict(zip(fixed.keys, values, strict=True))]  # type: ignore[attr-defined]
    Fixed("quiet", ("n",), level=logging.DEBUG).write(1)
    assert out.getvalue().count("\n") == 2
    configure("info", "json", Unwritable())
    fixed.write(*values)  # no exception
    assert "the log's pipe is gone" in capsys.readouterr().err


@contextlib.contextmanager
def capture_records() -> Iterator[list[logging.LogRecord]]:
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counted(*args: object, **kwargs: object) -> logging.LogRecord:
        made.append(factory(*args, **kwargs))
        return made[-1]

    logging.setLogRecordFactory(counted)
    try:
        yield made
    finally:
        logging.setLogRecordFactory(factory)
