"""Every touch of the standard library's private parts: :mod:`hmac`'s OpenSSL state.

:func:`hmac_sha256` gives a key's HMAC-SHA256 state as OpenSSL's own object (``HMAC._hmac``)
where :mod:`hmac` wraps one: it has the same ``copy``, ``update`` and ``digest`` as the
wrapper, without the wrapper's Python calls (~0.7 µs a Redis record MAC,
:mod:`proxy.shared.records`). Where it is missing (another Python, no OpenSSL HMAC) the
wrapper itself is given: the same digests, a little slower.

:data:`PINS` lists the assumptions; ``tests/unit/test_compat.py`` checks each and names
:data:`WRITTEN_AGAINST` (the Python minor version) when one fails after an upgrade.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

WRITTEN_AGAINST = "3.11"


def hmac_sha256(key: bytes) -> Any:
    """``key``'s HMAC-SHA256 state: an object with ``copy()``, ``update()``, ``digest()``."""
    mac = hmac.new(key, digestmod="sha256")
    return getattr(mac, "_hmac", None) or mac


def _same_digest() -> bool:
    state = getattr(hmac.new(b"key", digestmod="sha256"), "_hmac").copy()  # noqa: B009
    state.update(b"message")
    return bool(state.digest() == hmac.digest(b"key", b"message", "sha256"))


PINS: dict[str, Callable[[], bool]] = {
    "HMAC._hmac: OpenSSL's HMAC state (copy, update, digest), the same digest": _same_digest,
}
