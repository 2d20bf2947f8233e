"""An account's token kept in the shared backend (Redis), encrypted, versioned, locked.

The record (access token, expiry, refresh token) is Fernet-encrypted with ``shared.token_key``
before it leaves the process, so Redis, its persistence files and its replicas never hold a
token in clear. Every write is a compare-and-set on the record's version: a writer that read
version 4 cannot replace version 5, so an older token never overwrites a newer one.

Refreshes happen under the account's Redis lock (an owner and a TTL): one replica refreshes,
the others wait for the lock, read the new record under it and adopt it instead of spending
the refresh token again. A replica that dies mid-refresh leaves the lock to expire and the
last good record (with its refresh token) in place.

While Redis is away: the provider keeps its token in memory; a refresh cannot take the lock
and fails with :class:`TokenStoreError` (the request gets 503 ``temporarily_unavailable``),
unless ``shared.solo_refresh`` is set: then the replica refreshes alone and writes the token
back when Redis returns, if nothing newer was stored meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict

from cryptography.fernet import Fernet, InvalidToken

from proxy.auth.token_file import StoredToken, TokenFileCorrupt, TokenFileError, parse_token
from proxy.logs import event
from proxy.settings import SharedSettings
from proxy.shared import Backend, SharedUnavailable
from proxy.shared.base import SharedTokens, TokenRecord

# How often a replica looks for a record written elsewhere (a refresh, `authorize`) and writes
# back a token it had to refresh alone.
POLL_SECONDS = 1.0


class TokenStoreError(TokenFileError):
    """The shared token record cannot be used now (Redis away, locked too long, wrong key)."""


class TokenRecordCorrupt(TokenStoreError, TokenFileCorrupt):
    """The record decrypts with our key but holds no token: like a corrupt token file, the
    provider sets it aside and starts again from the configured refresh_token. (A record that
    does not decrypt is *not* this: it may be another key's, and is left alone.)"""


class SharedTokenStore:
    def __init__(
        self, account: str, backend: Backend, tokens: SharedTokens, settings: SharedSettings
    ) -> None:
        self.account = account
        self.backend = backend
        self.tokens = tokens
        self.solo = settings.solo_refresh
        self._fernet = Fernet(settings.token_key.reveal().encode("ascii"))
        self._record: StoredToken | None = None
        self._version = 0
        # A token refreshed alone while Redis was away, and the version it replaces.
        self._pending: tuple[StoredToken, int] | None = None
        self._poller: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"SharedTokenStore({self.account!r}, version={self._version})"

    # --- what the provider reads

    def read(self) -> StoredToken | None:
        return self._record

    def mtime(self) -> int | None:
        return self._version or None

    def unusable(self, account: str) -> str:
        return (
            f"The shared token store for account {account!r} is unavailable; "
            "the proxy retries in the background"
        )

    async def fetch(self) -> StoredToken | None:
        try:
            found = await self.tokens.read_token(self.account)
        except SharedUnavailable as e:
            if self.solo:
                return self._record
            raise TokenStoreError(str(e)) from None
        self._apply(found)
        return self._record

    def _apply(self, found: TokenRecord | None) -> None:
        if found is None:
            # Nothing stored (a new or emptied Redis): the next write starts at version 1; the
            # last record we knew stays readable here as the best we have.
            self._version = 0
            return
        if found.version == self._version:
            return
        # The version first: a record we cannot decrypt can still be replaced (authorize).
        self._version = found.version
        self._record = self._decrypt(found.data)

    def set_aside(self, now: float) -> str:
        """Forget a corrupt record: the next save writes over its version (compare-and-set,
        so a good record another replica stores meanwhile still wins)."""
        self._record = None
        return f"shared record version {self._version} (replaced by the next save)"

    # --- writing

    async def save(self, token: StoredToken) -> StoredToken:
        try:
            version = await self.tokens.write_token(
                self.account, self._encrypt(token), self._version
            )
        except SharedUnavailable as e:
            if not self.solo:
                raise TokenStoreError(str(e)) from None
            # Kept here and written back when Redis returns (see _write_back).
            self._pending = (token, self._version)
            self._record = token
            event("token_write_pending", logging.WARNING, account=self.account)
            return token
        if version is None:
            return await self._lost_race(token)
        self._record, self._version = token, version
        return token

    async def _lost_race(self, token: StoredToken) -> StoredToken:
        """The version moved: a newer record wins; an emptied store takes ours."""
        try:
            self._apply(await self.tokens.read_token(self.account))
            if self._version == 0:
                version = await self.tokens.write_token(self.account, self._encrypt(token), 0)
                if version is not None:
                    self._record, self._version = token, version
                    return token
                self._apply(await self.tokens.read_token(self.account))
        except SharedUnavailable as e:
            raise TokenStoreError(str(e)) from None
        event("token_newer_stored", logging.WARNING, account=self.account)
        return self._record or token

    async def _write_back(self) -> None:
        if self._pending is None:
            return
        token, base = self._pending
        self._version, self._pending = base, None
        saved = await self.save(token)
        if self._pending is not None:
            return  # away again: still pending
        if saved is token:
            event("token_written_back", account=self.account, version=self._version)
        else:
            # Someone stored a newer token while we were cut off: theirs stays.
            event("token_write_back_skipped", account=self.account, reason="newer token stored")

    # --- the refresh lock

    @contextlib.asynccontextmanager
    async def locked(self, patience: float = 30.0) -> AsyncIterator[None]:
        stack = contextlib.AsyncExitStack()
        try:
            taken = await stack.enter_async_context(
                self.tokens.token_lock(self.account, ttl=patience, patience=patience)
            )
        except SharedUnavailable as e:
            if not self.solo:
                raise TokenStoreError(f"cannot take the refresh lock: {e}") from None
            event("token_solo_refresh", logging.WARNING, account=self.account)
            yield
            return
        async with stack:
            if not taken:
                raise TokenStoreError(f"the refresh lock stayed taken for {patience:g}s")
            yield

    # --- background

    async def start(self) -> None:
        with contextlib.suppress(TokenStoreError):
            await self.fetch()
        self._poller = asyncio.create_task(self._poll(), name=f"token-store-{self.account}")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if not self.backend.up:
                continue
            try:
                await self._write_back()
                self._apply(await self.tokens.read_token(self.account))
            except (SharedUnavailable, TokenStoreError):
                continue

    # --- encryption

    def _encrypt(self, token: StoredToken) -> bytes:
        return self._fernet.encrypt(json.dumps(asdict(token)).encode())

    def _decrypt(self, data: bytes) -> StoredToken:
        try:
            return parse_token(json.loads(self._fernet.decrypt(data)))
        except InvalidToken:
            raise TokenStoreError(
                f"the shared token record of account {self.account!r} cannot be decrypted "
                "with shared.token_key (another key?)"
            ) from None
        except (ValueError, TypeError, KeyError):
            raise TokenRecordCorrupt(
                f"the shared token record of account {self.account!r} is not a token"
            ) from None
