"""Typed, frozen settings: defaults, then a TOML file, then ``KOUNTA_PROXY_*`` variables.

Every section is a frozen dataclass; the loader walks the type hints, so adding a
field to a dataclass is all it takes to make a new key configurable from the file
and from the environment. Problems surface as one :class:`ConfigError` naming the
key, never as a traceback.

Environment variables name the key path with double underscores::

    KOUNTA_PROXY_SERVER__PORT=8081
    KOUNTA_PROXY_ACCOUNTS__DEFAULT__CLIENT_SECRET=...
    KOUNTA_PROXY_ACCOUNTS__DEFAULT__CLIENT_SECRET_FILE=/run/secrets/kounta

Any :class:`Secret` field may instead be read from a file named by ``<key>_file``
(in TOML or the environment), which is how Docker secrets are mounted.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import functools
import ipaddress
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from yarl import URL

from proxy.files import read_regular
from proxy.headers import DEFAULT_FORWARDED, NEVER_FORWARDED, REQUIRED_FORWARDED

ENV_PREFIX = "KOUNTA_PROXY_"
DEFAULT_CONFIG_PATH = Path("kounta-proxy.toml")
MASK = "********"


class ConfigError(Exception):
    """A configuration problem, phrased for one line on a terminal. ``key`` is the setting's
    path; ``label``, if given, is what the line names instead (an environment variable)."""

    def __init__(self, key: str, problem: str, *, label: str = "") -> None:
        self.key = key
        self.problem = problem
        self.label = label
        shown = label or key
        super().__init__(f"{shown}: {problem}" if shown else problem)


class ConfigErrors(ConfigError):
    """Every problem found in one load, so an operator fixes them all in one go."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = problems
        first = problems[0]
        super().__init__(first.key, first.problem, label=first.label)

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class Invalid(ValueError):
    """Raised by a section's ``__post_init__``; the loader adds the section path."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or logs.

    ``source`` names the ``*_file`` it was read from (shown by check-config; not secret).
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "") -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"Secret({MASK!r})" if self._value else "Secret('')"

    __str__ = __repr__


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_http_url(key: str, value: str, *, https_unless_loopback: bool) -> None:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise Invalid(key, f"must be an absolute http(s) URL, got {value!r}")
    if url.query_string or url.fragment:
        raise Invalid(key, "must not carry a query or fragment")
    if https_unless_loopback and url.scheme != "https" and not is_loopback_host(url.host):
        raise Invalid(key, "must use https (plain http is only allowed for loopback hosts)")


def _not_negative(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise Invalid(name, "must not be negative")


def _positive(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise Invalid(name, "must be greater than 0")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Where callers reach the proxy; paging and Location URLs are rewritten onto it.
    # Empty: taken from each request's own scheme and Host header.
    public_url: str = ""
    max_body_size: int = 10 * 1024 * 1024
    # Bodies up to this size are held in memory so a request can be resent once
    # (after a token refresh); larger ones are streamed and never resent.
    replay_body_size: int = 1024 * 1024
    # In-flight requests get this long to finish after SIGTERM.
    shutdown_grace: float = 10.0
    # Let several processes listen on the same port (SO_REUSEPORT); `serve --workers N` sets it
    # in each worker.
    reuse_port: bool = False
    # After SIGTERM, keep serving new requests this long (readiness already false) before
    # the listener closes: a sidecar's neighbour still reaches Kounta while it winds down.
    # 0: close at once. 5 suits Kubernetes (endpoint removal takes a few seconds).
    drain_delay: float = 0.0
    # Seconds a connection has to deliver a complete request head, from when it opens or
    # the first byte of the next request arrives (slowloris); then 408 and close.
    header_timeout: float = 10.0
    # Open connections at most; at the cap the keep-alive connection idle longest is closed
    # to admit a new one, and only when none is idle is the new one answered 503 and closed.
    max_connections: int = 1000
    # Seconds an idle keep-alive connection stays open after an answer (nginx's default 75).
    keepalive_timeout: float = 75.0
    # Seconds the proxy waits for a request body, from the end of the head to the end of
    # the body (time it spends elsewhere meanwhile, e.g. queued for a budget token, does not
    # count); then 408 and close.
    body_timeout: float = 30.0
    # Bytes a second a request body must keep up, judged after the first second of waiting
    # (at least this many bytes for every second past the first); 0: no minimum.
    body_min_rate: float = 100.0
    # Seconds one write of a streamed answer may wait for a caller that stopped reading;
    # then the caller's connection is closed and the upstream connection let go (nginx's
    # send_timeout).
    send_timeout: float = 30.0
    # The asyncio event loop: "auto" takes uvloop when installed (the `fast` extra, in the
    # image), "asyncio" never does, "uvloop" requires it (serve stops with one line without it).
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise Invalid("port", f"must be between 0 and 65535, got {self.port}")
        if self.public_url:
            _check_http_url("public_url", self.public_url, https_unless_loopback=False)
        _not_negative(self, "max_body_size", "replay_body_size", "shutdown_grace", "drain_delay")
        _positive(self, "header_timeout")
        _positive(self, "keepalive_timeout", "body_timeout")
        _not_negative(self, "body_min_rate")
        _positive(self, "send_timeout")
        if self.max_connections < 1:
            raise Invalid("max_connections", "must be at least 1")


@dataclass(frozen=True)
class UpstreamSettings:
    base_url: str = "https://api.kounta.com"
    # PEM bundle to verify the upstream's certificate; empty: the system's trust store.
    ca_bundle: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    total_timeout: float = 60.0
    pool_size: int = 100
    # The caller's request headers that go on to Kounta (an allowlist, any case); the
    # required ones (Accept, Content-Type, Cache-Control, conditionals, X-Page, ...) must stay.
    forward_headers: tuple[str, ...] = DEFAULT_FORWARDED
    # A gzip body from Kounta that inflates past either cap is refused (502 upstream_too_large):
    # bytes in all, and times its compressed size (judged past the first MiB).
    max_inflated_size: int = 64 * 1024**2
    max_inflate_ratio: int = 200
    # Upstream connections one account may hold at once (its share of pool_size), so callers
    # of one account cannot take every connection; 0: pool_size shared equally by the
    # accounts (at least 1 each). A request that waits connect_timeout for one gets
    # 503 upstream_busy, which no circuit breaker counts.
    account_pool_size: int = 0

    def __post_init__(self) -> None:
        _check_http_url("base_url", self.base_url, https_unless_loopback=True)
        _positive(self, "max_inflated_size", "max_inflate_ratio")
        _not_negative(self, "account_pool_size")
        if URL(self.base_url).path not in ("", "/"):
            raise Invalid(
                "base_url",
                f"must be an origin without a path, got {self.base_url!r}: callers send "
                "/v1/... and the proxy forwards that path as is (use "
                f"{str(URL(self.base_url).origin())!r})",
            )
        if self.ca_bundle and not Path(self.ca_bundle).is_file():
            raise Invalid("ca_bundle", f"no such file: {self.ca_bundle}")
        _positive(self, "connect_timeout", "read_timeout", "total_timeout")
        if self.pool_size < 1:
            raise Invalid("pool_size", "must be at least 1")
        _check_forwarded(self.forward_headers)

    def account_share(self, accounts: int) -> int:
        """Upstream connections each of ``accounts`` accounts may hold at once."""
        return self.account_pool_size or max(1, self.pool_size // max(1, accounts))

    @functools.cached_property
    def forwarded(self) -> frozenset[str]:
        """``forward_headers`` in lower case, as :func:`proxy.headers.for_upstream` takes it."""
        return frozenset(name.lower() for name in self.forward_headers)

    @functools.cached_property
    def url(self) -> URL:
        # Parsed once: read on every request.
        return URL(self.base_url.rstrip("/"))


def _check_forwarded(names: tuple[str, ...]) -> None:
    for name in names:
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise Invalid("forward_headers", f"must hold header names, got {name!r}")
        lower = name.lower()
        if lower in NEVER_FORWARDED or lower.startswith("proxy-"):
            raise Invalid(
                "forward_headers",
                f"{name} is never forwarded (the proxy sets it, it is connection-specific, "
                "or it asks a server to route, rewrite or change the method)",
            )
    given = {n.lower() for n in names}
    missing = [n for n in REQUIRED_FORWARDED if n.lower() not in given]
    if missing:
        raise Invalid(
            "forward_headers", f"must include {', '.join(missing)} (the proxy acts on it)"
        )


AccountMode = Literal["oauth", "basic", "static"]
TokenAuth = Literal["client_secret_post", "client_secret_basic"]
OAuthGrant = Literal["refresh_token", "client_credentials"]


@dataclass(frozen=True)
class AccountSettings:
    mode: AccountMode = "static"
    # static: the bearer token sent as is.
    token: Secret = Secret("")
    # basic and oauth: the add-on's credentials.
    client_id: str = ""
    client_secret: Secret = Secret("")
    # oauth: where tokens come from and how they are kept (see proxy/auth/providers.py).
    token_url: str = "https://api.kounta.com/v1/token"  # noqa: S105 - a URL
    token_auth: TokenAuth = "client_secret_post"  # noqa: S105 - a method name
    grant: OAuthGrant = "refresh_token"
    # JSON token file (mode 0600); empty: <state_dir>/tokens/<account>.json. Not "token_file":
    # that name reads the static token from a file.
    token_path: str = ""
    # A refresh token to start from while the token file holds none.
    refresh_token: Secret = Secret("")
    # Refresh this many seconds before expiry, but never earlier than half the lifetime.
    refresh_leeway: float = 300.0
    # A token younger than this is not refreshed again on a 401 "expired"; unset: the
    # [auth] refresh_floor.
    refresh_floor: float | None = None
    # How long a request waits for a token being fetched before it gets 503.
    token_wait: float = 5.0
    # Timeout of one token request; longest pause between retries while the endpoint fails.
    token_timeout: float = 10.0
    token_retry_max: float = 60.0
    # kounta-proxy authorize: where the owner approves, and where the code comes back.
    authorize_url: str = "https://my.kounta.com/authorize"
    redirect_uri: str = "http://127.0.0.1:8765/callback"
    # Requests a minute this account may send to Kounta; 0: the mode's default
    # (180 for oauth and static, 60 for basic). See proxy/pipeline/budget.py.
    rate_per_minute: int = 0
    # Requests that may go out back to back before the pace sets in; 0: rate_per_minute / 20.
    burst: int = 0
    # The account's weight in the local cache tiers: it holds at most cache.max_size (and
    # cache.memory_size) * cache_share / the sum of all accounts' cache_share.
    cache_share: float = 1.0
    # The Bearer secret Kounta sends back with this account's webhook deliveries (from
    # webhook_secret_file); empty: webhooks.secret.
    webhook_secret: Secret = Secret("")

    def __post_init__(self) -> None:
        if not self.cache_share > 0:
            raise Invalid("cache_share", f"must be greater than 0, got {self.cache_share}")
        if self.mode == "static" and not self.token:
            raise Invalid("token", "is required when mode = 'static'")
        if self.mode in ("basic", "oauth") and not (self.client_id and self.client_secret):
            raise Invalid("client_id", f"client_id and client_secret are required for {self.mode}")
        _check_oauth(self)
        _check_rate(self.rate_per_minute, self.burst)


def _check_oauth(account: AccountSettings) -> None:
    _check_http_url("token_url", account.token_url, https_unless_loopback=True)
    _check_http_url("authorize_url", account.authorize_url, https_unless_loopback=True)
    redirect = URL(account.redirect_uri)
    if redirect.scheme not in ("http", "https") or not redirect.host:
        problem = f"must be an absolute http(s) URL, got {account.redirect_uri!r}"
        raise Invalid("redirect_uri", problem)
    _not_negative(account, "refresh_leeway")
    if account.refresh_floor is not None and account.refresh_floor < 0:
        raise Invalid("refresh_floor", "must not be negative")
    _positive(account, "token_wait", "token_timeout", "token_retry_max")


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


@dataclass(frozen=True)
class AuthSettings:
    """What all accounts' credentials share (per-account values override)."""

    # Seconds after a refresh during which a 401 "expired" does not refresh again (the
    # caller gets the 401): an endpoint that always says "expired" cannot force a token
    # request per call.
    refresh_floor: float = 30.0

    def __post_init__(self) -> None:
        _not_negative(self, "refresh_floor")

    def floor_for(self, account: AccountSettings) -> float:
        return self.refresh_floor if account.refresh_floor is None else account.refresh_floor


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


