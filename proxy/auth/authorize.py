"""``kounta-proxy authorize``: bootstrap an oauth account with the authorization-code flow.

1. Print (and, with ``--open``, open) the authorize URL with a random ``state``.
2. Receive the redirect on a loopback listener at ``redirect_uri``, or read a pasted redirect
   URL (or bare code) from ``--code`` or standard input.
3. Check ``state``, exchange the code at the token URL, write the token file.

Every failure is one line naming what went wrong and what to do; no token ever printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
import webbrowser
from dataclasses import dataclass
from typing import TextIO

from aiohttp import web
from authlib.oauth2 import OAuth2Error
from prometheus_client import CollectorRegistry
from yarl import URL

from proxy.auth.endpoint import request_token
from proxy.auth.providers import token_path
from proxy.auth.shared_tokens import SharedTokenStore
from proxy.auth.token_file import StoredToken, TokenFile, TokenFileError, TokenStore
from proxy.client import create_session
from proxy.listener import StartupError, start
from proxy.settings import AccountSettings, ConfigError, Settings, is_loopback_host
from proxy.shared import SharedUnavailable, open_backend
from proxy.shared.metrics import SharedMetrics


class AuthorizeError(Exception):
    """The flow failed; the message is one line for the operator."""


@dataclass(frozen=True)
class Redirect:
    code: str
    state: str | None  # None: a bare code was pasted, so there is no state to check


def authorize_url(account: AccountSettings, state: str) -> str:
    query = {
        "client_id": account.client_id,
        "redirect_uri": account.redirect_uri,
        "state": state,
        "response_type": "code",
    }
    return str(URL(account.authorize_url).with_query(query))


def parse_redirect(text: str) -> Redirect:
    """A pasted redirect URL (or its query, or a bare code) as a :class:`Redirect`."""
    text = text.strip()
    if not text:
        raise AuthorizeError("nothing was pasted: expected the redirect URL or the code")
    if "=" not in text:
        return Redirect(code=text, state=None)
    query = URL(text).query if "://" in text else URL("/?" + text.lstrip("?")).query
    return redirect_from_query(dict(query))


def redirect_from_query(query: dict[str, str]) -> Redirect:
    if "error" in query:
        error = query["error"]
        if error == "access_denied":
            raise AuthorizeError("consent was denied (access_denied): nothing was saved")
        raise AuthorizeError(f"Kounta refused the authorization ({_safe(error)})")
    code = query.get("code", "")
    if not code:
        raise AuthorizeError("the redirect carries no code")
    return Redirect(code=code, state=query.get("state", ""))


def check_state(redirect: Redirect, expected: str) -> None:
    if redirect.state is not None and not secrets.compare_digest(redirect.state, expected):
        raise AuthorizeError(
            "state mismatch: the redirect does not belong to this authorize run; start again"
        )


async def receive_redirect(account: AccountSettings, wait: float, out: TextIO) -> Redirect:
    """Listen on the redirect URI's loopback port until the browser comes back."""
    target = URL(account.redirect_uri)
    loop = asyncio.get_running_loop()
    arrived: asyncio.Future[dict[str, str]] = loop.create_future()

    async def callback(request: web.Request) -> web.Response:
        if not arrived.done():
            arrived.set_result(dict(request.query))
        return web.Response(text="kounta-proxy: you can close this window now.\n")

    app = web.Application()
    app.router.add_get(target.path or "/", callback)
    try:
        runner = await start(app, target.host or "127.0.0.1", target.port or 80, 1.0)
    except StartupError as e:
        raise AuthorizeError(f"cannot receive the redirect: {e}; use --paste instead") from None
    print(f"Waiting for the redirect to {account.redirect_uri} ...", file=out, flush=True)
    try:
        query = await asyncio.wait_for(arrived, wait)
    except TimeoutError:
        raise AuthorizeError(f"no redirect arrived within {wait:g}s; use --paste") from None
    finally:
        await runner.cleanup()
    return redirect_from_query(query)


async def exchange(settings: Settings, name: str, code: str) -> StoredToken:
    account = settings.accounts[name]
    session = create_session(settings.upstream)
    try:
        now = time.time()
        token = await request_token(
            session,
            account,
            "authorization_code",
            now,
            code=code,
            redirect_uri=account.redirect_uri,
        )
    except OAuth2Error as e:
        raise AuthorizeError(_exchange_failure(e.error or "")) from None
    finally:
        await session.close()
    refresh = token.get("refresh_token")
    if not refresh:
        raise AuthorizeError("the token endpoint returned no refresh token; nothing was saved")
    return StoredToken(
        access_token=str(token["access_token"]),
        refresh_token=str(refresh),
        expires_at=token.get("expires_at"),
        obtained_at=now,
    )


