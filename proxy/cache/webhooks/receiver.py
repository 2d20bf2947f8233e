"""The webhook listener's application: ``POST {webhooks.path}/{account}``.

Every delivery is checked in this order, and refused without applying anything when a
check fails (counted by outcome, logged without the secret or the body):

1. the account is configured (else 404);
2. ``Authorization: Bearer <secret>`` (the account's ``webhook_secret`` or
   ``webhooks.secret``), compared in constant time (else 401);
3. not XML (415: only JSON deliveries are read) and at most ``max_body_size`` bytes (413);
4. with ``signature = "hmac-sha256"``: the signature header holds HMAC-SHA256 of the raw
   body under the key, hex or base64, with or without a ``sha256=`` prefix (else 401);
5. the body is JSON (400), read tolerantly (:mod:`.payload`).

Then: a delivery whose event id (with its body's digest) was applied already is answered
200 and not applied again; otherwise its change (:mod:`.purges`) goes through the cache's
:class:`~proxy.cache.invalidation.Invalidator` (this process, then Redis, or queued for
replay while Redis is away, then the other replicas) and only then is the answer 200. A
failure to apply is a 503, so Kounta retries rather than the change being lost.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from proxy.cache.invalidation import Invalidator
from proxy.cache.webhooks.health import Feeds
from proxy.cache.webhooks.metrics import WebhookMetrics
from proxy.cache.webhooks.payload import Unreadable, parse
from proxy.cache.webhooks.purges import family_label, plan
from proxy.errors import JSON_CONTENT_TYPE
from proxy.logs import event
from proxy.settings import Settings
from proxy.shared.base import SharedUnavailable

# Event ids remembered in memory at most (when not shared in Redis).
LOCAL_EVENTS = 100_000
READ_CHUNK = 64 * 1024


class Marks(Protocol):
    """Where applied event ids are remembered (Redis when shared)."""

    async def webhook_seen(self, account: str, digest: str) -> bool: ...

    async def webhook_remember(self, account: str, digest: str, ttl: float) -> None: ...


class LocalMarks:
    """Event ids remembered in this process, each for its TTL, the oldest dropped past
    :data:`LOCAL_EVENTS`."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.until: OrderedDict[tuple[str, str], float] = OrderedDict()

    async def webhook_seen(self, account: str, digest: str) -> bool:
        until = self.until.get((account, digest))
        return until is not None and until > self.now()

    async def webhook_remember(self, account: str, digest: str, ttl: float) -> None:
        self.until[(account, digest)] = self.now() + ttl
        self.until.move_to_end((account, digest))
        while len(self.until) > LOCAL_EVENTS:
            self.until.popitem(last=False)


class Refused(Exception):
    def __init__(self, status: int, outcome: str, code: str, description: str) -> None:
        super().__init__(description)
        self.status, self.outcome, self.code = status, outcome, code


