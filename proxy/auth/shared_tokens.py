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

Versions never move backwards. A Redis restored from an older snapshot (or emptied) holds a
lower version than a replica: the replica keeps the newer token it holds (never the older
record, whose rotating refresh token is spent) and writes it back over the older one
(compare-and-set), keeping its version. ``authorize`` writes a version above any a replica
can hold (the time in milliseconds), so a fresh authorization always wins.

Malformed records (a version that is not a positive integer, no data, a key of another type)
are treated like undecryptable ones: left alone, the refresh fails with
:class:`TokenStoreError` (503 ``temporarily_unavailable``, a readiness detail), counted in
``kounta_proxy_shared_bad_records_total{kind="token"}``; ``authorize`` replaces them.

Format: the hash's ``format`` field is 2; a record without it was written by the previous
release and is read the same way. The encrypted JSON names its account (format 2), so a record
copied to another account's key is refused; the previous release's records do not name it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from proxy.auth.token_file import StoredToken, TokenFileCorrupt, TokenFileError, parse_token
from proxy.logs import event
from proxy.settings import SharedSettings
from proxy.shared import Backend, SharedUnavailable
from proxy.shared.base import SharedTokens, TokenRecord
from proxy.shared.records import BadRecord
from proxy.shared.redis_backend import LOCK_POLL

# How often a replica looks for a record written elsewhere (a refresh, `authorize`) and writes
# back a token it had to refresh alone.
POLL_SECONDS = 1.0
# After Redis comes back (it may have been restored from an older snapshot) or a rewound
# record is seen, a refresh waits this long first: every live replica polls meanwhile and
# writes back the newer token it holds, so nobody refreshes with a spent refresh token.
REWIND_GRACE = 2.5 * POLL_SECONDS


class TokenStoreError(TokenFileError):
    """The shared token record cannot be used now (Redis away, locked too long, wrong key)."""


class TokenRecordCorrupt(TokenStoreError, TokenFileCorrupt):
    """The record decrypts with our key but holds no token: like a corrupt token file, the
    provider sets it aside and starts again from the configured refresh_token. (A record that
    does not decrypt is *not* this: it may be another key's, and is left alone.)"""