UNIX_PATH_MAX = 104  # sun_path is 108 bytes on Linux, 104 on the BSDs and macOS


@dataclass(frozen=True)
class AdminSettings:
    """The admin listener: /metrics, /healthz, /readyz and the features' admin routes."""

    enabled: bool = True
    # Loopback by default: the admin routes (cache purge, ...) have no authentication.
    host: str = "127.0.0.1"
    port: int = 9464
    # Host header values (any port) the admin listener answers; others get 403 (DNS
    # rebinding). Add the name Prometheus scrapes when the listener is reachable elsewhere;
    # an entry in CIDR form (10.0.0.0/8) admits IP-address Hosts in that network.
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1", "[::1]")
    # A Unix socket path to listen on instead of host:port. `serve --workers N` sets it for
    # each worker (in a private 0700 directory) so that only the parent reaches the workers.
    socket: str = ""
    # The admin token (from token_file): `Authorization: Bearer <token>` lifts the Host check
    # of /budget and /cache/stats, and is what state-changing routes (cache purge) need when
    # admin.host is not loopback; without it those routes are off there.
    token: Secret = Secret("")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise Invalid("port", f"must be between 0 and 65535, got {self.port}")
        if len(self.socket.encode()) > UNIX_PATH_MAX:
            raise Invalid("socket", f"must be at most {UNIX_PATH_MAX} bytes (a Unix socket path)")
        if not self.host:
            raise Invalid("host", "must not be empty")
        for host in self.allowed_hosts:
            if "/" in host:
                try:
                    ipaddress.ip_network(host, strict=False)
                except ValueError:
                    raise Invalid("allowed_hosts", f"not a network: {host!r}") from None
            elif not host or any(c in host for c in " ,\t@"):
                raise Invalid("allowed_hosts", f"must hold host names, got {host!r}")

    @property
    def exposed(self) -> bool:
        """Whether the admin listener (no authentication) is reachable beyond loopback."""
        return self.enabled and not self.socket and not is_loopback_host(self.host)