class Receiver:
    def __init__(
        self,
        current: Callable[[], Settings],
        invalidator: Invalidator,
        feeds: Feeds,
        metrics: WebhookMetrics,
        marks: Marks | None = None,
    ) -> None:
        self.current = current
        self.invalidator = invalidator
        self.feeds = feeds
        self.metrics = metrics
        self.marks: Marks = marks or LocalMarks()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.current().webhooks.max_body_size + 1)
        path = self.current().webhooks.path
        app.router.add_route("*", path + "/{account}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        name = request.match_info["account"]
        settings = self.current()
        account = name if name in settings.accounts else ""
        family = "none"
        try:
            if not account:
                raise Refused(404, "unknown_account", "not_found", "No such account")
            if request.method != "POST":
                raise Refused(405, "malformed", "method_not_allowed", "Deliveries are POSTs")
            self._authorize(request, settings, account)
            body = await self._read(request, settings)
            self._verify(request, body, settings, account)
            try:
                delivery = parse(body, request.headers)
            except Unreadable as e:
                raise Refused(400, "malformed", "invalid_request", f"Not a delivery: {e}") from None
            family = family_label(delivery.family)
            digest = _digest(delivery.event_id, body) if delivery.event_id else None
            if digest is not None and await self._seen(account, digest):
                self.metrics.deliveries.labels(account, family, "duplicate").inc()
                return _answer(200, {"applied": False, "duplicate": True})
            todo = plan(account, delivery, settings.webhooks.topics)
            try:
                await self.invalidator.apply(todo.change)
            except Exception as e:  # anything: Kounta must retry rather than lose it
                event("webhook_apply_failed", logging.ERROR, account=account, error=_why(e))
                raise Refused(503, "failed", "unavailable", "Not applied; retry later") from None
            if todo.whole_account:
                event("webhook_unknown_family", logging.WARNING, account=account,
                      topic=delivery.topic[:100])  # fmt: skip
            self.feeds.delivered(account, todo.change)
            if digest is not None:
                await self._remember(account, digest, settings.webhooks.event_ttl)
        except Refused as refused:
            self.metrics.deliveries.labels(account, family, refused.outcome).inc()
            if refused.status in (401, 404):
                event("webhook_refused", logging.WARNING, account=account or None,
                      outcome=refused.outcome, remote=request.remote)  # fmt: skip
            headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else {}
            return _answer(
                refused.status,
                {"error": refused.code, "error_description": str(refused)},
                headers,
            )
        self.metrics.deliveries.labels(account, family, "applied").inc()
        self.metrics.apply_seconds.observe(time.perf_counter() - started)
        self.metrics.last_delivery.labels(account).set(time.time())
        return _answer(200, {"applied": True, "family": family})

    def _authorize(self, request: web.Request, settings: Settings, account: str) -> None:
        secret = settings.accounts[account].webhook_secret or settings.webhooks.secret
        sent = request.headers.get("Authorization", "")
        scheme, _, token = sent.partition(" ")
        expected = secret.reveal().encode()
        given = token.strip().encode("utf-8", "surrogateescape")
        if not (scheme.lower() == "bearer" and expected and hmac.compare_digest(given, expected)):
            raise Refused(401, "unauthorized", "invalid_token", "Missing or wrong webhook secret")

    async def _read(self, request: web.Request, settings: Settings) -> bytes:
        kind = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind.endswith("/xml") or kind.endswith("+xml"):
            raise Refused(415, "unsupported", "unsupported_media_type", "Only JSON is read")
        limit = settings.webhooks.max_body_size
        if request.content_length is not None and request.content_length > limit:
            raise Refused(413, "too_large", "too_large", f"Deliveries are at most {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(settings.server.body_timeout):
            while chunk := await request.content.read(READ_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise Refused(
                        413, "too_large", "too_large", f"Deliveries are at most {limit} bytes"
                    )
                chunks.append(chunk)
        body = b"".join(chunks)
        if body.lstrip()[:1] == b"<":
            raise Refused(415, "unsupported", "unsupported_media_type", "Only JSON is read")
        return body

    def _verify(self, request: web.Request, body: bytes, settings: Settings, account: str) -> None:
        hooks = settings.webhooks
        if hooks.signature == "off":
            return
        key = (hooks.signature_key or settings.accounts[account].client_secret).reveal()
        mac = hmac.new(key.encode(), body, hashlib.sha256).digest()
        if not signature_matches(request.headers.get(hooks.signature_header, ""), mac):
            raise Refused(401, "bad_signature", "invalid_signature", "Missing or wrong signature")

    async def _seen(self, account: str, digest: str) -> bool:
        try:
            return await self.marks.webhook_seen(account, digest)
        except SharedUnavailable:
            return False  # applied again: harmless

    async def _remember(self, account: str, digest: str, ttl: float) -> None:
        with contextlib.suppress(SharedUnavailable):  # a repeat is applied again: harmless
            await self.marks.webhook_remember(account, digest, ttl)


def signature_matches(sent: str, mac: bytes) -> bool:
    """``sent`` (hex or base64 of ``mac``, ``sha256=`` prefix optional) names ``mac``."""
    value = sent.strip()
    if value[:7].lower() == "sha256=":
        value = value[7:]
    candidates: list[bytes] = []
    with contextlib.suppress(ValueError):
        candidates.append(bytes.fromhex(value))
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        with contextlib.suppress(binascii.Error, ValueError, UnicodeEncodeError):
            candidates.append(decode(value.encode("ascii") + b"=" * (-len(value) % 4)))
    return any(hmac.compare_digest(c, mac) for c in candidates if len(c) == len(mac))


def _digest(event_id: str, body: bytes) -> str:
    """The event id and the body's digest, so a reused id with another body is applied."""
    inner = hashlib.sha256(body).hexdigest()
    return hashlib.sha256(f"{event_id}\n{inner}".encode()).hexdigest()


def _answer(
    status: int, data: dict[str, object], headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        data,
        status=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
        content_type=JSON_CONTENT_TYPE.split(";")[0],
    )


def _why(error: BaseException) -> str:
    text = str(error).split("\n")[0][:120]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
