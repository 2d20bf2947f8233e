"""The per-account token file: JSON, mode 0600, replaced atomically, locked across processes.

Layout (one object)::

    {"access_token": "...", "refresh_token": "...", "token_type": "Bearer",
     "expires_at": 1767225600.0, "obtained_at": 1767222000.0}

A file that holds no token (corrupt) is moved aside as ``<file>.corrupt-<UTC time>`` by the
provider, under the lock, and the account's configured ``refresh_token`` is used instead.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the old
file (and the directory fsynced), so a crash leaves either the old file or the new one, never
half of one. ``<file>.lock`` is held with ``flock`` around read-refresh-write, so two proxies
sharing the file neither refresh twice nor overwrite each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from proxy.files import private_dir, read_regular

LOCK_POLL = 0.01
# A token file is a few hundred bytes; anything past this is not one (nor is a FIFO).
TOKEN_FILE_LIMIT = 1024**2


class TokenFileError(Exception):
    """The token file cannot be read or written; the message names the file, never a token."""


class TokenFileCorrupt(TokenFileError):
    """The file was read but holds no token: not JSON, not an object, a field of a wrong type
    (a torn copy from a backup, an editor accident). It can be set aside; an unreadable file
    (permissions, I/O) cannot, and is left to the operator."""


@dataclass(frozen=True, slots=True)
class StoredToken:
    access_token: str
    refresh_token: str
    expires_at: float | None
    token_type: str = "Bearer"  # noqa: S105 - a token type, not a token
    obtained_at: float = 0.0

    def __repr__(self) -> str:
        return f"StoredToken(expires_at={self.expires_at!r}, ****)"

    def usable(self, now: float) -> bool:
        return bool(self.access_token) and (self.expires_at is None or now < self.expires_at)


class TokenStore(Protocol):
    """Where an OAuth account's token is kept: this file (local) or Redis (shared).

    ``read`` and ``mtime`` are cheap and synchronous (the last known record and a change
    marker); ``fetch`` asks the store itself and is called under ``locked``, the account's
    refresh lock; ``save`` returns the token to use (a newer one, if another writer won)."""

    def read(self) -> StoredToken | None: ...

    def mtime(self) -> int | None: ...

    async def fetch(self) -> StoredToken | None:
        """Raises :class:`TokenFileCorrupt` when what is stored holds no token."""
        ...

    def set_aside(self, now: float) -> Path | str:
        """Put a corrupt record out of the way (under ``locked``) so the next save starts
        afresh; returns where it went, for the log (no secrets)."""
        ...

    async def save(self, token: StoredToken) -> StoredToken: ...

    def locked(
        self, patience: float = 30.0, enough: Callable[[StoredToken], bool] | None = None
    ) -> AbstractAsyncContextManager[StoredToken | None]:
        """The account's refresh lock (yields None while held); a store may instead stop
        waiting and yield a stored token that ``enough`` accepts, with no lock held."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def unusable(self, account: str) -> str:
        """What a request is told when the store fails (no paths, no secrets)."""
        ...


class TokenFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    def read(self) -> StoredToken | None:
        """The stored token, or None when there is no file yet."""
        try:
            raw = read_regular(self.path, TOKEN_FILE_LIMIT).decode("utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise TokenFileCorrupt(f"token file {self.path} is not UTF-8 text") from None
        except OSError as e:
            raise TokenFileError(f"cannot read token file {self.path}: {_why(e)}") from None
        try:
            return parse_token(json.loads(raw))
        except (ValueError, TypeError, KeyError):
            raise TokenFileCorrupt(f"token file {self.path} is not a valid token file") from None

    def set_aside(self, now: float) -> Path:
        """Move a corrupt file out of the way as ``<name>.corrupt-<UTC time>`` (kept, mode
        0600, for whoever wants to look), so the next write starts afresh. Call it while
        holding :meth:`locked`, so a good file another process just wrote is not the one
        moved."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        try:
            os.replace(self.path, aside)
            _fsync_dir(self.path.parent)
        except OSError as e:
            raise TokenFileError(f"cannot move token file {self.path} aside: {_why(e)}") from None
        return aside

    def write(self, token: StoredToken) -> None:
        """Atomically replace the file (tmp + fsync + rename + directory fsync)."""
        data = json.dumps(asdict(token), indent=2).encode() + b"\n"
        try:
            private_dir(self.path.parent)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            raise TokenFileError(f"cannot write token file {self.path}: {_why(e)}") from None

    def mtime(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    async def fetch(self) -> StoredToken | None:
        return self.read()

    async def save(self, token: StoredToken) -> StoredToken:
        await asyncio.to_thread(self.write, token)  # fsync: off the event loop
        return token

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def unusable(self, account: str) -> str:
        return f"The token file of account {account!r} is unusable"

    @contextlib.asynccontextmanager
    async def locked(
        self, patience: float = 30.0, enough: Callable[[StoredToken], bool] | None = None
    ) -> AsyncIterator[StoredToken | None]:
        """Hold ``<file>.lock`` exclusively; polls so that cancelling never leaks a lock.
        (``enough`` is not used: a local lock is held for a few milliseconds.)"""
        try:
            private_dir(self.path.parent)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise TokenFileError(f"cannot open lock file {self.lock_path}: {_why(e)}") from None
        try:
            give_up = time.monotonic() + patience
            while not _try_lock(fd):
                if time.monotonic() > give_up:
                    raise TokenFileError(f"token file {self.path} stayed locked for {patience:g}s")
                await asyncio.sleep(LOCK_POLL)
            try:
                yield None
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def parse_token(data: Any) -> StoredToken:
    if not isinstance(data, dict):
        raise TypeError("not an object")
    expires_at = data.get("expires_at")
    return StoredToken(
        access_token=str(data.get("access_token") or ""),
        refresh_token=str(data.get("refresh_token") or ""),
        expires_at=None if expires_at is None else float(expires_at),
        token_type=str(data.get("token_type") or "Bearer"),
        obtained_at=float(data.get("obtained_at") or 0.0),
    )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(error: BaseException) -> str:
    return getattr(error, "strerror", None) or type(error).__name__
