"""The sections about handling a call: who may call (``[inbound]``, ``[callers.NAME]``),
resending (``[retry]``), waiting for the rate budget (``[budget]``), paging (``[paging]``)
and the log (``[log]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from proxy.settings.base import Invalid, Secret, _not_negative, _positive


@dataclass(frozen=True)
class InboundSettings:
    # Header carrying a caller key (also accepted as "Authorization: Bearer <key>").
    key_header: str = "X-Proxy-Key"
    # Accept callers without a key even when listening beyond loopback.
    allow_anonymous: bool = False
    # Seconds a caller's previous key is still accepted after a reload (SIGHUP) changed it,
    # so callers can switch over without downtime; 0: refused at once.
    key_overlap: float = 3600.0

    def __post_init__(self) -> None:
        if not self.key_header or not all(c.isalnum() or c == "-" for c in self.key_header):
            raise Invalid("key_header", f"must be a header name, got {self.key_header!r}")
        if self.key_header.lower() in ("authorization", "host", "cookie"):
            raise Invalid("key_header", f"must not be {self.key_header}")
        _not_negative(self, "key_overlap")


@dataclass(frozen=True)
class CallerSettings:
    # The caller's key (secret); the table's name is what logs and metrics show.
    key: Secret = Secret("")
    # The Kounta account this caller uses; empty: the default account.
    account: str = ""
    # The caller's budget class (see budget.weights); X-Proxy-Priority can only lower it.
    priority: Literal["interactive", "standard", "batch"] = "standard"
    # The most of its class's tokens this caller takes while others of the class wait (1: no cap).
    max_share: float = 1.0

    def __post_init__(self) -> None:
        if len(self.key.reveal()) < 16:
            raise Invalid("key", "is required and must be at least 16 characters")
        if not 0 < self.max_share <= 1:
            raise Invalid("max_share", f"must be above 0 and at most 1, got {self.max_share}")


LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class LogSettings:
    level: LogLevel = "info"
    format: Literal["json", "text"] = "json"


# Kounta has no idempotency keys: a resent POST or PATCH can create a duplicate order.
NEVER_RETRIED = ("POST", "PATCH")
RETRYABLE = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")


@dataclass(frozen=True)
class RetrySettings:
    """Resending failed idempotent requests, and the per-account circuit breaker."""

    # Methods resent after a connection failure or a 502/503/504; PUT and DELETE may be
    # added, POST and PATCH never.
    methods: tuple[str, ...] = ("GET", "HEAD", "OPTIONS")
    # Tries in all, the first included (1: never resend).
    attempts: int = 3
    # Pause before the first resend, doubling (with jitter) up to backoff_max.
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    # Consecutive upstream failures after which an account's requests fail fast (0: never).
    breaker_failures: int = 5
    # Seconds the breaker stays open before one probe request is let through.
    breaker_cooldown: float = 30.0

    def __post_init__(self) -> None:
        for method in self.methods:
            if method.upper() in NEVER_RETRIED:
                raise Invalid(
                    "methods",
                    f"{method} is never retried: Kounta has no idempotency keys, "
                    "so a resent request can be processed twice",
                )
            if method.upper() not in RETRYABLE:
                raise Invalid("methods", f"unknown method {method!r}; use {', '.join(RETRYABLE)}")
        if self.attempts < 1:
            raise Invalid("attempts", "must be at least 1")
        _not_negative(self, "backoff_initial")
        if self.backoff_max < self.backoff_initial:
            raise Invalid("backoff_max", "must be at least backoff_initial")
        if self.breaker_failures < 0:
            raise Invalid("breaker_failures", "must not be negative (0: no breaker)")
        _positive(self, "breaker_cooldown")


@dataclass(frozen=True)
class PagingSettings:
    """The X-Proxy-All-Pages helper."""

    # Most pages one request may gather; a longer list is an error, never a silent cut.
    max_pages: int = 100

    def __post_init__(self) -> None:
        if self.max_pages < 1:
            raise Invalid("max_pages", "must be at least 1")


@dataclass(frozen=True)
class ClassWeights:
    """How the budget classes share the rate when they compete (weighted fair queuing)."""

    interactive: float = 6.0
    standard: float = 3.0
    batch: float = 1.0

    def __post_init__(self) -> None:
        _not_negative(self, "interactive", "standard", "batch")
        if not (self.interactive or self.standard or self.batch):
            raise Invalid("interactive", "at least one class needs a weight above 0")


@dataclass(frozen=True)
class BudgetSettings:
    """How requests wait for the account's rate budget (the rates are per account)."""

    # Longest a request waits for its turn before it is answered 429 (or stale from the
    # cache); never longer than the request's own deadline (upstream.total_timeout).
    max_wait: float = 10.0
    # Requests waiting per account at most; beyond that new ones get 429 at once.
    queue_size: int = 1000
    # The period Kounta's limit applies to (a minute). Only tests shorten it.
    window: float = 60.0
    # Seconds added to the window so that network delays cannot push two requests sent a
    # window apart into the same window on Kounta's side.
    window_margin: float = 1.0
    # After a 429 from Kounta without Retry-After or X-Ratelimit-Reset: the first pause,
    # doubling with each further 429 up to backoff_max.
    backoff_initial: float = 5.0
    backoff_max: float = 60.0
    # The longest pause a 429's Retry-After or X-Ratelimit-Reset can impose on the account;
    # longer asks are cut to it (and logged). 0: backoff_max.
    retry_after_max: float = 0.0
    # Shares of the rate by class when classes compete; an idle class's share goes to the rest.
    weights: ClassWeights = field(default_factory=ClassWeights)
    # The part of the burst's tokens and of the window's cap that batch requests never take.
    reserve: float = 0.0
    # Tokens of the burst batch requests leave for the other classes (its window's spread and
    # cap as many sends lower), so an interactive request arriving while batch keeps the
    # bucket spent finds one at hand. Unlike reserve, it leaves the rate whole.
    headroom: int = 3
    # A GET whose expected wait for a token is longer than this is "busy": the cache may
    # answer it from a stored copy up to cache.stale_while_busy past its freshness.
    busy_after: float = 0.25

    def __post_init__(self) -> None:
        _not_negative(
            self,
            "max_wait",
            "queue_size",
            "window_margin",
            "retry_after_max",
            "busy_after",
            "headroom",
        )
        if not 0 <= self.reserve < 1:
            raise Invalid("reserve", f"must be at least 0 and below 1, got {self.reserve}")
        _positive(self, "window", "backoff_initial")
        if self.backoff_max < self.backoff_initial:
            raise Invalid("backoff_max", "must be at least backoff_initial")

    @property
    def longest_pause(self) -> float:
        """The cap on a pause Kounta asks for: ``retry_after_max``, else ``backoff_max``."""
        return self.retry_after_max or self.backoff_max