def _check_rate(rate: int, burst: int) -> None:
    if rate < 0:
        raise Invalid("rate_per_minute", "must not be negative (0: the mode's default)")
    if burst < 0:
        raise Invalid("burst", "must not be negative (0: rate_per_minute / 20)")
    if rate and burst > rate:
        raise Invalid("burst", f"must not exceed rate_per_minute ({rate}), got {burst}")


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

    def __post_init__(self) -> None:
        _not_negative(self, "max_wait", "queue_size", "window_margin", "retry_after_max")
        if not 0 <= self.reserve < 1:
            raise Invalid("reserve", f"must be at least 0 and below 1, got {self.reserve}")
        _positive(self, "window", "backoff_initial")
        if self.backoff_max < self.backoff_initial:
            raise Invalid("backoff_max", "must be at least backoff_initial")

    @property
    def longest_pause(self) -> float:
        """The cap on a pause Kounta asks for: ``retry_after_max``, else ``backoff_max``."""
        return self.retry_after_max or self.backoff_max


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
class CacheRule:
    """Freshness for responses the upstream gives none: a path glob and three durations."""

    # Glob over the path without ".json" (``*`` also matches "/"), e.g. "/v1/companies/*/sites*".
    path: str = ""
    # Seconds a stored response is served without asking Kounta (0: revalidate every time).
    fresh_for: float = 0.0
    # Seconds past freshness a stored response may still answer when Kounta fails.
    stale_if_error: float = 0.0
    # Seconds past freshness a stored response answers at once while it is refreshed.
    stale_while_revalidate: float = 0.0
    # fresh_for holds only while the account's webhook feed is healthy (docs/webhooks.md);
    # otherwise fallback_fresh_for (0: revalidate every time).
    webhooks: bool = False
    fallback_fresh_for: float = 0.0

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise Invalid("path", f"must be a path glob starting with '/', got {self.path!r}")
        _not_negative(
            self, "fresh_for", "stale_if_error", "stale_while_revalidate", "fallback_fresh_for"
        )
        if self.fallback_fresh_for > self.fresh_for:
            raise Invalid("fallback_fresh_for", "must not exceed fresh_for")


