"""Every touch of diskcache's private parts: its file writer and its SQL connection.

- :class:`PrivateDisk` overrides ``Disk._write`` (the one function that creates the value
  files and their directories) to make them 0600 / 0700 whatever the umask: they hold every
  account's Kounta data, and diskcache has no mode option.
- :func:`count_keys` reads the cache's ``_sql`` (diskcache's own query helper) to count the
  keys in a range in one indexed query, cheap enough for every scrape; the public API would
  iterate every key.

:data:`PINS` lists the assumptions; ``tests/unit/test_compat.py`` checks each and names
:data:`WRITTEN_AGAINST` when one fails after an upgrade.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache  # type: ignore[import-untyped]

from proxy.files import FILE_MODE, private_dir

WRITTEN_AGAINST = "5.6.3"


class PrivateDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's files and directories, readable by the proxy's user only (0600 / 0700),
    whatever the umask: they hold every account's Kounta data."""

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
        "Cache._sql is a property giving the connection's execute": lambda: isinstance(
            diskcache.Cache.__dict__.get("_sql"), property
        ),
        "Cache's table is Cache(key, ...)": lambda: (
            "CREATE TABLE IF NOT EXISTS Cache" in inspect.getsource(diskcache.Cache.__init__)
        ),
    }


PINS = _pins()
