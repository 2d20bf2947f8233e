"""The auth package's metrics, declared against the injected registry (prometheus client's
``registry=`` idiom): token state, expiry, token requests and their failures, and resends
after a 401. One :class:`AuthMetrics` is made with every other package's group
(:class:`proxy.edge.metrics.PackageMetrics`) and handed to the providers and the auth
layer; the conventions are :mod:`proxy.metrics`'s (``kounta_proxy_`` prefix, base units,
:data:`~proxy.metrics.BUCKETS`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.metrics import BUCKETS

# The label values the counters below are created with at 0 (``increase()`` counts the
# first event only from a series that exists already).
TOKEN_RESULTS = ("ok", "unavailable", "rejected", "adopted")
AUTH_RESEND_OUTCOMES = ("resent", "not_replayable", "refresh_floor")


class AuthMetrics:
    """Credentials: recorded by :mod:`proxy.auth.providers`, :mod:`proxy.auth.endpoint` and
    :mod:`proxy.auth.layer`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.token_state = Gauge(
            "kounta_proxy_token_state",
            "1 for the account's current token state (pending, valid, unavailable, "
            "needs_authorize, rejected, static), 0 for the others.",
            ["account", "state"],
            registry=registry,
        )
        self.token_expires_at = Gauge(
            "kounta_proxy_token_expiry_timestamp_seconds",
            "When the account's access token expires (Unix time); 0 when unknown.",
            ["account"],
            registry=registry,
        )
        self.token_refresh_leeway = Gauge(
            "kounta_proxy_token_refresh_leeway_seconds",
            "How long before expiry an oauth account's token is refreshed (refresh_leeway).",
            ["account"],
            registry=registry,
        )
        self.token_requests = Counter(
            "kounta_proxy_token_requests",
            "Requests to the token endpoint, by account and result "
            "(ok, unavailable, rejected), plus tokens adopted from the shared file (adopted).",
            ["account", "result"],
            registry=registry,
        )
        self.token_request_duration = Histogram(
            "kounta_proxy_token_request_duration_seconds",
            "Time a token request took.",
            ["account"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.auth_resends = Counter(
            "kounta_proxy_auth_resends",
            "Upstream 401s for an invalid or expired token, by account and outcome "
            "(resent after a refresh, not_replayable when the body could not be sent again, "
            "refresh_floor when the token was younger than auth.refresh_floor).",
            ["account", "outcome"],
            registry=registry,
        )
        self.token_failures = Counter(
            "kounta_proxy_token_failures",
            "Failed token requests by account and cause: dns, connect, tls, timeout, reset "
            "(the token URL could not be used), http_4xx, http_5xx, invalid (no token in a 200).",
            ["account", "kind"],
            registry=registry,
        )

    def renewable_account(self, account: str) -> None:
        """Create an oauth account's token and resend series at 0."""
        for result in TOKEN_RESULTS:
            self.token_requests.labels(account, result)
        self.token_request_duration.labels(account)
        for outcome in AUTH_RESEND_OUTCOMES:
            self.auth_resends.labels(account, outcome)