@dataclass(frozen=True)
class CacheSettings:
    """The ETag cache on disk (RFC 9111 private cache per account)."""

    enabled: bool = True
    # Empty: <state_dir>/cache.
    dir: str = ""
    # Bytes on disk at most; the least recently stored entries go first.
    max_size: int = 1024**3
    # Responses with larger bodies stream through uncached.
    max_entry_size: int = 8 * 1024**2
    # Bytes of recently used entries also kept in memory (0: none).
    memory_size: int = 64 * 1024**2
    # Seconds a request waits for another's fetch of the same key before fetching alone.
    coalesce_wait: float = 10.0
    rules: tuple[CacheRule, ...] = ()
    # Seconds past freshness a stored GET may answer when Kounta cannot be reached at all
    # (refused, reset, timed out); not after 5xx/429 answers, and never for responses that
    # say must-revalidate, proxy-revalidate, no-cache or s-maxage. A rule's or the
    # response's own stale-if-error wins where set. 0: off.
    stale_if_error: float = 300.0

    def __post_init__(self) -> None:
        _not_negative(self, "max_size", "max_entry_size", "memory_size", "stale_if_error")
        if self.max_entry_size > self.max_size:
            raise Invalid("max_entry_size", "must not exceed max_size")
        _positive(self, "coalesce_wait")

    def directory(self, state_dir: str) -> Path:
        return Path(self.dir) if self.dir else Path(state_dir) / "cache"


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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise Invalid("port", f"must be between 0 and 65535, got {self.port}")
        if not self.host:
            raise Invalid("host", "must not be empty")
        if not self.path.startswith("/") or self.path.endswith("/") or "?" in self.path:
            raise Invalid("path", f"must start with '/' and not end with one, got {self.path!r}")
        _positive(self, "max_body_size", "event_ttl")
        _not_negative(self, "distrust_for", "verify_every", "check_every")
        if not re.fullmatch(r"[A-Za-z0-9-]+", self.signature_header):
            raise Invalid(
                "signature_header", f"must be a header name, got {self.signature_header!r}"
            )
        if self.address:
            _check_http_url("address", self.address, https_unless_loopback=True)


