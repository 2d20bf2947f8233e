"""Who is calling, and on which account's behalf.

A caller presents its key in the configured header (``inbound.key_header``, default
``X-Proxy-Key``) or as ``Authorization: Bearer <key>``; each key belongs to one
``[callers.NAME]`` table, whose name is what logs and metrics show. Keys are compared in
constant time, and every configured key is compared, so timing tells nothing about which
one nearly matched.

Anonymous callers (no key) get the default account when that is safe: ``allow_anonymous``
is set, or the proxy listens on loopback with one account or with no caller keys at all.
A key in the key header that matches nobody is always refused; an unknown
``Authorization: Bearer`` value is only refused when a key is required (it may be a caller's
old Kounta token, which the proxy drops anyway).

Rotation: when a reload changes a caller's key (:meth:`Callers.rotated`), the previous key is
still accepted for ``inbound.key_overlap`` seconds beside the new one, so callers can switch
over without a refused request; each use is counted
(``kounta_proxy_caller_retired_key_requests_total``). A caller removed from the settings loses
every key at once: removing is revoking.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from proxy.edge.metrics import EdgeMetrics
from proxy.errors import CallerUnauthorized, InvalidRequest
from proxy.logs import event
from proxy.pipeline.queue import CLASSES, DEFAULT_CLASS, lowered
from proxy.settings import LiveSettings, Secret, Settings, is_loopback_host, live_of

# A request may lower its caller's budget class with this header (never raise it).
PRIORITY_HEADER = "X-Proxy-Priority"


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    account: str
    retired: bool = False  # identified by a previous key, within its overlap
    priority: str = DEFAULT_CLASS  # the caller's budget class ([callers.NAME] priority)

    def priority_of(self, headers: CIMultiDictProxy[str]) -> str:
        """The request's budget class: the caller's, or a lower one that ``X-Proxy-Priority``
        asks for (a higher one is ignored: a caller cannot raise its own class)."""
        values = headers.getall(PRIORITY_HEADER, [])
        if not values:
            return self.priority
        asked = ",".join(values).strip().lower()
        if asked not in CLASSES:
            raise InvalidRequest(
                f"Header {PRIORITY_HEADER} must be one of {', '.join(CLASSES)}",
                code="invalid_priority",
            )
        return lowered(self.priority, asked)


class Callers:
    """Maps an inbound request to a caller and the account it uses."""

    def __init__(
        self,
        settings: Settings,
        metrics: EdgeMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        live: LiveSettings | None = None,
    ) -> None:
        """``settings`` as started; ``live`` the live slice (``[inbound]``, ``[callers]``) of
        a reload, if any."""
        live = live_of(settings) if live is None else live
        self.settings = settings
        self.clock = clock
        self.overlap = live.inbound.key_overlap
        # Previous keys still accepted until a clock time: (key, caller, until).
        self._retired: list[tuple[bytes, Caller, float]] = []
        self.default = Caller("anonymous", settings.account_name)
        self.key_header = live.inbound.key_header
        self._keys = [
            (
                caller.key.reveal().encode(),
                Caller(name, caller.account or settings.account_name, priority=caller.priority),
            )
            for name, caller in sorted(live.callers.items())
        ]
        loopback = is_loopback_host(settings.server.host)
        self.anonymous_ok = live.inbound.allow_anonymous or (
            loopback and (len(settings.accounts) <= 1 or not self._keys)
        )
        self.metrics = metrics

    def identify(self, headers: CIMultiDictProxy[str]) -> Caller:
        """The caller, or :class:`CallerUnauthorized` (counted as a rejection). Answered
        requests are counted per caller with their status when done (Metrics.request_done)."""
        found = self.find(headers)
        if found is not None:
            self.note(found)
            return found
        if self.key_header in headers or _bearer(headers.get("Authorization", "")):
            return self._refuse("unknown", "The caller key is not known")
        return self._refuse(
            "missing", f"A caller key is required in {self.key_header} or Authorization: Bearer"
        )

    def find(self, headers: CIMultiDictProxy[str]) -> Caller | None:
        """The caller, or None when :meth:`identify` refuses; counts nothing."""
        key = headers.get(self.key_header)
        if key is not None:
            return self._match(key)
        bearer = _bearer(headers.get("Authorization", ""))
        found = self._match(bearer) if bearer else None
        if found is None and self.anonymous_ok:
            return self.default
        return found

    def _match(self, key: str) -> Caller | None:
        given = key.strip().encode()
        found = None
        for expected, caller in self._keys:
            if hmac.compare_digest(given, expected):
                found = caller
        if self._retired:
            now = self.clock()
            for expected, caller, until in self._retired:
                if hmac.compare_digest(given, expected) and found is None and now < until:
                    found = caller
        return found

    def note(self, caller: Caller) -> None:
        """Count a request answered for ``caller`` if a previous key identified it."""
        if caller.retired and self.metrics is not None:
            self.metrics.caller_retired_keys.labels(caller.name).inc()

    def rotated(self, live: LiveSettings, metrics: EdgeMetrics | None = None) -> Callers:
        """The callers of a reload's live settings, still accepting for ``key_overlap``
        seconds the previous key of every caller whose key changed (and keys retired
        earlier whose overlap has not ended). A caller that is gone keeps no key."""
        new = Callers(self.settings, metrics, self.clock, live)
        current = {caller.name: key for key, caller in new._keys}
        now = self.clock()
        until = now + new.overlap
        kept = [
            (key, _moved(caller, new), end)
            for key, caller, end in self._retired
            if end > now and caller.name in current and key != current[caller.name]
        ]
        for key, caller in self._keys:
            name = caller.name
            if new.overlap > 0 and name in current and current[name] != key:
                kept.append((key, _moved(caller, new), until))
                event(
                    "caller_key_retired",
                    logging.INFO,
                    caller=name,
                    accepted_for=new.overlap,
                )
        new._retired = kept
        return new

    def _refuse(self, reason: str, description: str) -> Caller:
        if self.metrics is not None:
            self.metrics.caller_rejections.labels(reason).inc()
        raise CallerUnauthorized(description)


def _moved(caller: Caller, new: Callers) -> Caller:
    """The caller as the new settings have it (a reload may have moved it to another account)."""
    for _, found in new._keys:
        if found.name == caller.name:
            return Caller(found.name, found.account, retired=True, priority=found.priority)
    return caller


def _bearer(value: str) -> str:
    scheme, _, credentials = value.strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


class AdminToken:
    """The admin token (``admin.token_file``) and, for ``inbound.key_overlap`` seconds after
    a reload changed it, the previous one too (as a caller's key), so every client of the
    admin routes can switch over without a refused request. A token removed is revoked at
    once. Compared in constant time against both."""

    def __init__(
        self,
        token: Secret,
        clock: Callable[[], float] = time.monotonic,
        previous: tuple[bytes, float] | None = None,
    ) -> None:
        self._token = token.reveal().encode()
        self.clock = clock
        self._previous = previous  # (token, accepted until this clock time)

    def __bool__(self) -> bool:
        return bool(self._token)

    def matches(self, presented: bytes) -> bool:
        current = hmac.compare_digest(presented, self._token) and bool(self._token)
        previous = self._previous
        if previous is None:
            return current
        older = hmac.compare_digest(presented, previous[0])
        return current or (older and self.clock() < previous[1])

    def rotated(self, token: Secret, overlap: float) -> AdminToken:
        """The token of a reload's settings; the running one still accepted for ``overlap``
        seconds if it changed (an earlier previous one until its own end)."""
        new = token.reveal().encode()
        previous = self._previous
        if not new:
            previous = None
        elif new != self._token and self._token:
            if overlap > 0:
                previous = (self._token, self.clock() + overlap)
                event("admin_token_retired", logging.INFO, accepted_for=overlap)
            else:
                previous = None
        return AdminToken(token, self.clock, previous)
