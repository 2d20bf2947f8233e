"""Keeping an account's webhooks registered at the proxy's address (``kounta-proxy
webhooks sync|list|remove``).

Requests go through the layers it is handed (the proxy's own pipeline below the cache:
retry, the account's credentials, its rate budget), as caller ``webhooks-cli``. ``sync``
makes the webhooks registered at the account's address exactly the topics of
``webhooks.subscribe`` (default: ``created``, ``updated`` and ``deleted`` of every family
the purge map knows, and ``orders/completed``), each with ``format = "json"`` and the
secret header; a second run changes nothing. A topic Kounta refuses (400) is reported and
skipped. ``remove`` deletes every webhook registered at the address; ``list`` shows the
company's webhooks with their secrets masked.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.cache.webhooks.payload import FAMILIES
from proxy.messages import Layer, ProxyRequest
from proxy.settings import Settings, is_loopback_host

CALLER = "webhooks-cli"
ROOT = "/v1/companies/me/webhooks"
MAX_PAGES = 40
TIMEOUT = 30.0


class RegistrationError(Exception):
    """One line for the operator."""


def default_topics() -> tuple[str, ...]:
    actions = ("created", "updated", "deleted")
    return (*(f"{family}/{action}" for family in FAMILIES for action in actions),
            "orders/completed")  # fmt: skip


def address_for(settings: Settings, account: str, address: str | None) -> str:
    """The URL Kounta delivers the account's events to: ``--address`` or
    ``webhooks.address``, with ``{path}/NAME`` added unless it ends so already."""
    base = (address or settings.webhooks.address).rstrip("/")
    if not base:
        raise RegistrationError("no address: give --address or set webhooks.address")
    url = URL(base)
    if url.scheme not in ("http", "https") or not url.host:
        raise RegistrationError(f"the address must be an absolute URL, got {base!r}")
    if url.scheme != "https" and not is_loopback_host(url.host):
        raise RegistrationError("the address must use https (http only for loopback hosts)")
    tail = f"{settings.webhooks.path}/{account}"
    return base if base.endswith(tail) else base + tail


def secret_header(settings: Settings, account: str) -> dict[str, str]:
    secret = settings.accounts[account].webhook_secret or settings.webhooks.secret
    if not secret:
        raise RegistrationError(
            f"no webhook secret for account {account!r}: set webhooks.secret_file or "
            f"accounts.{account}.webhook_secret_file"
        )
    return {"Authorization": f"Bearer {secret.reveal()}"}


@dataclass
class Answer:
    status: int
    data: Any
    next_page: str


class Kounta:
    """JSON requests for one account through the given layers."""

    def __init__(
        self, layer: Layer, account: str, caller: str = CALLER, priority: str = "standard"
    ) -> None:
        self.layer = layer
        self.account = account
        self.caller = caller
        self.priority = priority  # the budget class ("batch" for the verifier's checks)

    async def call(self, method: str, path: str, body: object = None, query: str = "") -> Answer:
        headers = CIMultiDict({"Accept": "application/json"})
        raw = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            raw = json.dumps(body).encode()
        request = ProxyRequest(
            method=method,
            path=path,
            query=query,
            headers=CIMultiDictProxy(headers),
            body=raw,
            account=self.account,
            caller=self.caller,
            priority=self.priority,
            request_id=f"{self.caller}-{uuid.uuid4().hex[:12]}",
            deadline=asyncio.get_running_loop().time() + TIMEOUT,
        )
        response = await self.layer.send(request)
        try:
            if isinstance(response.body, bytes):
                text = response.body
            else:
                text = b"".join([chunk async for chunk in response.body])
        finally:
            await response.release()
        try:
            data = json.loads(text) if text.strip() else None
        except ValueError:
            data = text.decode("utf-8", "replace")[:200]
        return Answer(response.status, data, response.headers.get("X-Next-Page", ""))

    async def webhooks(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        query = ""
        for _ in range(MAX_PAGES):
            answer = await self.call("GET", ROOT + ".json", query=query)
            if answer.status != 200 or not isinstance(answer.data, list):
                raise RegistrationError(f"listing webhooks: {describe(answer)}")
            found += [w for w in answer.data if isinstance(w, dict)]
            if not answer.next_page:
                break
            query = URL(answer.next_page).query_string
        return found


def describe(answer: Answer) -> str:
    if isinstance(answer.data, dict) and "error" in answer.data:
        why = answer.data.get("error_description", "")
        return f"{answer.status} {answer.data.get('error')}: {why}"
    return f"{answer.status}"


def _hook_id(hook: dict[str, Any]) -> str:
    return str(hook.get("id_str") or hook.get("id"))


async def sync(
    kounta: Kounta,
    settings: Settings,
    address: str,
    *,
    dry_run: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Make the webhooks at ``address`` the subscribed topics; 0 when nothing failed
    (refused topics are reported, not failures)."""
    headers = secret_header(settings, kounta.account)
    wanted = settings.webhooks.subscribe or default_topics()
    ours = [h for h in await kounta.webhooks() if h.get("address") == address]
    by_topic: dict[str, dict[str, Any]] = {}
    failed = 0
    for hook in ours:
        topic = str(hook.get("topic", ""))
        if topic in wanted and topic not in by_topic:
            by_topic[topic] = hook
            continue
        say(f"delete {topic} (webhook {_hook_id(hook)}){' (dry run)' if dry_run else ''}")
        if not dry_run:
            answer = await kounta.call("DELETE", f"{ROOT}/{_hook_id(hook)}.json")
            if answer.status not in (200, 204, 404):
                say(f"  failed: {describe(answer)}")
                failed += 1
    for topic in wanted:
        body = {"topic": topic, "address": address, "format": "json", "headers": headers}
        existing = by_topic.get(topic)
        if existing is not None and _same(existing, body):
            say(f"unchanged {topic}")
            continue
        verb = "create" if existing is None else "update"
        say(f"{verb} {topic}{' (dry run)' if dry_run else ''}")
        if dry_run:
            continue
        if existing is None:
            answer = await kounta.call("POST", ROOT + ".json", body)
        else:
            answer = await kounta.call("PUT", f"{ROOT}/{_hook_id(existing)}.json", body)
        if answer.status == 400:
            say(f"  refused, skipped: {describe(answer)}")
        elif answer.status not in (200, 201):
            say(f"  failed: {describe(answer)}")
            failed += 1
    return 1 if failed else 0


