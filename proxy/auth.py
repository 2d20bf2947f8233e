"""Credentials for the upstream: one token provider per account.

A provider answers one question, ``authorization()``: the value of the
``Authorization`` header to send now. :class:`Authenticator` is the layer that
puts it on every upstream request, replacing whatever the caller sent.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Protocol

from proxy.errors import TokenUnavailable
from proxy.messages import Layer, ProxyRequest, ProxyResponse
from proxy.settings import AccountSettings


class TokenProvider(Protocol):
    async def authorization(self) -> str: ...


class StaticToken:
    """A fixed bearer token (tests, benchmarks, short scripts)."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    async def authorization(self) -> str:
        return self._header

    def __repr__(self) -> str:
        return "StaticToken(****)"


class BasicCredentials:
    """Kounta's testing mode: HTTP Basic with the add-on's id and secret."""

    def __init__(self, client_id: str, client_secret: str) -> None:
        pair = f"{client_id}:{client_secret}".encode()
        self._header = "Basic " + base64.b64encode(pair).decode("ascii")

    async def authorization(self) -> str:
        return self._header

    def __repr__(self) -> str:
        return "BasicCredentials(****)"


def provider_for(account: AccountSettings) -> TokenProvider:
    if account.mode == "static":
        return StaticToken(account.token.reveal())
    if account.mode == "basic":
        return BasicCredentials(account.client_id, account.client_secret.reveal())
    raise NotImplementedError(f"account mode {account.mode!r} is not available yet")


class Authenticator:
    """Puts the account's credentials on each request."""

    def __init__(self, inner: Layer, providers: Mapping[str, TokenProvider]) -> None:
        self.inner = inner
        self.providers = providers

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        provider = self.providers.get(request.account)
        if provider is None:
            raise TokenUnavailable(f"No credentials are configured for account {request.account!r}")
        authorization = await provider.authorization()
        return await self.inner.send(request.with_headers(Authorization=authorization))
