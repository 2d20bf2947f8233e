"""The settings sections: one frozen dataclass per TOML table, and :class:`Settings`, the
whole tree with the checks that span sections.

Every section is a frozen dataclass; the loader (:mod:`proxy.settings.load`) walks the type
hints, so adding a field to a dataclass is all it takes to make a new key configurable from
the file and from the environment. Whether a reload (SIGHUP) applies it is declared in
:mod:`proxy.settings.live`.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from yarl import URL

from proxy.headers import DEFAULT_FORWARDED, NEVER_FORWARDED, REQUIRED_FORWARDED
from proxy.settings.base import (
    Invalid,
    Secret,
    _check_http_url,
    _not_negative,
    _positive,
    is_loopback_host,
)
from proxy.settings.handling import (
    BudgetSettings,
    CallerSettings,
    InboundSettings,
    LogSettings,
    PagingSettings,
    RetrySettings,
)
from proxy.settings.webhooks import WebhookSettings


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
    # Seconds an idle upstream connection is kept for reuse after its last answer. Below the
    # idle timeouts of common servers (Node, Apache, uvicorn: 5 s; nginx 75 s; load balancers
    # 60 s or more), so the proxy closes an idle connection before the upstream does: a POST
    # written to a connection the upstream closes at that moment is lost or applied, and
    # cannot be resent (docs/http-contract.md). 0: a new connection for every request.
    keepalive_timeout: float = 4.0

    def __post_init__(self) -> None:
        _check_http_url("base_url", self.base_url, https_unless_loopback=True)
        _positive(self, "max_inflated_size", "max_inflate_ratio")
        _not_negative(self, "account_pool_size", "keepalive_timeout")
        if not math.isfinite(self.keepalive_timeout):
            raise Invalid(
                "keepalive_timeout", f"must be a number of seconds, got {self.keepalive_timeout}"
            )
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
    # Seconds past freshness it answers at once while the budget is busy; unset: the
    # [cache] stale_while_busy.
    stale_while_busy: float | None = None

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise Invalid("path", f"must be a path glob starting with '/', got {self.path!r}")
        _not_negative(
            self, "fresh_for", "stale_if_error", "stale_while_revalidate", "fallback_fresh_for"
        )
        if self.fallback_fresh_for > self.fresh_for:
            raise Invalid("fallback_fresh_for", "must not exceed fresh_for")
        if self.stale_while_busy is not None and self.stale_while_busy < 0:
            raise Invalid("stale_while_busy", "must not be negative")


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
    # Seconds past freshness a stored GET answers at once (X-Cache: STALE) while the account's
    # budget is busy (a token further off than budget.busy_after), refreshed behind at batch
    # priority; never for must-revalidate, proxy-revalidate, no-cache or s-maxage answers, nor
    # for a caller's no-cache or max-stale=0. 0: off.
    stale_while_busy: float = 0.0

    def __post_init__(self) -> None:
        _not_negative(
            self, "max_size", "max_entry_size", "memory_size", "stale_if_error", "stale_while_busy"
        )
        if self.max_entry_size > self.max_size:
            raise Invalid("max_entry_size", "must not exceed max_size")
        _positive(self, "coalesce_wait")

    def directory(self, state_dir: str) -> Path:
        return Path(self.dir) if self.dir else Path(state_dir) / "cache"


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