def _same(hook: dict[str, Any], body: dict[str, Any]) -> bool:
    """Registered as wanted (headers compared only when Kounta shows them)."""
    if hook.get("format", "json") != body["format"]:
        return False
    shown = hook.get("headers")
    return not isinstance(shown, dict) or shown == body["headers"]


async def remove(
    kounta: Kounta, address: str, *, dry_run: bool = False, say: Callable[[str], None] = print
) -> int:
    failed = 0
    for hook in await kounta.webhooks():
        if hook.get("address") != address:
            continue
        note = " (dry run)" if dry_run else ""
        say(f"delete {hook.get('topic')} (webhook {_hook_id(hook)}){note}")
        if not dry_run:
            answer = await kounta.call("DELETE", f"{ROOT}/{_hook_id(hook)}.json")
            if answer.status not in (200, 204, 404):
                say(f"  failed: {describe(answer)}")
                failed += 1
    return 1 if failed else 0


async def show(kounta: Kounta, address: str | None, say: Callable[[str], None] = print) -> int:
    for hook in await kounta.webhooks():
        mine = " (this proxy)" if address is not None and hook.get("address") == address else ""
        headers = hook.get("headers")
        names = ", ".join(sorted(str(k) for k in headers)) if isinstance(headers, dict) else ""
        say(f"{_hook_id(hook)}\t{hook.get('topic')}\t{hook.get('format', 'json')}\t"
            f"{hook.get('address')}\theaders: {names or '-'}{mine}")  # fmt: skip
    return 0
