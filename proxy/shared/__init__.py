"""Shared state: what budget and tokens use when several processes front one account.

Two backends share one small interface (:class:`~proxy.shared.base.Backend`):

- ``local`` (the default): this process only, nothing shared, no Redis needed; the budget
  keeps its in-process bucket and tokens their file.
- ``redis``: one connection pool to the Redis at ``shared.url``; the budget asks Redis
  (one Lua script, one round trip) and tokens live there encrypted. Health is tracked: when
  Redis stops answering the backend is *degraded* (budget and tokens fall back to this
  process, the proxy stays ready) and a background probe brings it back.
"""

from __future__ import annotations

from proxy.settings import SharedSettings
from proxy.shared.base import Backend, SharedUnavailable
from proxy.shared.local import LocalBackend
from proxy.shared.metrics import SharedMetrics
from proxy.shared.redis_backend import RedisBackend

__all__ = ["Backend", "LocalBackend", "RedisBackend", "SharedUnavailable", "open_backend"]


def open_backend(settings: SharedSettings, metrics: SharedMetrics) -> Backend:
    """The configured backend, not yet started (``await backend.start()``)."""
    if settings.backend == "redis":
        return RedisBackend(settings, metrics)
    return LocalBackend(metrics)
