"""Credentials for the upstream: one token provider per account.

A provider answers ``authorization(deadline)``: the ``Authorization`` header to send now,
and renews its token when told the one it gave was refused. The auth layer
(:class:`~proxy.auth.layer.Authenticator`) puts that header on every upstream request and, on
a 401 for an invalid or expired token, has it renewed and resends the request once.

Modes (``accounts.NAME.mode``):

- ``static``: a fixed bearer token; ``basic``: HTTP Basic with the add-on's id and secret.
- ``oauth``: :class:`OAuthProvider`. Tokens come from the token URL (refresh_token grant, or
  client_credentials), built with authlib's client pieces (``prepare_token_request``,
  ``ClientAuth``, ``OAuth2Token``, ``OAuth2Error``) and sent on the proxy's own aiohttp
  session. The token file (:mod:`proxy.auth.token_file`) keeps them across restarts.

The token state machine (states, when to refresh, what a failure means) is pure, in
:mod:`proxy.auth.tokens`; the provider holds the state and does the I/O around it.

At most one token request per account is in flight; every request that needs a token
shares its result or its error (single flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import OAuth2Token

from proxy.auth.endpoint import FailureLog, TokenRequestFailed, request_token
from proxy.auth.fixed import BasicCredentials, StaticToken
from proxy.auth.fixed import TokenProvider as TokenProvider  # where the layers look for it
from proxy.auth.metrics import AuthMetrics
from proxy.auth.shared_tokens import SharedTokenStore
from proxy.auth.token_file import (
    StoredToken,
    TokenFile,
    TokenFileCorrupt,
    TokenFileError,
    TokenStore,
)
from proxy.auth.tokens import (
    BAD,
    INF,
    NEEDS_AUTHORIZE,
    PENDING,
    REJECTED,
    STATES,
    STATIC,
    STUCK,
    UNAVAILABLE,
    Failing,
    Held,
    Rejection,
    Stop,
    Timing,
    TokenState,
    adoptable,
    bearer,
    blocked,
    issued,
    may_renew,
    next_wake,
    on_endpoint_error,
    problem,
    refresh_now,
    sendable,
    state_of,
)
from proxy.clock import WallClock
from proxy.errors import CredentialsRejected, TokenUnavailable
from proxy.logs import event
from proxy.settings import AccountSettings, SharedSettings
from proxy.shared import Backend


def token_path(name: str, account: AccountSettings, state_dir: str) -> Path:
    return (
        Path(account.token_path)
        if account.token_path
        else Path(state_dir) / "tokens" / f"{name}.json"
    )


def provider_for(
    account: AccountSettings,
    *,
    name: str = "default",
    state_dir: str = "state",
    clock: WallClock = time.time,
    metrics: AuthMetrics | None = None,
    shared: Backend | None = None,
    shared_settings: SharedSettings | None = None,
    refresh_floor: float = 30.0,
) -> TokenProvider:
    if account.mode in ("static", "basic") and metrics is not None:
        metrics.token_state.labels(name, STATIC).set(1)
    if account.mode == "static":
        return StaticToken(account.token.reveal(), name)
    if account.mode == "basic":
        return BasicCredentials(account.client_id, account.client_secret.reveal(), name)
    return OAuthProvider(
        name,
        account,
        token_store(name, account, state_dir, shared, shared_settings),
        clock=clock,
        metrics=metrics,
        refresh_floor=refresh_floor,
    )


def token_store(
    name: str,
    account: AccountSettings,
    state_dir: str,
    shared: Backend | None = None,
    shared_settings: SharedSettings | None = None,
) -> TokenStore:
    """The token file, or the encrypted record in Redis when the backend shares tokens."""
    if shared is not None and shared.tokens is not None and shared_settings is not None:
        return SharedTokenStore(name, shared, shared.tokens, shared_settings)
    return TokenFile(token_path(name, account, state_dir))


def _bearer(token: StoredToken) -> str:
    return bearer(token.access_token)


# --------------------------------------------------------------------------- OAuth provider


class OAuthProvider:
    renewable = True

    def __init__(
        self,
        account: str,
        settings: AccountSettings,
        file: TokenStore,
        *,
        clock: WallClock = time.time,
        metrics: AuthMetrics | None = None,
        refresh_floor: float = 30.0,
    ) -> None:
        self.account = account
        # A token this provider fetched less than this ago is not refreshed again because
        # Kounta said "expired" (see may_renew).
        self.refresh_floor = refresh_floor
        self._fetched: StoredToken | None = None  # the last token fetched here
        self.settings = settings
        self.file = file
        self.clock = clock
        self.metrics = metrics
        self._token: StoredToken | None = None
        self._state: TokenState | None = None  # set (and logged) by start()
        self._session: aiohttp.ClientSession | None = None
        self._inflight: asyncio.Task[StoredToken] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failures = 0
        self._file_mtime: int | None = None
        # Whether the last failure was the token store's (file, Redis), not the endpoint's.
        self._store_failed = False
        self._causes = FailureLog(account, settings.token_url, metrics)
        self._timing = Timing(settings.refresh_leeway, settings.token_retry_max)

    def __repr__(self) -> str:
        return f"OAuthProvider({self.account!r}, state={self._state!r}, ****)"

    @property
    def state(self) -> TokenState:
        return self._state or PENDING

    @property
    def expires_at(self) -> float | None:
        return self._token.expires_at if self._token is not None else None

    # --- life cycle

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        await self.file.start()
        self._load()
        self._runner = asyncio.create_task(self._run(), name=f"token-refresh-{self.account}")

    async def stop(self) -> None:
        for task in (self._runner, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._runner = self._inflight = None
        await self.file.stop()

    def _load(self) -> None:
        self._file_mtime = self.file.mtime()
        try:
            stored = self.file.read()
        except TokenFileCorrupt as e:
            # Not an outage: the first refresh (at once, under the lock) sets the file aside
            # and starts again from the configured refresh_token, if there is one.
            event(
                "token_file_corrupt",
                logging.ERROR,
                account=self.account,
                reason=str(e),
                fallback=self._fallback(),
            )
            stored = None
        except TokenFileError as e:
            event("token_file_unreadable", logging.ERROR, account=self.account, reason=str(e))
            stored = None
        if stored is not None:
            self._adopt(stored)
        else:
            self._set_state(*state_of(None, self.clock(), self._can_refresh(None)))

    # --- what requests call

    async def authorization(self, deadline: float = INF) -> str:
        """The header for a request sent now (asked again after the budget's wait)."""
        token = self._token
        if token is not None and sendable(token, self.clock()):
            return _bearer(token)
        self._check_usable()
        return _bearer(await self._wait(self._refresh(None), deadline))

    async def renew(self, failed: str, deadline: float = INF) -> str:
        """A header other than ``failed``: refreshes unless another request already did."""
        token = self._token
        if token is not None and _bearer(token) != failed and sendable(token, self.clock()):
            return _bearer(token)
        self._check_usable()
        return _bearer(await self._wait(self._refresh(failed), deadline))

    def may_renew(self, failed: str) -> bool:
        """Whether a 401 for ``failed`` may cost a token request: not while ``failed`` is a
        token fetched here less than ``refresh_floor`` ago (an endpoint that answers
        "expired" to every call would otherwise make each call a token request).

        A token read from the file (another process's, or a dead one at start) may always
        be refreshed once: the floor only stops a second request for a token fetched here.
        """
        return may_renew(self._fetched, failed, self.clock(), self.refresh_floor)

    def invalidate(self, failed: str) -> None:
        """Kounta refused ``failed`` but the request cannot wait: refresh in the background."""
        if self._token is not None and _bearer(self._token) == failed and self.may_renew(failed):
            with contextlib.suppress(TokenUnavailable):
                self._check_usable()
                self._refresh(failed)

    def secrets(self) -> tuple[str, ...]:
        token = self._token
        held = (token.access_token, token.refresh_token) if token is not None else ()
        settings = self.settings
        return (*held, settings.client_secret.reveal(), settings.refresh_token.reveal())

    def problem(self) -> str | None:
        """For /readyz: None when requests can get a token."""
        if self._state in STUCK:
            self._reload_if_changed()
        match problem(self._held(), self.clock()):
            case Rejection():
                return self._rejection().description
            case Failing(store=store):
                failing = "token store" if store else "token endpoint"
                return f"account {self.account!r}: no valid access token; the {failing} is failing"
        return None

    def _check_usable(self) -> None:
        """Fail fast: no waiting when no refresh can help right now."""
        if self._state in STUCK:
            self._reload_if_changed()
        stop = blocked(self._held())
        if stop is not None:
            raise self._stop(stop, "is failing")

    def _rejection(self) -> CredentialsRejected:
        if self._state == REJECTED:
            return CredentialsRejected(
                f"Kounta rejected the client credentials of account {self.account!r} "
                "(invalid_client); check client_id and client_secret",
                code="invalid_client",
            )
        return CredentialsRejected(
            f"Account {self.account!r} has no working refresh token; "
            f"run `kounta-proxy authorize --account {self.account}` to authorize it again"
        )

    def _stop(self, stop: Stop, how: str) -> CredentialsRejected | TokenUnavailable:
        """The error a request gets for ``stop`` (``how`` the endpoint fails)."""
        if isinstance(stop, Rejection):
            return self._rejection()
        if stop.store:
            return TokenUnavailable(self.file.unusable(self.account))
        return TokenUnavailable(
            f"The token endpoint for account {self.account!r} {how}; "
            "the proxy retries in the background"
        )

    async def _wait(self, task: asyncio.Task[StoredToken], deadline: float) -> StoredToken:
        left = min(self.settings.token_wait, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, left))
        except TimeoutError:
            raise TokenUnavailable(
                f"The token endpoint for account {self.account!r} is slow; "
                "the proxy keeps trying in the background"
            ) from None

    # --- single flight

    def _refresh(self, failed: str | None) -> asyncio.Task[StoredToken]:
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh_locked(failed))
            self._inflight.add_done_callback(self._refreshed)
        return self._inflight

    def _refreshed(self, task: asyncio.Task[StoredToken]) -> None:
        self._inflight = None
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so nobody sees "never retrieved"
        if error is None:
            self._failures = 0
        elif not isinstance(error, CredentialsRejected):
            self._failures += 1
        self._wake.set()

    async def _refresh_locked(self, failed: str | None) -> StoredToken:
        try:
            patience = self.settings.token_timeout * 3
            async with self.file.locked(patience, self._adoptable(failed)) as found:
                if found is not None:  # stored by the replica holding the lock
                    self._adopt(found)
                    self._count("adopted")
                    return found
                return await self._refresh_or_adopt(failed)
        except TokenFileError as e:
            self._store_failed = True
            self._set_state(UNAVAILABLE, "token store locked, unreadable or away")
            event("token_file_error", logging.ERROR, account=self.account, reason=str(e))
            raise TokenUnavailable(self.file.unusable(self.account)) from None

    async def _refresh_or_adopt(self, failed: str | None) -> StoredToken:
        stored = await self._fetch_or_set_aside()
        self._file_mtime = self.file.mtime()
        if stored is not None and self._adoptable(failed)(stored):
            # Another process (or `authorize`) refreshed while we waited for the lock.
            self._adopt(stored)
            self._count("adopted")
            return stored
        refresh_token = (stored.refresh_token if stored else "") or self._refresh_token()
        token = await self._fetch(refresh_token)
        fresh = token.get("refresh_token")
        new = issued(
            str(token["access_token"]),
            str(fresh) if fresh else None,
            token.get("expires_at"),
            refresh_token,
            self.clock(),
        )
        # Before first use: a rotated refresh token must not be lost. A newer token stored by
        # another writer meanwhile wins (never overwritten by an older one).
        new = await self._persist(new)
        self._adopt(new)
        self._fetched = new
        event(
            "token_refreshed",
            account=self.account,
            expires_in=None if new.expires_at is None else round(new.expires_at - self.clock()),
            rotated=new.refresh_token != refresh_token,
        )
        return new

    async def _fetch_or_set_aside(self) -> StoredToken | None:
        """The stored token (under the lock); a corrupt one is moved aside and counts as none,
        so the configured refresh_token takes over instead of the account failing for good."""
        try:
            return await self.file.fetch()
        except TokenFileCorrupt:
            aside = self.file.set_aside(self.clock())
            event(
                "token_file_set_aside",
                logging.WARNING,
                account=self.account,
                moved_to=str(aside),
                fallback=self._fallback(),
            )
            return None

    def _fallback(self) -> str:
        """What a refresh will use instead of the file's token (named, never shown)."""
        if self._token is not None and self._token.refresh_token:
            return "refresh_token held in memory"
        if self.settings.grant == "client_credentials":
            return "client_credentials grant"
        return "configured refresh_token" if self.settings.refresh_token else "none"

    def _adoptable(self, failed: str | None) -> Callable[[StoredToken], bool]:
        """Whether a token stored elsewhere (read under the lock, or while waiting for it)
        makes our refresh needless."""
        held = self._token.access_token if self._token is not None else None
        leeway = self.settings.refresh_leeway
        return lambda stored: adoptable(stored, held, failed, leeway, self.clock())

    async def _persist(self, token: StoredToken) -> StoredToken:
        try:
            saved = await self.file.save(token)
            self._file_mtime = self.file.mtime()
            return saved
        except TokenFileError as e:
            # Keep going with the token in memory; the operator must fix the file.
            event("token_file_error", logging.ERROR, account=self.account, reason=str(e))
            return token

    def _refresh_token(self) -> str:
        return (
            self._token.refresh_token if self._token else ""
        ) or self.settings.refresh_token.reveal()

    # --- the token request

    async def _fetch(self, refresh_token: str) -> OAuth2Token:
        grant = self.settings.grant
        if grant == "refresh_token" and not refresh_token:
            self._set_state(NEEDS_AUTHORIZE, "no refresh token")
            raise self._rejection()
        started = time.perf_counter()
        try:
            token = await self._post(grant, refresh_token)
        except TokenRequestFailed as e:
            self._causes.report(e, self._failures + 1)
            raise self._failed(e.error or "temporarily_unavailable") from None
        except OAuth2Error as e:
            raise self._failed(e.error or "temporarily_unavailable") from None
        finally:
            if self.metrics is not None:
                self.metrics.token_request_duration.labels(self.account).observe(
                    time.perf_counter() - started
                )
        self._count("ok")
        self._causes.recovered()
        return token

    async def _post(self, grant: str, refresh_token: str) -> OAuth2Token:
        if self._session is None:
            raise OAuth2Error(error="temporarily_unavailable")
        extra = {"refresh_token": refresh_token} if grant == "refresh_token" else {}
        return await request_token(self._session, self.settings, grant, self.clock(), **extra)

    def _failed(self, code: str) -> TokenUnavailable:
        stop = on_endpoint_error(code)
        if isinstance(stop, Rejection):
            self._count("rejected")
            self._set_state(stop.state, code)
        else:
            self._count("unavailable")
            self._store_failed = False
            self._set_state(UNAVAILABLE, code)
        return self._stop(stop, f"failed ({code})")

    # --- state

    def _adopt(self, token: StoredToken) -> None:
        self._token = token
        if self.metrics is not None:
            self.metrics.token_expires_at.labels(self.account).set(token.expires_at or 0)
        self._set_state(*state_of(token, self.clock(), self._can_refresh(token)))
        self._wake.set()

    def _can_refresh(self, token: StoredToken | None) -> bool:
        """A refresh token to send (``token``'s, else the one held or configured), or no
        need for one."""
        held = token.refresh_token if token is not None else self._refresh_token()
        return bool(held) or self.settings.grant == "client_credentials"

    def _held(self) -> Held:
        return Held(
            self.state, self._token, self._inflight is not None, self._failures, self._store_failed
        )

    def _reload_if_changed(self) -> None:
        mtime = self.file.mtime()
        if mtime is None or mtime == self._file_mtime:
            return
        self._file_mtime = mtime
        with contextlib.suppress(TokenFileError):
            stored = self.file.read()
            if stored is not None and stored != self._token:
                self._adopt(stored)

    def _set_state(self, state: TokenState, reason: str) -> None:
        if self.metrics is not None:
            for name in STATES:
                self.metrics.token_state.labels(self.account, name).set(1 if name == state else 0)
        if state == self._state:
            return
        bad = state in BAD
        previous = self._state or "starting"
        level = logging.WARNING if bad else logging.INFO
        event(
            "token_state",
            level,
            account=self.account,
            state=state,
            previous=previous,
            reason=reason,
        )
        self._state = state

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.token_requests.labels(self.account, result).inc()

    # --- background refresh

    async def _run(self) -> None:
        while True:
            delay = self._next_delay()
            self._wake.clear()
            if delay is None or delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            if self._state in STUCK:
                self._reload_if_changed()
                continue
            if self._due():
                with contextlib.suppress(TokenUnavailable):
                    await asyncio.shield(self._refresh(None))

    def _next_delay(self) -> float | None:
        return next_wake(self._held(), self._timing, self.clock())

    def _due(self) -> bool:
        return refresh_now(self._held(), self._timing, self.clock())
