"""Credentials that never change (``static`` and ``basic`` modes), and the
:class:`TokenProvider` protocol every account's provider follows (the OAuth one is
:class:`~proxy.auth.providers.OAuthProvider`)."""

from __future__ import annotations

import base64
from typing import Protocol

import aiohttp

from proxy.auth.tokens import INF, STATIC, TokenState


class TokenProvider(Protocol):
    account: str
    # Whether a failed token can be replaced (a 401 is worth a refresh and a resend).
    renewable: bool

    @property
    def state(self) -> TokenState: ...

    @property
    def expires_at(self) -> float | None: ...

    async def authorization(self, deadline: float = INF) -> str: ...

    async def renew(self, failed: str, deadline: float = INF) -> str: ...

    def may_renew(self, failed: str) -> bool: ...

    def invalidate(self, failed: str) -> None: ...

    def problem(self) -> str | None: ...

    def secrets(self) -> tuple[str, ...]:
        """The account's current secrets (tokens, client secret) to keep from callers."""
        ...

    async def start(self, session: aiohttp.ClientSession) -> None: ...

    async def stop(self) -> None: ...


class _Fixed:
    """A credential that never changes: nothing to refresh, nothing to start."""

    renewable = False
    state = STATIC
    expires_at: float | None = None

    def __init__(self, account: str, header: str, *secrets: str) -> None:
        self.account = account
        self._header = header
        self._secrets = (header.partition(" ")[2], *secrets)

    async def authorization(self, deadline: float = INF) -> str:
        return self._header

    async def renew(self, failed: str, deadline: float = INF) -> str:
        return self._header

    def invalidate(self, failed: str) -> None:
        return None

    def may_renew(self, failed: str) -> bool:
        return False

    def problem(self) -> str | None:
        return None

    def secrets(self) -> tuple[str, ...]:
        return self._secrets

    async def start(self, session: aiohttp.ClientSession) -> None:
        return None

    async def stop(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.account!r}, ****)"


class StaticToken(_Fixed):
    """A fixed bearer token (tests, benchmarks, short scripts)."""

    def __init__(self, token: str, account: str = "default") -> None:
        super().__init__(account, f"Bearer {token}")


class BasicCredentials(_Fixed):
    """Kounta's testing mode: HTTP Basic with the add-on's id and secret."""

    def __init__(self, client_id: str, client_secret: str, account: str = "default") -> None:
        pair = f"{client_id}:{client_secret}".encode()
        header = "Basic " + base64.b64encode(pair).decode("ascii")
        super().__init__(account, header, client_secret)
