"""All mutable sandbox state and the test controls over it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from aiohttp import web

from .config import SandboxConfig
from .faults import Fault, FaultSet
from .ratelimit import SlidingWindowLimiter
from .store import Store, normalise_kind


class SandboxState:
    def __init__(
        self, config: SandboxConfig | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config or SandboxConfig()
        # Epoch seconds; used for token expiry and the rate-limit window. Tests may replace it.
        self.clock = clock
        self.store = Store(self.config)
        self.tokens: dict[str, float | None] = dict.fromkeys(self.config.bearer_tokens)
        self.limiter = SlidingWindowLimiter(self.config.rate_window)
        # Issued access token -> the OAuth client it was issued to: the rate limit is per client,
        # so a refreshed token does not start a fresh window.
        self.token_clients: dict[str, str] = {}
        self.faults = FaultSet()
        # Exact paths that skip auth and rate limiting (e.g. an OAuth token endpoint).
        self.public_paths: set[str] = set()
        self._served: Counter[tuple[str, str]] = Counter()
        self._statuses: Counter[int] = Counter()

    # --- counters -------------------------------------------------------------------------

    def record_request(self, method: str, path: str) -> None:
        self._served[(method, path)] += 1

    def record_status(self, status: int) -> None:
        self._statuses[status] += 1

    def served(self, method: str | None = None, path: str | None = None) -> int:
        return sum(
            n
            for (m, p), n in self._served.items()
            if (method is None or m == method.upper()) and (path is None or p == path)
        )

    def not_modified(self) -> int:
        return self._statuses[304]

    def statuses(self) -> dict[int, int]:
        return dict(self._statuses)

    def served_by_path(self) -> dict[str, int]:
        return {f"{m} {p}": n for (m, p), n in sorted(self._served.items())}

    def reset_counters(self) -> None:
        self._served.clear()
        self._statuses.clear()

    def reset(self, data: bool = False) -> None:
        """Counters, faults and rate-limit windows; with data=True also re-seed the records."""
        self.reset_counters()
        self.clear_faults()
        self.limiter.reset()
        if data:
            self.store = Store(self.config)

    # --- faults ---------------------------------------------------------------------------

    def inject_latency(
        self, seconds: float, count: int | None = None, path_prefix: str = "/"
    ) -> None:
        if seconds < 0:
            raise ValueError("latency must not be negative")
        self.faults.add(Fault("latency", count, path_prefix, seconds=seconds))

    def inject_status(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "text/plain",
        count: int | None = 1,
        path_prefix: str = "/",
        headers: dict[str, str] | None = None,
    ) -> None:
        if not 200 <= status <= 599:
            raise ValueError("status must be between 200 and 599")
        self.faults.add(
            Fault(
                "status",
                count,
                path_prefix,
                status=status,
                body=body,
                content_type=content_type,
                headers=dict(headers or {}),
            )
        )

    def inject_drop(self, count: int | None = 1, path_prefix: str = "/") -> None:
        self.faults.add(Fault("drop", count, path_prefix))

    def clear_faults(self) -> None:
        self.faults.clear()

    # --- tokens and data ------------------------------------------------------------------

    def add_bearer_token(
        self, token: str, expires_at: float | None = None, client: str | None = None
    ) -> None:
        self.tokens[token] = expires_at
        if client is not None:
            self.token_clients[token] = client

    def rate_key(self, principal: str) -> str:
        """The rate-limit key: the OAuth client for issued tokens, else the principal."""
        kind, _, credential = principal.partition(":")
        client = self.token_clients.get(credential) if kind == "bearer" else None
        return f"client:{client}" if client else principal

    def revoke_bearer_token(self, token: str) -> None:
        self.tokens.pop(token, None)

    def touch(self, kind: str, id: int) -> None:
        self.store.touch(normalise_kind(kind), id)


SANDBOX_STATE = web.AppKey("sandbox_state", SandboxState)
