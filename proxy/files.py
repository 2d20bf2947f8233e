"""Files and directories that hold Kounta data or credentials: the proxy's user's alone.

State, cache and token directories the proxy creates are 0700, and the files in them
0600, whatever the process umask (the modes are set, not requested). A directory that
already exists is left as it is: an operator may have chosen its mode (say, a group
that backs it up), and the proxy does not second-guess that.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents, each 0700; existing ones are untouched."""
    missing: list[Path] = []
    at = path
    while not at.exists() and at != at.parent:
        missing.append(at)
        at = at.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by another process: its mode is its own
        with contextlib.suppress(OSError):
            directory.chmod(DIR_MODE)  # mkdir's mode is filtered by the umask; this is not


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    Anything else is refused with an :class:`OSError` whose ``strerror`` says what it is,
    without a blocking open or read: a FIFO (opening one for reading waits for a writer,
    which froze SIGHUP reloads), a device (``/dev/zero`` never ends), a directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file ({_kind(mode)})", str(path))
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")
