"""Every touch of diskcache's private parts: its file writer and its SQL connection.

- :class:`PrivateDisk` overrides ``Disk._write`` (the one function that creates the value
  files and their directories) to make them 0600 / 0700 whatever the umask: they hold every
  account's Kounta data, and diskcache has no mode option. Its ``fetch`` reads pickles as
  ``Disk.fetch`` does (a file under ``Disk._directory``, or the row's value), with the
  classes a record names looked up through :attr:`PrivateDisk.moved`: a class that moved to
  another module after records were written still reads back.
- :func:`count_keys` reads the cache's ``_sql`` (diskcache's own query helper) to count the
  keys in a range in one indexed query, cheap enough for every scrape; the public API would
  iterate every key. :func:`keys_between`, :func:`keys_holding` and :func:`keys_listing`
  list them the same way (what an invalidation covers), and :func:`rows_by_age` pages
  through the keys with their tags, newest first (each account's share counted after
  start-up without reading a value).

:data:`PINS` lists the assumptions; ``tests/unit/test_compat.py`` checks each and names
:data:`WRITTEN_AGAINST` when one fails after an upgrade.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, ClassVar

import diskcache  # type: ignore[import-untyped]

from proxy.files import FILE_MODE, private_dir

WRITTEN_AGAINST = "5.6.3"


# Where a class that records were pickled with lives now: (module, name) -> (module, name).
Moved = Mapping[tuple[str, str], tuple[str, str]]


class Renamed(pickle.Unpickler):
    """An unpickler that finds each class a pickle names where ``moved`` says it is now."""

    def __init__(self, file: IO[bytes], moved: Moved) -> None:
        super().__init__(file)
        self.moved = moved

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(*self.moved.get((module, name), (module, name)))


class PrivateDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's files and directories, readable by the proxy's user only (0600 / 0700),
    whatever the umask: they hold every account's Kounta data. Pickled values are read
    through :attr:`moved` (a subclass names its classes that moved; none here)."""

    moved: ClassVar[Moved] = {}

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode != diskcache.core.MODE_PICKLE or not self.moved:
            return super().fetch(mode, filename, value, read)
        # diskcache's own MODE_PICKLE branch, with Renamed for pickle.load.
        if value is None:
            assert filename is not None  # diskcache stores a file's name with no value
            with open(os.path.join(self._directory, filename), "rb") as reader:
                return Renamed(reader, self.moved).load()
        return Renamed(io.BytesIO(value), self.moved).load()

    def _write(self, full_path: str, iterator: Any, mode: str, encoding: str | None = None) -> int:
        # diskcache's own _write, with the subdirectories and the file made private.
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if "x" in mode else os.O_TRUNC)
        for attempt in range(1, 11):
            with contextlib.suppress(OSError):
                private_dir(Path(full_path).parent)
            try:
                fd = os.open(full_path, flags, FILE_MODE)
            except OSError:
                if attempt == 10:  # as diskcache: another cache may remove the directory
                    raise
                continue
            os.fchmod(fd, FILE_MODE)  # exactly 0600, whatever the umask
            with open(fd, mode.replace("x", "w"), encoding=encoding) as writer:
                size = 0
                for chunk in iterator:
                    size += len(chunk)
                    writer.write(chunk)
                return size
        raise AssertionError("unreachable")


def count_keys(cache: diskcache.Cache, low: str, high: str) -> int:
    """How many keys ``low <= key < high`` the cache holds (string keys)."""
    query = "SELECT COUNT(*) FROM Cache WHERE key >= ? AND key < ?"
    return int(cache._sql(query, (low, high)).fetchone()[0])


# Above every character a key can hold: ``prefix + TOP`` ends the range of keys with ``prefix``.
TOP = "\U0010ffff"


def keys_between(cache: diskcache.Cache, low: str, high: str) -> list[str]:
    """The string keys ``low <= key < high``, in one query on the key index."""
    query = "SELECT key FROM Cache WHERE key >= ? AND key < ?"
    return [row[0] for row in cache._sql(query, (low, high)).fetchall()]


def keys_holding(cache: diskcache.Cache, low: str, high: str, text: str) -> list[str]:
    """The string keys ``low <= key < high`` that hold ``text``."""
    query = "SELECT key FROM Cache WHERE key >= ? AND key < ? AND instr(key, ?) > 0"
    return [row[0] for row in cache._sql(query, (low, high, text)).fetchall()]