class SharedTokenStore:
    def __init__(
        self,
        account: str,
        backend: Backend,
        tokens: SharedTokens,
        settings: SharedSettings,
        *,
        supersede: bool = False,
    ) -> None:
        self.account = account
        self.backend = backend
        self.tokens = tokens
        self.solo = settings.solo_refresh
        # `authorize`: a write jumps above any version a replica may hold.
        self.supersede = supersede
        keys = [settings.token_key.reveal(), settings.token_key_previous.reveal()]
        self._fernet = MultiFernet([Fernet(k.encode("ascii")) for k in keys if k])
        self._record: StoredToken | None = None
        # The version of the record held (_record), and the version last seen stored (what a
        # compare-and-set expects; -1: a malformed record).
        self._held = 0
        self._version = 0
        self._rewound_at = 0.0
        # A token refreshed alone while Redis was away, and the version it replaces.
        self._pending: tuple[StoredToken, int] | None = None
        self._poller: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"SharedTokenStore({self.account!r}, version={self._version})"

    # --- what the provider reads

    def read(self) -> StoredToken | None:
        return self._record

    def mtime(self) -> int | None:
        return self._held or None

    def unusable(self, account: str) -> str:
        return (
            f"The shared token store for account {account!r} is unavailable; "
            "the proxy retries in the background"
        )

    async def fetch(self) -> StoredToken | None:
        try:
            await self._settle(await self._read())
        except SharedUnavailable as e:
            if self.solo:
                return self._record
            raise TokenStoreError(str(e)) from None
        return self._record

    async def _read(self) -> TokenRecord | None:
        try:
            return await self.tokens.read_token(self.account)
        except BadRecord as e:
            # Left alone (authorize replaces it: a write expecting -1); our token stays.
            self._version = -1
            raise TokenStoreError(
                f"the shared token record of account {self.account!r} is malformed ({e}); "
                "run `kounta-proxy authorize` to replace it"
            ) from None

    async def _settle(self, found: TokenRecord | None, again: bool = True) -> None:
        """Take what Redis holds: a newer record is adopted; an older one (or none) while this
        replica holds a newer token is a restore or a flush, and ours is written back."""
        stored = 0 if found is None else found.version
        if self._record is None or stored >= self._held:
            self._adopt(found)
            return
        self._rewound_at = time.monotonic()
        event(
            "token_record_older",
            logging.WARNING,
            account=self.account,
            stored=stored,
            held=self._held,
        )
        data = self._encrypt(self._record)
        version = await self.tokens.write_token(self.account, data, stored, self._held)
        if version is not None:
            self._version = version
            event("token_written_back", account=self.account, version=version)
        elif again:  # another writer came first (the same write-back, or a newer record)
            await self._settle(await self._read(), again=False)

    def _adopt(self, found: TokenRecord | None) -> None:
        if found is None:
            # Nothing stored (a new or emptied Redis) and nothing held: the next write starts
            # at version 1.
            self._version = 0
            return
        if found.version == self._version and found.version == self._held:
            return
        # The version first: a record we cannot decrypt can still be replaced (authorize).
        self._version = found.version
        self._record = self._decrypt(found.data)
        self._held = found.version

    def set_aside(self, now: float) -> str:
        """Forget a corrupt record: the next save writes over its version (compare-and-set,
        so a good record another replica stores meanwhile still wins)."""
        self._record = None
        return f"shared record version {self._version} (replaced by the next save)"

    # --- writing

    def _floor(self) -> int:
        """The least version a write may take: above the one held (never backwards), and for
        `authorize` above any a replica may hold."""
        return max(self._held + 1, int(time.time() * 1000) if self.supersede else 0)

    async def save(self, token: StoredToken) -> StoredToken:
        try:
            version = await self.tokens.write_token(
                self.account, self._encrypt(token), self._version, self._floor()
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
        self._held = version
        return token

    async def _lost_race(self, token: StoredToken) -> StoredToken:
        """The version moved: a newer record wins; an emptied or rewound store takes ours."""
        try:
            found = await self._read()
            if found is None or found.version < self._held:
                stored = 0 if found is None else found.version
                data = self._encrypt(token)
                version = await self.tokens.write_token(self.account, data, stored, self._floor())
                if version is not None:
                    self._record, self._version, self._held = token, version, version
                    return token
                found = await self._read()
            self._adopt(found)
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
    async def locked(
        self, patience: float = 30.0, enough: Callable[[StoredToken], bool] | None = None
    ) -> AsyncIterator[StoredToken | None]:
        """Hold the account's refresh lock (yields None), or stop waiting for it as soon as the
        record holds a token ``enough`` accepts (yields that token, no lock held).

        Replicas due at the same moment all wait while one refreshes; each looks at the record
        between attempts, so all of them adopt the new token within one poll of its write, in
        parallel, instead of taking the lock one after the other just to read it (the last of
        N replicas then held the older token for about N polls; past ``patience``, a 503).
        """
        await self._after_rewind()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + patience
        while True:
            stack = contextlib.AsyncExitStack()
            try:
                taken = await stack.enter_async_context(
                    self.tokens.token_lock(self.account, ttl=patience, patience=0.0)
                )
            except SharedUnavailable as e:
                if not self.solo:
                    raise TokenStoreError(f"cannot take the refresh lock: {e}") from None
                event("token_solo_refresh", logging.WARNING, account=self.account)
                yield None
                return
            async with stack:
                if taken:
                    yield None
                    return
            # The read takes its time from the pause, so the lock is asked as often as before.
            next_try = loop.time() + LOCK_POLL
            found = await self._stored_while_waiting() if enough is not None else None
            if found is not None and enough is not None and enough(found):
                yield found
                return
            if loop.time() >= give_up:
                raise TokenStoreError(f"the refresh lock stayed taken for {patience:g}s")
            await asyncio.sleep(max(0.0, next_try - loop.time()))

    async def _stored_while_waiting(self) -> StoredToken | None:
        """The record, read while another replica holds the lock (a bad record is dealt with
        under the lock, not here)."""
        with contextlib.suppress(TokenFileError):
            return await self.fetch()
        return None

    async def _after_rewind(self) -> None:
        """Before a refresh: if Redis just came back or was seen rewound, give the other
        replicas time to write back a newer token than the one stored (outside the lock)."""
        since = max(self.backend.back_since, self._rewound_at)
        left = since + REWIND_GRACE - time.monotonic() if since else 0.0
        if left > 0:
            event("token_refresh_deferred", account=self.account, seconds=round(left, 3))
            await asyncio.sleep(left)

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
                await self._settle(await self._read())
            except (SharedUnavailable, TokenStoreError):
                continue

    # --- encryption

    def _encrypt(self, token: StoredToken) -> bytes:
        return self._fernet.encrypt(json.dumps({**asdict(token), "account": self.account}).encode())

    def _decrypt(self, data: bytes) -> StoredToken:
        try:
            fields = json.loads(self._fernet.decrypt(data))
        except InvalidToken:
            raise TokenStoreError(
                f"the shared token record of account {self.account!r} cannot be decrypted "
                "with shared.token_key or shared.token_key_previous (another key?)"
            ) from None
        except (ValueError, RecursionError):
            raise TokenRecordCorrupt(
                f"the shared token record of account {self.account!r} is not a token"
            ) from None
        if isinstance(fields, dict) and fields.get("account", self.account) != self.account:
            # Copied from another account's key: not ours to use, not ours to set aside.
            raise TokenStoreError(
                f"the shared token record of account {self.account!r} belongs to another account"
            )
        if not _token_fields(fields):
            raise TokenRecordCorrupt(
                f"the shared token record of account {self.account!r} is not a token"
            )
        return parse_token(fields)


def _token_fields(fields: object) -> bool:
    """Whether a decrypted record holds a token's fields, each of its type and finite."""
    if not isinstance(fields, dict):
        return False
    strings = all(isinstance(fields.get(n, ""), str) for n in ("access_token", "refresh_token"))
    times = (fields.get("expires_at"), fields.get("obtained_at"))
    return strings and all(t is None or _finite(t) for t in times)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