SharedBackendName = Literal["local", "redis"]
PreviousFormat = Literal["off", "read", "write"]


@dataclass(frozen=True)
class SharedSettings:
    """Where budget and tokens live when several processes front one account (docs/scaling.md)."""

    # local: this process only (no Redis); redis: shared by every replica using the same url
    # and key_prefix.
    backend: SharedBackendName = "local"
    # redis:// or rediss:// (TLS); a password in the URL works, password/password_file is better.
    url: str = "redis://127.0.0.1:6379/0"
    password: Secret = Secret("")
    # Every key starts with this, so several deployments may share one Redis.
    key_prefix: str = "kounta-proxy"
    # Seconds any one Redis call may take (connect included) before Redis counts as away.
    timeout: float = 0.5
    # The replicas expected to share each account; while Redis is away each one sends at most
    # rate / replicas.
    replicas: int = 1
    # Fernet key (32 url-safe base64 bytes) that encrypts tokens at rest in Redis and, through
    # HKDF, authenticates cache records and messages (HMAC-SHA256); required with
    # backend = "redis".
    token_key: Secret = Secret("")
    # While Redis is away, refresh an expired token alone (may spend a rotating refresh token
    # other replicas still hold) instead of answering 503 for the account.
    solo_refresh: bool = False
    # The key before the last rotation: still accepted for reading (tokens, record MACs) while
    # the replicas move to the new token_key; never used for writing.
    token_key_previous: Secret = Secret("")
    # Rolling upgrade from a release without record MACs: "write" writes the previous format
    # and reads both, "read" writes the new one and reads both, "off" reads only the new one.
    previous_format: PreviousFormat = "off"
    # Entries kept (approximately) in the invalidation log (P:events:cache:log), so a replica
    # that missed messages during a short gap replays them instead of purging its store;
    # 0: no log (every gap purges).
    invalidation_log: int = 10000

    def __post_init__(self) -> None:
        _not_negative(self, "invalidation_log")
        scheme = URL(self.url).scheme if self.url else ""
        if self.backend == "redis" and scheme not in ("redis", "rediss", "unix"):
            raise Invalid("url", f"must be a redis://, rediss:// or unix:// URL, got {self.url!r}")
        if not self.key_prefix or any(c.isspace() for c in self.key_prefix):
            raise Invalid("key_prefix", "must be a non-empty word without spaces")
        _positive(self, "timeout")
        if self.replicas < 1:
            raise Invalid("replicas", "must be at least 1")
        # Checked only where it is used: the local backend never reads it.
        redis = self.backend == "redis"
        if redis and not self.token_key:
            raise Invalid(
                "token_key",
                "is required with backend = 'redis' (it encrypts tokens and authenticates "
                "cache records in Redis); make one with `openssl rand -base64 32 | tr '+/' '-_' "
                "> token.key` and set shared.token_key_file",
            )
        for name in ("token_key", "token_key_previous"):
            key = getattr(self, name)
            if redis and key and not _is_fernet_key(key.reveal()):
                raise Invalid(
                    name,
                    "must be a Fernet key: 32 bytes in url-safe base64 (make one with "
                    "`openssl rand -base64 32 | tr '+/' '-_'`)",
                )


