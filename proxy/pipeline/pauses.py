"""What a Kounta 429's headers ask for: how long to pause (:func:`pause_asked`), that pause
cut to the longest the proxy honours (:func:`capped`), and the log line saying so
(:func:`said`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from proxy.dates import retry_after
from proxy.logs import event


def pause_asked(headers: Mapping[str, str], wall_now: float) -> float | None:
    """Seconds Kounta asked us to wait: ``Retry-After`` (seconds or HTTP date), else
    ``X-Ratelimit-Reset`` (epoch seconds, or seconds when small); None when neither says."""
    asked = retry_after(headers.get("Retry-After"), wall_now)
    if asked is not None:
        return asked
    reset = headers.get("X-Ratelimit-Reset", "").strip()
    try:
        value = float(reset)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    # Epoch timestamps are large; a small number is a delay in seconds.
    return value - wall_now if value > 1e9 else value


def capped(asked: float | None, longest: float) -> tuple[float | None, bool]:
    """The pause to honour for what Kounta asked, at most ``longest``; True when cut.

    ``Retry-After`` is the upstream's word, not a command: an account paused for an hour
    (or, as seen, 999999999 s) by one answer is an outage of our own making. Past
    ``longest`` the proxy asks again, and the backoff grows if Kounta still says 429.
    """
    if asked is None or asked <= longest:
        return asked, False
    return longest, True


def said(account: str, seconds: float, asked: float | None, capped_at: float | None) -> None:
    """The ``upstream_rate_limited`` line: the pause, what Kounta asked, and (at warning
    level, so the operator learns Kounta asked for more than we gave) the cap if it cut."""
    fields: dict[str, Any] = {"account": account, "pause": round(seconds, 3)}
    if asked is not None:
        fields["asked"] = round(asked, 3)
    if capped_at is not None:
        fields["capped_at"] = capped_at
        event("upstream_rate_limited", logging.WARNING, **fields, capped=True)
    else:
        event("upstream_rate_limited", **fields)
