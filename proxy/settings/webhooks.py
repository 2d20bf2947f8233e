"""The ``[webhooks]`` section: deliveries from Kounta's webhooks (docs/webhooks.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from proxy.settings.base import Invalid, Secret, _check_http_url, _not_negative, _positive


@dataclass(frozen=True)
class WebhookTopic:
    """What deliveries of the topics ``topic`` (a glob: ``orders/*``) purge, beside or
    instead of the built-in map: path patterns with ``{company}``, ``{id}``, ``{site}``."""

    topic: str = ""
    purge: tuple[str, ...] = ()
    # true: these patterns instead of the built-in ones; false: as well.
    replace: bool = False

    def __post_init__(self) -> None:
        if not self.topic or any(c.isspace() for c in self.topic):
            raise Invalid("topic", f"must be a topic name or glob, got {self.topic!r}")
        for pattern in self.purge:
            if not pattern.startswith("/"):
                raise Invalid("purge", f"must hold path patterns starting with '/': {pattern!r}")
            unknown = set(re.findall(r"{([^}]*)}", pattern)) - {"company", "id", "site"}
            if unknown:
                raise Invalid("purge", f"unknown placeholder {{{sorted(unknown)[0]}}}")


WebhookSignature = Literal["off", "hmac-sha256"]


@dataclass(frozen=True)
class WebhookSettings:
    """Deliveries from Kounta's webhooks, on a listener of their own (docs/webhooks.md)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9466
    # Deliveries for account NAME arrive at {path}/NAME.
    path: str = "/webhooks/kounta"
    # Kounta sends it back as "Authorization: Bearer <secret>" (from secret_file); per
    # account: [accounts.NAME] webhook_secret.
    secret: Secret = Secret("")
    max_body_size: int = 1024**2
    # Kounta's own signature (HMAC-SHA256 over the raw body, hex or base64), checked when
    # "hmac-sha256"; the key is the account's client_secret unless signature_key(_file).
    signature: WebhookSignature = "off"
    signature_header: str = "X-Kounta-Signature"
    signature_key: Secret = Secret("")
    topics: tuple[WebhookTopic, ...] = ()
    # Topics `webhooks sync` registers; empty: created/updated/deleted of every mapped
    # family, and orders/completed.
    subscribe: tuple[str, ...] = ()
    # Where Kounta reaches the listener (https unless loopback), for `webhooks sync`;
    # {path}/NAME is added. --address overrides it.
    address: str = ""
    # Seconds an event id is remembered (a repeated delivery is applied once).
    event_ttl: float = 86400.0
    # After a missed change, seconds the account's feed is distrusted.
    distrust_for: float = 600.0
    # Seconds between verifier revalidations (spare budget only); 0: no verifier.
    verify_every: float = 60.0
    # Seconds between checks that the account's webhooks are registered at `address`
    # (spare budget only; needs address); 0: never.
    check_every: float = 600.0
    # Seconds a delivery may lag behind a change the verifier saw before the change counts
    # as missed (Kounta's delivery delay is undocumented).
    delivery_grace: float = 10.0
    # Refetch in the background, with spare budget, the entries callers read within
    # refetch_window seconds before a change dropped them (the next reader gets a HIT).
    refetch: bool = False
    refetch_window: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise Invalid("port", f"must be between 0 and 65535, got {self.port}")
        if not self.host:
            raise Invalid("host", "must not be empty")
        if not self.path.startswith("/") or self.path.endswith("/") or "?" in self.path:
            raise Invalid("path", f"must start with '/' and not end with one, got {self.path!r}")
        _positive(self, "max_body_size", "event_ttl")
        _not_negative(self, "distrust_for", "verify_every", "check_every", "delivery_grace",
                      "refetch_window")  # fmt: skip
        if not re.fullmatch(r"[A-Za-z0-9-]+", self.signature_header):
            raise Invalid(
                "signature_header", f"must be a header name, got {self.signature_header!r}"
            )
        if self.address:
            _check_http_url("address", self.address, https_unless_loopback=True)