# Keys that may be a list of the collection "/NAME" (?3, as written in the key): NAME ends
# the path (?4), or is followed by ".json" (?5; twice is normalised away too), or by a segment
# that does not begin with a digit, or comes twice (the two may share a "/"). Left out: keys
# where "/NAME/" comes once and is followed by a digit, an id under the collection (Kounta's
# ids are numbers), the common case and never a list of it.
LISTS = (
    "SELECT key FROM Cache WHERE key >= ?1 AND key < ?2 AND instr(key, ?3) > 0"
    " AND (instr(key, ?4) > 0 OR instr(key, ?5) > 0 OR instr(key, ?6) = 0"
    " OR substr(key, instr(key, ?6) + length(?6), 1) NOT BETWEEN '0' AND '9'"
    " OR instr(substr(key, instr(key, ?6) + length(?6) - 1), ?6) > 0)"
)


def keys_listing(cache: diskcache.Cache, low: str, high: str, name: str) -> list[str]:
    """The string keys ``low <= key < high`` that may be lists of the collection ``name``
    (``/`` and the segment, as written inside a key): a superset, checked by the caller."""
    args = (low, high, name, name + '"', name + ".json", name + "/")
    return [row[0] for row in cache._sql(LISTS, args).fetchall()]


# (store_time, rowid) of the last row a page ended on; None: from the newest.
Cursor = tuple[float, int] | None


def rows_by_age(
    cache: diskcache.Cache, low: str, high: str, cursor: Cursor, limit: int
) -> tuple[list[tuple[str, Any]], Cursor]:
    """Up to ``limit`` (key, tag) of the keys ``low <= key < high``, newest stored first,
    older than ``cursor``; and the cursor after them (None: there are no more)."""
    before = cursor or (float("inf"), 2**63 - 1)
    query = (
        "SELECT key, tag, store_time, rowid FROM Cache WHERE (store_time, rowid) < (?, ?)"
        " ORDER BY store_time DESC, rowid DESC LIMIT ?"
    )
    rows = cache._sql(query, (*before, limit)).fetchall()
    found = [(k, tag) for k, tag, _, _ in rows if isinstance(k, str) and low <= k < high]
    return found, ((rows[-1][2], rows[-1][3]) if len(rows) == limit else None)


def _pins() -> dict[str, Callable[[], bool]]:
    def names(function: Callable[..., Any]) -> set[str]:
        return set(function.__code__.co_names)

    return {
        "Disk._write(self, full_path, iterator, mode, encoding=None)": lambda: (
            list(inspect.signature(diskcache.Disk._write).parameters)
            == ["self", "full_path", "iterator", "mode", "encoding"]
        ),
        "Disk.store writes value files through self._write": lambda: (
            "_write" in names(diskcache.Disk.store)
        ),
        "Disk.fetch(self, mode, filename, value, read) loads a pickle from the value, or from"
        " the file self._directory/filename when there is none": lambda: (
            list(inspect.signature(diskcache.Disk.fetch).parameters)
            == ["self", "mode", "filename", "value", "read"]
            and all(
                text in inspect.getsource(diskcache.Disk.fetch)
                for text in (
                    "elif mode == MODE_PICKLE:\n            if value is None:",
                    "op.join(self._directory, filename), 'rb') as reader:\n"
                    "                    return pickle.load(reader)",
                    "return pickle.load(io.BytesIO(value))",
                )
            )
        ),
        "Cache._sql is a property giving the connection's execute": lambda: isinstance(
            diskcache.Cache.__dict__.get("_sql"), property
        ),
        "Cache's table is Cache(key, ...)": lambda: (
            "CREATE TABLE IF NOT EXISTS Cache" in inspect.getsource(diskcache.Cache.__init__)
        ),
        "Cache's rows have store_time and tag": lambda: all(
            text in inspect.getsource(diskcache.Cache.__init__)
            for text in ("store_time REAL", "tag BLOB")
        ),
        "least-recently-stored indexes store_time": lambda: (
            "Cache_store_time" in diskcache.EVICTION_POLICY["least-recently-stored"]["init"]
        ),
    }


PINS = _pins()