def _is_fernet_key(text: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(text.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError):
        return False


@dataclass(frozen=True)
class Settings:
    # Cache, token files and other state live under this directory.
    state_dir: str = "state"
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    log: LogSettings = field(default_factory=LogSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    paging: PagingSettings = field(default_factory=PagingSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    accounts: dict[str, AccountSettings] = field(default_factory=dict)
    default_account: str = ""
    inbound: InboundSettings = field(default_factory=InboundSettings)
    callers: dict[str, CallerSettings] = field(default_factory=dict)
    shared: SharedSettings = field(default_factory=SharedSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)

    def __post_init__(self) -> None:
        if self.default_account and self.default_account not in self.accounts:
            raise Invalid("default_account", f"names no account: {self.default_account!r}")
        _check_callers(self)
        _check_ports(self)
        _check_webhooks(self)
        if self.inbound.key_header.lower() in self.upstream.forwarded:
            raise Invalid(
                "upstream.forward_headers",
                f"must not include the caller key header {self.inbound.key_header}",
            )

    @property
    def account_name(self) -> str:
        """The account used when a caller names none."""
        return self.default_account or next(iter(sorted(self.accounts)), "")


def _check_ports(settings: Settings) -> None:
    admin, server = settings.admin, settings.server
    if admin.enabled and admin.port and admin.port == server.port:
        raise Invalid(
            "admin.port",
            f"is the same as server.port ({server.port}); the admin listener needs its own port",
        )


def _check_webhooks(settings: Settings) -> None:
    hooks = settings.webhooks
    if not hooks.enabled:
        return
    if not settings.cache.enabled:
        raise Invalid("webhooks.enabled", "needs cache.enabled = true (deliveries purge the cache)")
    for name, account in sorted(settings.accounts.items()):
        if not (account.webhook_secret or hooks.secret):
            raise Invalid(
                "webhooks.secret",
                f"is required when webhooks are enabled (account {name!r} has no "
                "webhook_secret); set webhooks.secret_file or accounts.NAME.webhook_secret_file",
            )
        key = hooks.signature_key or account.client_secret
        if hooks.signature == "hmac-sha256" and not key:
            raise Invalid(
                "webhooks.signature_key",
                f"is required with signature = 'hmac-sha256' for account {name!r}, which has "
                "no client_secret",
            )
    taken = {settings.server.port: "server.port"}
    if settings.admin.enabled and not settings.admin.socket:
        taken[settings.admin.port] = "admin.port"
    if hooks.port and hooks.port in taken:
        raise Invalid(
            "webhooks.port",
            f"is the same as {taken[hooks.port]} ({hooks.port}); deliveries need their own "
            "listener",
        )


def _check_callers(settings: Settings) -> None:
    for name in [*settings.accounts, *settings.callers]:
        # Names become file names (token files) and metric labels.
        if not name or name.startswith(".") or not all(c.isalnum() or c in "_.-" for c in name):
            kind = "accounts" if name in settings.accounts else "callers"
            raise Invalid(f"{kind}.{name}", "names may hold only letters, digits, '_', '.', '-'")
    keys: set[str] = set()
    for name, caller in settings.callers.items():
        if caller.account and caller.account not in settings.accounts:
            raise Invalid(f"callers.{name}.account", f"names no account: {caller.account!r}")
        if caller.key.reveal() in keys:
            raise Invalid(f"callers.{name}.key", "is the same as another caller's key")
        keys.add(caller.key.reveal())
    exposed = not is_loopback_host(settings.server.host)
    if exposed and not settings.callers and not settings.inbound.allow_anonymous:
        raise Invalid(
            "inbound.allow_anonymous",
            f"server.host {settings.server.host!r} is reachable beyond loopback and no "
            "[callers.NAME] keys are configured; add caller keys or set allow_anonymous = true",
        )


# --------------------------------------------------------------------------- loading


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the TOML file (``path`` or ``./kounta-proxy.toml`` if present), then env."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(path)
    elif DEFAULT_CONFIG_PATH.is_file():
        raw = read_toml(DEFAULT_CONFIG_PATH)
    variables = merge_env(raw, env)
    problems: list[ConfigError] = []
    settings = build(Settings, raw, "", problems)
    if problems or not isinstance(settings, Settings):
        problems = [_from_variable(p, variables) for p in problems]
        raise ConfigErrors(problems) if len(problems) > 1 else problems[0]
    return settings


# Larger files are refused (a config or secret file is small; /dev/zero is endless).
CONFIG_FILE_LIMIT = 16 * 1024**2
SECRET_FILE_LIMIT = 1024**2


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_regular(path, CONFIG_FILE_LIMIT).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError("", f"cannot read config file {path}: {reason}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path} is not valid TOML: {e}") from None


def merge_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Fold ``KOUNTA_PROXY_A__B=v`` into ``raw["a"]["b"] = "v"`` (typed later); returns each
    folded key's path ("a.b") and the variable that set it."""
    variables: dict[str, str] = {}
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            raise ConfigError(name, "malformed variable name (empty part between '__')")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(name, f"conflicts with the scalar key {part!r}")
            node = child
        node[parts[-1]] = _EnvValue(value)
        variables[".".join(parts)] = name
    return variables


def _from_variable(problem: ConfigError, variables: dict[str, str]) -> ConfigError:
    """A problem with a key an environment variable set, told with the variable's name."""
    names = [name for path, name in variables.items() if f"{path}.".startswith(f"{problem.key}.")]
    if not names:
        return problem
    if not problem.problem.startswith("unknown key"):
        label = f"{', '.join(names)} ({problem.key})"
        return ConfigError(problem.key, problem.problem, label=label)
    hints = [f"did you mean {ENV_PREFIX}{'__'.join(p).upper()}?" for p in map(_meant, names) if p]
    unknown = "unknown setting" + (f" ({hints[0]})" if hints else "")
    return ConfigError(problem.key, unknown, label=", ".join(names))


def _meant(name: str) -> list[str] | None:
    """The setting a variable with a mistaken ``_``/``__`` split names, as path parts, if any."""
    words = [w for w in name[len(ENV_PREFIX) :].lower().split("_") if w]
    return _path_in(Settings, words)


def _path_in(tp: Any, words: list[str]) -> list[str] | None:
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
        fields: dict[str, Any] = {}
        if dataclasses.is_dataclass(tp):
            fields = typing.get_type_hints(tp)
            fields |= {f"{k}_file": str for k, v in fields.items() if v is Secret}
        for i in range(1, len(words) + 1):
            key = "_".join(words[:i])
            inner = fields.get(key) if fields else typing.get_args(tp)[1]
            rest = _path_in(inner, words[i:]) if inner is not None else None
            if rest is not None:
                return [key, *rest]
        return None
    return [] if not words else None


class _EnvValue(str):
    """A string from the environment: converted to the field's type when built."""


class _Broken:
    """What a table with a problem builds to; its parent leaves the key out."""


BROKEN = _Broken()


def build(cls: type[Any], raw: Any, path: str, problems: list[ConfigError] | None = None) -> Any:
    """``cls`` from a raw table. With ``problems``, every problem is recorded there and the
    walk goes on (a broken table builds to :data:`BROKEN`); without, the first is raised."""
    if not isinstance(raw, dict):
        return _problem(problems, ConfigError(path, f"must be a table, got {_kind(raw)}"))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    failed: set[str] = set()  # keys refused here (their field keeps its default)
    broken = False  # a table below is broken: checks across fields could only mislead
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else key
        try:
            name, built = _build_key(hints, names, raw, key, value, key_path, problems)
        except ConfigError as e:
            _problem(problems, e)
            failed.add(key.removesuffix("_file"))
            meant = difflib.get_close_matches(key, [f"{n}_file" for n in names] + [*names], 1, 0.6)
            if meant and meant[0].removesuffix("_file") not in raw:
                failed.add(meant[0].removesuffix("_file"))  # its default stands in: no checks
            continue
        if built is BROKEN:
            broken = True
        else:
            kwargs[name] = built
    if broken:
        return BROKEN
    try:
        made = cls(**kwargs)
    except Invalid as e:
        # With a key refused above, the table's own checks still run (every problem at once,
        # e.g. a misspelt key and a negative fresh_for in one rule); not one about that key.
        if e.key in failed:
            return BROKEN
        return _problem(problems, ConfigError(f"{path}.{e.key}" if path else e.key, e.problem))
    return BROKEN if failed else made


def _problem(problems: list[ConfigError] | None, error: ConfigError) -> _Broken:
    if problems is None:
        raise error
    problems.append(error)
    return BROKEN


def _build_key(
    hints: dict[str, Any],
    names: set[str],
    raw: dict[str, Any],
    key: str,
    value: Any,
    key_path: str,
    problems: list[ConfigError] | None,
) -> tuple[str, Any]:
    if key.endswith("_file") and key[:-5] in names and hints[key[:-5]] is Secret:
        if key[:-5] in raw:
            raise ConfigError(key_path, f"set either {key[:-5]} or {key}, not both")
        return key[:-5], Secret(_read_secret_file(key_path, value), source=str(value))
    if key not in names:
        raise ConfigError(key_path, "unknown key" + _did_you_mean(key, names, hints))
    return key, convert(hints[key], value, key_path, problems)


def _did_you_mean(key: str, names: set[str], hints: dict[str, Any]) -> str:
    known = sorted(names | {f"{n}_file" for n in names if hints[n] is Secret})
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_secret_file(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be a file path")
    try:
        return read_regular(Path(value), SECRET_FILE_LIMIT).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            key, f"cannot read secret file {value}: {getattr(e, 'strerror', None) or e}"
        ) from None


def convert(tp: Any, value: Any, path: str, problems: list[ConfigError] | None = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value == "" and isinstance(value, _EnvValue):
            return None
        return convert(options[0], value, path, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(path, f"must be one of {choices}, got {value!r}")
        return str(value)
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a table, got {_kind(value)}")
        items = {k: convert(value_type, v, f"{path}.{k}", problems) for k, v in value.items()}
        return BROKEN if any(v is BROKEN for v in items.values()) else items
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if isinstance(value, _EnvValue):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(path, f"must be an array, got {_kind(value)}")
        built = tuple(convert(item_type, v, f"{path}[{i}]", problems) for i, v in enumerate(value))
        return BROKEN if any(v is BROKEN for v in built) else built
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type[Any], tp), value, path, problems)
    if tp is Secret:
        return Secret(_scalar(str, value, path))
    if tp in (str, int, float, bool):
        return _scalar(tp, value, path)
    raise ConfigError(path, f"unsupported setting type {tp!r}")  # pragma: no cover


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _scalar(tp: type[Any], value: Any, path: str) -> Any:
    if isinstance(value, _EnvValue):
        return _from_env(tp, str(value), path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not tp:
        raise ConfigError(path, f"must be {_TYPE_NAMES[tp]}, got {_kind(value)}")
    return value


def _from_env(tp: type[Any], text: str, path: str) -> Any:
    if tp is str:
        return text
    if tp is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(path, f"must be true or false, got {text!r}")
    try:
        return tp(text)
    except ValueError:
        raise ConfigError(path, f"must be {_TYPE_NAMES[tp]}, got {text!r}") from None


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _kind(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        dict: "a table",
        list: "an array",
    }.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- showing


def masked(settings: Any, *, files: bool = False) -> Any:
    """The settings as plain data with every secret replaced by a mask. With ``files``, a
    secret read from a file is ``NAME_file = PATH`` instead, so the data loads back the same."""
    if isinstance(settings, Secret):
        if settings and settings.source:
            return f"{MASK} (from {settings.source})"
        return MASK if settings else ""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        data = {}
        for f in dataclasses.fields(settings):
            value = getattr(settings, f.name)
            if files and isinstance(value, Secret) and value and value.source:
                data[f"{f.name}_file"] = value.source
            else:
                data[f.name] = masked(value, files=files)
        return data
    if isinstance(settings, dict):
        return {k: masked(v, files=files) for k, v in settings.items()}
    if isinstance(settings, tuple | list):
        return [masked(v, files=files) for v in settings]
    return settings


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Render :func:`masked` output as TOML (tables after scalars, as TOML requires); a
    setting that is not set (None) is a comment, so the text loads back as the same settings."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in ((_toml_key(k), v) for k, v in data.items()):
        if value is None:
            lines.append(f"# {key}: not set")
        elif isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            tables.extend((f"[{key}]", item) for item in value)
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables:
        if key.startswith("["):
            name = f"{prefix}{key[1:-1]}"
            lines.append(f"\n[[{name}]]")
            lines.append(to_toml(value, f"{name}.").strip("\n"))
        else:
            name = f"{prefix}{key}"
            body = to_toml(value, f"{name}.")
            if not body.lstrip("\n").startswith("["):
                lines.append(f"\n[{name}]")
            if body.strip():
                lines.append(body.rstrip("\n") if body.startswith("\n") else body.strip("\n"))
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON's string escapes are TOML's; TOML also wants DEL escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)
