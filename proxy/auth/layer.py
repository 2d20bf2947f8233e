"""The auth layer: the account's credentials on every upstream request; on a 401 for an
invalid or expired token, one renewal and one resend (when the body can be sent again).
What comes back has the account's secrets taken out (:mod:`proxy.auth.scrub`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.auth.metrics import AuthMetrics
from proxy.auth.providers import TokenProvider
from proxy.auth.scrub import credentials, scrubbed, scrubbed_now, spellings
from proxy.errors import TokenUnavailable
from proxy.logs import debug, log, trace
from proxy.messages import ERROR_BODY_LIMIT, Layer, ProxyRequest, ProxyResponse


def is_token_failure(body: bytes) -> bool:
    """Whether a 401 body says the access token is invalid or expired (Kounta's wording)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", errors="replace").lower()
        return "token" in text and ("expired" in text or "invalid" in text)
    if not isinstance(data, dict):
        return False
    code = str(data.get("error", "")).lower()
    text = str(data.get("error_description", "")).lower()
    return code in ("invalid_token", "expired_token") or (
        "token" in text and ("expired" in text or "invalid" in text)
    )


class Latest:
    """The account's Authorization header as of the moment a request is sent: the upstream
    layer asks for it after the budget's wait (``ProxyRequest.authorize``), so a short-lived
    token never waits in the queue and reaches Kounta expired. Remembers what it gave:
    ``given`` (the last, what a 401 refused) and ``sent`` (all of them, to scrub)."""

    def __init__(self, provider: TokenProvider, given: str, sent: list[str]) -> None:
        self.provider = provider
        self.given = given
        self.sent = sent
        sent.append(given)

    def on(self, request: ProxyRequest) -> ProxyRequest:
        """``request`` carrying ``given`` now and asking again when it is sent (only a
        renewable credential can change meanwhile)."""
        headers = CIMultiDict(request.headers)
        headers["Authorization"] = self.given
        authorize = self if self.provider.renewable else request.authorize
        return request.sent_as(request.method, CIMultiDictProxy(headers), authorize)

    async def __call__(self, deadline: float) -> str:
        self.given = await self.provider.authorization(deadline)
        if self.given not in self.sent:
            self.sent.append(self.given)
        return self.given


class Authenticator:
    """Puts the account's credentials on each request; one refresh and resend on a token 401."""

    def __init__(
        self,
        inner: Layer,
        providers: Mapping[str, TokenProvider],
        metrics: AuthMetrics | None = None,
    ) -> None:
        self.inner = inner
        self.providers = providers
        self.metrics = metrics

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        provider = self.providers.get(request.account)
        if provider is None:
            raise TokenUnavailable(f"No credentials are configured for account {request.account!r}")
        # Asked now too, so a request no token can serve fails before it waits for the budget.
        authorization = await provider.authorization(request.deadline)
        if log.isEnabledFor(logging.DEBUG):  # the provider's state read only when it is
            debug(
                "token_chosen",
                request_id=request.request_id,
                account=request.account,
                provider=type(provider).__name__,
                state=str(provider.state),
                expires_at=provider.expires_at,
            )
        sent: list[str] = []
        response = await self._send(request, provider, Latest(provider, authorization, sent))
        # The tokens sent, and whatever the account holds now (a resend may have renewed it).
        secrets = spellings((*map(credentials, sent), *provider.secrets()))
        if scrubbed_now(response, secrets, request.method):  # a 2xx or 304: no body to read
            return response
        return await scrubbed(response, secrets, request.method)

    async def _send(
        self, request: ProxyRequest, provider: TokenProvider, latest: Latest
    ) -> ProxyResponse:
        response = await self.inner.send(latest.on(request))
        if response.status != 401 or not provider.renewable:
            return response
        if not is_token_failure(await response.decoded(ERROR_BODY_LIMIT)):
            return response
        authorization = latest.given  # what the refused request carried
        if not provider.may_renew(authorization):
            # Refreshed moments ago and already "expired": the caller gets Kounta's 401
            # (normalised like every error) rather than forcing one token request per call.
            self._count(request.account, "refresh_floor")
            return response
        if not request.replayable:
            # The body is gone; the caller gets the 401, the next request a fresh token.
            provider.invalidate(authorization)
            self._count(request.account, "not_replayable")
            return response
        fresh = await provider.renew(authorization, request.deadline)
        self._count(request.account, "resent")
        trace().retries += 1
        debug("token_renewed_resend", request_id=request.request_id, account=request.account)
        # Once only: whatever this answers goes back, so a bad token can never loop.
        resent = await self.inner.send(Latest(provider, fresh, latest.sent).on(request))
        resent.add_upstream_time(response.upstream_seconds)
        return resent

    def _count(self, account: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.auth_resends.labels(account, outcome).inc()
