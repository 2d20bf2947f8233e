"""Files and directories that hold Kounta data or credentials: the proxy's user's alone.

State, cache and token directories the proxy creates are 0700, and the files in them
0600, whatever the process umask (the modes are set, not requested). A directory that
already exists is left as it is: an operator may have chosen its mode (say, a group
that backs it up), and the proxy does not second-guess that.
"""

from __future__ import annotations

import contextlib
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
