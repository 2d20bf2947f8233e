"""A real OAuth 2.0 authorization server for the sandbox, on authlib's server classes.

authlib has no aiohttp integration, so :class:`SandboxAuthServer` adapts it: each aiohttp
request is read first (the form needs ``await``) into an :class:`Incoming`, and authlib,
which is synchronous, works on that. Endpoints:

- ``GET /authorize``: auto-approves (or denies, when ``deny`` is set) and redirects back
  with ``code`` and ``state``, like ``https://my.kounta.com/authorize``;
- ``POST /v1/token`` and ``/v1/token.json``: authorization_code and refresh_token grants
  (and client_credentials, which older Kounta docs mention), client_secret_post and
  client_secret_basic;
- ``POST /v1/revoke``: RFC 7009 revocation (tests can also call :meth:`revoke`).

Issued access tokens are registered with the sandbox state, so the API accepts them until
they expire and then answers with Kounta's 401 "has expired" body.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from authlib.oauth2.rfc6749 import AuthorizationServer, OAuth2Payload, OAuth2Request, grants
from authlib.oauth2.rfc7009 import RevocationEndpoint
from multidict import CIMultiDictProxy

from .config import SandboxConfig
from .state import SandboxState

TOKEN_PATHS = ("/v1/token", "/v1/token.json")
AUTHORIZE_PATH = "/authorize"
REVOKE_PATH = "/v1/revoke"
CODE_LIFETIME = 600
OWNER = "sandbox-owner"


# --- models (authlib's ClientMixin / AuthorizationCodeMixin / TokenMixin duck types) --------


@dataclass
class Client:
    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if self.redirect_uris else None

    def get_allowed_scope(self, scope: str | None) -> str:
        return scope or ""

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        # No list configured: any loopback or https redirect, as a development app allows.
        if not self.redirect_uris:
            return redirect_uri.startswith(("http://127.0.0.1", "http://localhost", "https://"))
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret.encode(), self.client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_post", "client_secret_basic")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token", "client_credentials")


@dataclass
class AuthCode:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class IssuedToken:
    access_token: str
    refresh_token: str | None
    client_id: str
    scope: str
    revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return self.scope


# --- request adaptation ------------------------------------------------------------------


@dataclass(frozen=True)
class Incoming:
    """An aiohttp request, already read, in the shape authlib asks for."""

    method: str
    url: str
    headers: CIMultiDictProxy[str]
    query: Mapping[str, str]
    form: Mapping[str, str]

    @classmethod
    async def read(cls, request: web.Request) -> Incoming:
        form = await request.post() if request.method == "POST" else {}
        return cls(
            method=request.method,
            url=str(request.url),
            headers=request.headers,
            query=dict(request.query),
            form={k: v for k, v in form.items() if isinstance(v, str)},
        )


class _Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, data: dict[str, str]) -> None:
        self._data = data

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> dict[str, list[str]]:
        return {k: [v] for k, v in self._data.items()}


class _Request(OAuth2Request):  # type: ignore[misc]
    def __init__(self, incoming: Incoming) -> None:
        super().__init__(incoming.method, incoming.url, headers=incoming.headers)
        self._args = dict(incoming.query)
        self._form = dict(incoming.form)
        self.payload = _Payload({**self._args, **self._form})

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


# --- grants ------------------------------------------------------------------------------

_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


class _CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = _AUTH_METHODS

    def save_authorization_code(self, code: str, request: Any) -> None:
        server: SandboxAuthServer = self.server
        server.codes[code] = AuthCode(
            code=code,
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri or "",
            scope=request.scope or "",
            expires_at=server.state.clock() + CODE_LIFETIME,
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthCode | None:
        server: SandboxAuthServer = self.server
        found = server.codes.get(code)
        if found is None or found.client_id != client.client_id:
            return None
        return found if found.expires_at > server.state.clock() else None

    def delete_authorization_code(self, authorization_code: AuthCode) -> None:
        self.server.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: AuthCode) -> str:
        return OWNER


class _RefreshGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = _AUTH_METHODS

    def authenticate_refresh_token(self, refresh_token: str) -> IssuedToken | None:
        found: IssuedToken | None = self.server.by_refresh.get(refresh_token)
        return None if found is None or found.revoked else found

    def authenticate_user(self, credential: IssuedToken) -> str:
        return OWNER

    def issue_token(self, user: str, refresh_token: IssuedToken) -> dict[str, Any]:
        server: SandboxAuthServer = self.server
        token: dict[str, Any] = self.generate_token(
            user=user, scope=refresh_token.get_scope(), include_refresh_token=server.rotate
        )
        return token

    def revoke_old_credential(self, refresh_token: IssuedToken) -> None:
        # Without rotation the same refresh token keeps working; with it, the old one dies.
        if self.server.rotate:
            refresh_token.revoked = True


class _ClientCredentialsGrant(grants.ClientCredentialsGrant):  # type: ignore[misc]
    # Older Kounta docs mention this grant for development; no refresh token is issued.
    TOKEN_ENDPOINT_AUTH_METHODS = _AUTH_METHODS


class _Revocation(RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = _AUTH_METHODS

    def query_token(self, token_string: str, token_type_hint: str | None) -> IssuedToken | None:
        server: SandboxAuthServer = self.server
        return server.by_access.get(token_string) or server.by_refresh.get(token_string)

    def revoke_token(self, token: IssuedToken, request: Any) -> None:
        self.server.revoke(token.refresh_token or token.access_token)


# --- the server --------------------------------------------------------------------------


@dataclass
class _Counters:
    token_requests: int = 0
    grants: dict[str, int] = field(default_factory=dict)
    # Token requests per client id (from the form or the Basic header), answered or not.
    by_client: dict[str, int] = field(default_factory=dict)
    # Refresh tokens presented that were already spent (rotation) or revoked.
    spent_refresh: int = 0


class SandboxAuthServer(AuthorizationServer):  # type: ignore[misc]
    """authlib's AuthorizationServer with aiohttp request/response hooks and in-memory storage."""

    def __init__(self, state: SandboxState) -> None:
        super().__init__()
        config: SandboxConfig = state.config
        self.state = state
        self.client = Client(config.client_id, config.client_secret, config.redirect_uris)
        self.lifetime = config.access_token_lifetime
        self.rotate = config.rotate_refresh_tokens
        self.deny = config.oauth_deny
        self.codes: dict[str, AuthCode] = {}
        self.by_access: dict[str, IssuedToken] = {}
        self.by_refresh: dict[str, IssuedToken] = {}
        self.counters = _Counters()
        self.register_token_generator("default", self._generate)
        self.register_grant(_CodeGrant)
        self.register_grant(_RefreshGrant)
        self.register_grant(_ClientCredentialsGrant)
        self.register_endpoint(_Revocation)
        for refresh_token in config.refresh_tokens:
            self.seed_refresh_token(refresh_token)

    # authlib hooks
    def query_client(self, client_id: str) -> Client | None:
        return self.client if client_id == self.client.client_id else None

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        issued = IssuedToken(
            access_token=token["access_token"],
            refresh_token=token.get("refresh_token"),
            client_id=request.client.client_id,
            scope=token.get("scope", ""),
        )
        if issued.refresh_token is None and getattr(request, "refresh_token", None) is not None:
            # Not rotated: the old refresh token now stands for the new access token too.
            issued.refresh_token = request.refresh_token.refresh_token
        self.by_access[issued.access_token] = issued
        if issued.refresh_token is not None:
            self.by_refresh[issued.refresh_token] = issued
        self.state.add_bearer_token(
            issued.access_token, self.state.clock() + token["expires_in"], issued.client_id
        )

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        return request if isinstance(request, OAuth2Request) else _Request(request)

    def create_json_request(self, request: Any) -> Any:  # pragma: no cover - no JSON endpoints
        raise NotImplementedError

    def handle_response(self, status: int, body: Any, headers: Any) -> web.Response:
        pairs = headers.items() if isinstance(headers, dict) else headers
        out = {k: v for k, v in pairs if k.lower() != "content-type"}
        if isinstance(body, dict):
            return web.Response(
                status=status,
                body=json.dumps(body).encode(),
                headers={**out, "Cache-Control": "no-store"},
                content_type="application/json",
            )
        return web.Response(status=status, text=body or None, headers=out)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        return None

    def _generate(
        self,
        grant_type: str,
        client: Client,
        user: str | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        token: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": secrets.token_urlsafe(24),
            "expires_in": expires_in or self.lifetime,
        }
        if include_refresh_token:
            token["refresh_token"] = secrets.token_urlsafe(32)
        return token

    # test controls
    def seed_refresh_token(self, refresh_token: str) -> None:
        """Accept ``refresh_token`` as if issued earlier (bootstraps without /authorize)."""
        issued = IssuedToken("", refresh_token, self.client.client_id, "")
        self.by_refresh[refresh_token] = issued

    def revoke(self, token: str) -> None:
        """Revoke an access or refresh token (and the access token issued with it)."""
        issued = self.by_refresh.get(token) or self.by_access.get(token)
        if issued is None:
            return
        issued.revoked = True
        self.state.revoke_bearer_token(issued.access_token)
        if token != issued.access_token:
            self.state.revoke_bearer_token(token)

    def revoke_all_refresh_tokens(self) -> None:
        for issued in self.by_refresh.values():
            issued.revoked = True

    @property
    def token_requests(self) -> int:
        return self.counters.token_requests

    # aiohttp handlers
    async def handle_token(self, request: web.Request) -> web.Response:
        incoming = await Incoming.read(request)
        self.counters.token_requests += 1
        grant = incoming.form.get("grant_type", "")
        self.counters.grants[grant] = self.counters.grants.get(grant, 0) + 1
        client = _client_of(incoming)
        self.counters.by_client[client] = self.counters.by_client.get(client, 0) + 1
        presented = self.by_refresh.get(incoming.form.get("refresh_token", ""))
        if grant == "refresh_token" and presented is not None and presented.revoked:
            self.counters.spent_refresh += 1
        response: web.Response = self.create_token_response(incoming)
        return response

    async def handle_authorize(self, request: web.Request) -> web.Response:
        incoming = await Incoming.read(request)
        oauth_request = self.create_oauth2_request(incoming)
        try:
            grant = self.get_consent_grant(oauth_request)
        except Exception as e:  # authlib's OAuth2Error: show it, there is nowhere to redirect
            description = getattr(e, "description", None) or str(e)
            error = {
                "error": getattr(e, "error", "invalid_request"),
                "error_description": description,
            }
            return web.json_response(error, status=400)
        user = None if self.deny else OWNER
        response: web.Response = self.create_authorization_response(
            oauth_request, grant_user=user, grant=grant
        )
        return response

    async def handle_revoke(self, request: web.Request) -> web.Response:
        incoming = await Incoming.read(request)
        response: web.Response = self.create_endpoint_response("revocation", incoming)
        return response


def _client_of(incoming: Incoming) -> str:
    """The client id a token request names (client_secret_post or client_secret_basic)."""
    if incoming.form.get("client_id"):
        return incoming.form["client_id"]
    scheme, _, encoded = incoming.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "basic":
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            return base64.b64decode(encoded).decode().partition(":")[0]
    return ""


SANDBOX_OAUTH = web.AppKey("sandbox_oauth", SandboxAuthServer)


def add_oauth_routes(app: web.Application, state: SandboxState) -> SandboxAuthServer:
    server = SandboxAuthServer(state)
    app[SANDBOX_OAUTH] = server
    for path in TOKEN_PATHS:
        app.router.add_post(path, server.handle_token)
    app.router.add_post(REVOKE_PATH, server.handle_revoke)
    app.router.add_get(AUTHORIZE_PATH, server.handle_authorize)
    state.public_paths.update({*TOKEN_PATHS, REVOKE_PATH, AUTHORIZE_PATH})
    return server
