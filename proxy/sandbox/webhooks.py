"""Kounta's webhooks resource, and deliveries when the sandbox's data changes.

``GET/POST /v1/companies/{c}/webhooks`` and ``GET/PUT/DELETE .../webhooks/{id}``: a webhook
has a ``topic`` (one of :data:`TOPICS`), an ``address`` (absolute, https unless loopback),
``format`` ``json`` or ``xml``, an optional ``filter`` (``{"site_ids": [...]}``) and
``headers`` sent back with each delivery (only ``Authorization`` or ``X-*``, never
``X-Kounta*``). Invalid fields: 400 with an OAuth-style error.

Every change of a record (API POST/PUT/PATCH/DELETE, or ``/_sandbox/touch``: a change made
at a till, which a proxy never sees) emits ``{kind}/created|updated|deleted`` (and
``orders/completed`` for a completed order); each matching webhook gets a POST with
``{"topic", "event_id", "company_id", "data": record}``. How deliveries behave is set with
``/_sandbox/webhooks``: ``delay`` (seconds), ``jitter`` (extra random delay up to that,
which reorders), ``drop_rate`` and ``duplicate_rate`` (0..1), ``sign_key`` (then
``X-Kounta-Signature`` carries HMAC-SHA256 of the body, hex), ``seed``. Each delivery is
logged (``GET /_sandbox/webhooks``: time, topic, id, outcome).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from .negotiation import error

KINDS = ("products", "customers", "orders", "sites")
TOPICS = frozenset(
    {f"{kind}/{action}" for kind in KINDS for action in ("created", "updated", "deleted")}
    | {"orders/completed"}
)
LOG_LIMIT = 10_000
DELIVERY_TIMEOUT = 10.0


class Invalid(ValueError):
    pass


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def validate(body: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    """A webhook record from a POST (``old`` None) or PUT body; raises :class:`Invalid`."""
    merged = {**(old or {}), **body}
    topic = merged.get("topic")
    if topic not in TOPICS:
        raise Invalid(f"topic must be one of the supported topics, got {topic!r}")
    address = merged.get("address")
    parts = urlsplit(address) if isinstance(address, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("address must be an absolute http(s) URL")
    if parts.scheme != "https" and not _loopback(parts.hostname):
        raise Invalid("address must use https")
    fmt = merged.get("format", "json")
    if fmt not in ("json", "xml"):
        raise Invalid("format must be json or xml")
    headers = merged.get("headers") or {}
    if not isinstance(headers, dict):
        raise Invalid("headers must be an object")
    for name, value in headers.items():
        lower = str(name).lower()
        if not isinstance(value, str) or not (lower == "authorization" or lower.startswith("x-")):
            raise Invalid(f"header {name!r} is not allowed (only Authorization or X-*)")
        if lower.startswith("x-kounta"):
            raise Invalid(f"header {name!r} is not allowed (X-Kounta* is reserved)")
    filters = merged.get("filter")
    if filters is not None:
        sites = filters.get("site_ids") if isinstance(filters, dict) else None
        if not isinstance(sites, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in sites
        ):
            raise Invalid('filter must be {"site_ids": [site ids]}')
    return {
        "topic": topic,
        "address": address,
        "format": fmt,
        "headers": dict(headers),
        "filter": filters,
    }


@dataclass
class Behaviour:
    delay: float = 0.0
    jitter: float = 0.0
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    sign_key: str = ""


@dataclass
class Hooks:
    company_id: int
    behaviour: Behaviour = field(default_factory=Behaviour)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    random: random.Random = field(default_factory=lambda: random.Random(7))
    next_id: int = 1
    session: aiohttp.ClientSession | None = None

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        record = {"id": self.next_id, "id_str": str(self.next_id), **validate(body)}
        self.records[self.next_id] = record
        self.next_id += 1
        return record

    def update(self, hook_id: int, body: dict[str, Any]) -> dict[str, Any]:
        old = self.records[hook_id]
        record = {"id": hook_id, "id_str": str(hook_id), **validate(body, old)}
        self.records[hook_id] = record
        return record

    def emit(self, kind: str, action: str, record: dict[str, Any]) -> None:
        """The record of ``kind`` was ``action`` (created, updated, deleted): deliver."""
        topics = {f"{kind}/{action}"}
        status = str(record.get("status", "")).lower()
        if kind == "orders" and action != "deleted" and status in ("complete", "completed"):
            topics.add("orders/completed")
        for hook in list(self.records.values()):
            if hook["topic"] not in topics:
                continue
            sites = (hook.get("filter") or {}).get("site_ids")
            if sites is not None and record.get("site_id") not in sites:
                continue
            self._schedule(hook, hook["topic"], record)

    def _schedule(self, hook: dict[str, Any], topic: str, record: dict[str, Any]) -> None:
        b = self.behaviour
        event_id = uuid.uuid4().hex
        entry = {"at": time.time(), "topic": topic, "id": record.get("id"), "event_id": event_id}
        if self.random.random() < b.drop_rate:
            self._log({**entry, "outcome": "dropped"})
            return
        copies = 2 if self.random.random() < b.duplicate_rate else 1
        for _ in range(copies):
            wait = b.delay + self.random.uniform(0, b.jitter)
            task = asyncio.ensure_future(self._deliver(hook, topic, record, event_id, wait))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _deliver(
        self, hook: dict[str, Any], topic: str, record: dict[str, Any], event_id: str, wait: float
    ) -> None:
        await asyncio.sleep(wait)
        data = {"topic": topic, "event_id": event_id, "company_id": self.company_id,
                "data": record}  # fmt: skip
        if hook["format"] == "xml":
            body = (
                f"<webhook><topic>{topic}</topic><id>{record.get('id')}</id></webhook>"
            ).encode()
            kind = "application/xml"
        else:
            body, kind = json.dumps(data).encode(), "application/json"
        headers = {**hook["headers"], "Content-Type": kind}
        if self.behaviour.sign_key:
            mac = hmac.new(self.behaviour.sign_key.encode(), body, hashlib.sha256)
            headers["X-Kounta-Signature"] = mac.hexdigest()
        entry = {"at": time.time(), "topic": topic, "id": record.get("id"), "event_id": event_id}
        if self.session is None:
            self.session = aiohttp.ClientSession()
        try:
            async with self.session.post(
                hook["address"],
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT),
            ) as response:
                await response.read()
                self._log({**entry, "outcome": "delivered", "status": response.status})
        except (aiohttp.ClientError, TimeoutError) as e:
            self._log({**entry, "outcome": "failed", "error": type(e).__name__})

    def _log(self, entry: dict[str, Any]) -> None:
        self.log.append(entry)
        del self.log[:-LOG_LIMIT]

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


SANDBOX_HOOKS = web.AppKey("sandbox_hooks", Hooks)


def add_webhook_routes(app: web.Application, company_id: int) -> None:
    hooks = Hooks(company_id)
    app[SANDBOX_HOOKS] = hooks

    async def closing(app: web.Application) -> None:
        await hooks.close()

    app.on_cleanup.append(closing)
    collection = r"/v1/companies/{company}/webhooks{suffix:(\.json)?}"
    item = r"/v1/companies/{company}/webhooks/{hook:\d{1,9}}{suffix:(\.json)?}"
    app.router.add_route("*", collection, handle_collection)
    app.router.add_route("*", item, handle_item)
    app.router.add_get("/_sandbox/webhooks", show)
    app.router.add_post("/_sandbox/webhooks", configure)


def _company(request: web.Request) -> web.Response | None:
    hooks = request.app[SANDBOX_HOOKS]
    if request.match_info["company"] not in ("me", str(hooks.company_id)):
        return error(404, "not_found", f"Company {request.match_info['company']} not found")
    return None


async def _json(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Invalid("Content-Type must be application/json")
    try:
        data = json.loads(await request.read())
    except ValueError:
        raise Invalid("The request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Invalid("The request body must be a JSON object")
    return data


async def handle_collection(request: web.Request) -> web.StreamResponse:
    hooks = request.app[SANDBOX_HOOKS]
    wrong = _company(request)
    if wrong is not None:
        return wrong
    try:
        if request.method == "GET":
            return web.json_response(list(hooks.records.values()))
        if request.method == "POST":
            return web.json_response(hooks.create(await _json(request)), status=201)
    except Invalid as e:
        return error(400, "invalid_request", str(e))
    return error(405, "method_not_allowed", f"{request.method} is not allowed here",
                 {"Allow": "GET, POST"})  # fmt: skip


async def handle_item(request: web.Request) -> web.StreamResponse:
    hooks = request.app[SANDBOX_HOOKS]
    wrong = _company(request)
    if wrong is not None:
        return wrong
    hook_id = int(request.match_info["hook"])
    if hook_id not in hooks.records:
        return error(404, "not_found", f"Webhook {hook_id} not found")
    try:
        if request.method == "GET":
            return web.json_response(hooks.records[hook_id])
        if request.method == "PUT":
            return web.json_response(hooks.update(hook_id, await _json(request)))
        if request.method == "DELETE":
            del hooks.records[hook_id]
            return web.Response(status=204)
    except Invalid as e:
        return error(400, "invalid_request", str(e))
    return error(405, "method_not_allowed", f"{request.method} is not allowed here",
                 {"Allow": "GET, PUT, DELETE"})  # fmt: skip


async def show(request: web.Request) -> web.Response:
    hooks = request.app[SANDBOX_HOOKS]
    b = hooks.behaviour
    return web.json_response(
        {
            "behaviour": {"delay": b.delay, "jitter": b.jitter, "drop_rate": b.drop_rate,
                          "duplicate_rate": b.duplicate_rate, "signed": bool(b.sign_key)},
            "webhooks": list(hooks.records.values()),
            "deliveries": hooks.log[-int(request.query.get("last", "1000")):],
        }
    )  # fmt: skip


async def configure(request: web.Request) -> web.Response:
    hooks = request.app[SANDBOX_HOOKS]
    try:
        spec = await _json(request)
        b = hooks.behaviour
        for name in ("delay", "jitter", "drop_rate", "duplicate_rate"):
            if name in spec:
                value = float(spec[name])
                if value < 0 or (name.endswith("rate") and value > 1):
                    raise Invalid(f"{name} out of range")
                setattr(b, name, value)
        if "sign_key" in spec:
            b.sign_key = str(spec["sign_key"] or "")
        if "seed" in spec:
            hooks.random.seed(int(spec["seed"]))
    except (Invalid, ValueError, TypeError) as e:
        return error(400, "invalid_request", str(e))
    return await show(request)