def _exchange_failure(code: str) -> str:
    if code in ("invalid_client", "unauthorized_client"):
        return (
            f"the token endpoint rejected the client credentials ({code}): "
            "check client_id and client_secret"
        )
    if code == "invalid_grant":
        return (
            "the authorization code was rejected (invalid_grant): it expired or was used "
            "already; run authorize again"
        )
    if code == "temporarily_unavailable":
        return "the token endpoint could not be reached or failed; try again later"
    return f"the token endpoint refused the code ({_safe(code)})"


async def save(path: TokenStore, token: StoredToken) -> None:
    """Store the new token under the account's lock (file lock, or Redis lock); with Redis the
    write is a compare-and-set over the version read under that lock."""
    try:
        async with path.locked():
            # A record we cannot read (corrupt, another key) is replaced: that is the fix.
            with contextlib.suppress(TokenFileError):
                await path.fetch()
            await path.save(token)
    except TokenFileError as e:
        raise AuthorizeError(str(e)) from None


async def save_shared(settings: Settings, name: str, token: StoredToken) -> None:
    """``[shared] backend = "redis"``: the token goes to Redis, where every replica reads it."""
    backend = open_backend(settings.shared, SharedMetrics(CollectorRegistry()))
    await backend.start()
    try:
        if not backend.up or backend.tokens is None:
            raise AuthorizeError(
                f"the shared store at shared.url is not answering; the token was not saved "
                f"(run `kounta-proxy authorize --account {name}` again when Redis is up)"
            )
        # supersede: a fresh authorization wins over any token a replica holds.
        store = SharedTokenStore(name, backend, backend.tokens, settings.shared, supersede=True)
        await save(store, token)
    finally:
        await backend.close()


def shared_store_name(settings: Settings) -> str:
    """Where shared tokens live, for people: Redis's host, port and database, never the
    password or a user name in ``shared.url``."""
    url = URL(settings.shared.url)
    database = url.path.strip("/") or "0"
    where = f"{url.host}:{url.port}" if url.host else settings.shared.url.split("@")[-1]
    return f"Redis at {where}, db {database}, key prefix {settings.shared.key_prefix!r}"


def saved_where(settings: Settings, name: str) -> str:
    """Where ``authorize`` saved the account's token: the shared store or the token file."""
    if settings.shared.backend == "redis":
        return f"the shared store ({shared_store_name(settings)})"
    return str(token_path(name, settings.accounts[name], settings.state_dir))


async def shared_tokens_present(
    settings: Settings, names: list[str], wait: float
) -> dict[str, bool] | None:
    """Whether Redis holds a token record for each account (only that it exists: nothing is
    decrypted); None when Redis does not answer within ``wait`` seconds."""
    backend = open_backend(settings.shared, SharedMetrics(CollectorRegistry()))
    try:
        async with asyncio.timeout(wait):
            await backend.start()
            tokens = backend.tokens
            if not backend.up or tokens is None:
                return None
            return {name: await tokens.read_token(name) is not None for name in names}
    except (TimeoutError, SharedUnavailable):
        return None
    finally:
        with contextlib.suppress(Exception):
            await backend.close()


def _listens(redirect_uri: str) -> bool:
    """Whether this process can receive the redirect itself (plain http on loopback)."""
    url = URL(redirect_uri)
    return url.scheme == "http" and is_loopback_host(url.host or "")


def _safe(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum() or ch in "_-.")[:60]


def pick_account(settings: Settings, name: str | None) -> str:
    name = name or settings.account_name
    if name not in settings.accounts:
        known = ", ".join(sorted(settings.accounts)) or "none"
        raise ConfigError("accounts", f"no account named {name!r} (configured: {known})")
    if settings.accounts[name].mode != "oauth":
        raise ConfigError(f"accounts.{name}.mode", "authorize needs mode = 'oauth'")
    return name


async def run(
    settings: Settings,
    name: str,
    *,
    code: str | None,
    paste: bool,
    open_browser: bool,
    wait: float,
    out: TextIO = sys.stdout,
    stdin: TextIO = sys.stdin,
) -> StoredToken:
    account = settings.accounts[name]
    state = secrets.token_urlsafe(16)
    url = authorize_url(account, state)
    print(f"Open this URL, sign in and approve access for account {name!r}:\n\n  {url}\n", file=out)
    out.flush()
    if open_browser:
        webbrowser.open(url)
    if code is not None:
        # A code from an earlier run: its state belonged to that run, so it cannot be checked.
        redirect = Redirect(parse_redirect(code).code, None)
    elif paste or not _listens(account.redirect_uri):
        print("Paste the URL you were redirected to (or the code):", file=out, flush=True)
        redirect = parse_redirect(await asyncio.to_thread(stdin.readline))
    else:
        redirect = await receive_redirect(account, wait, out)
    check_state(redirect, state)
    token = await exchange(settings, name, redirect.code)
    if settings.shared.backend == "redis":
        await save_shared(settings, name, token)
    else:
        await save(TokenFile(token_path(name, account, settings.state_dir)), token)
    return token
