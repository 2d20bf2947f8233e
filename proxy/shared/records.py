"""What the replicas share in Redis is untrusted input: format versions and record MACs.

Anything able to write to Redis (a neighbour on its network, a stolen password, a restored
backup) must not be able to make a replica serve a body of its choosing. So cache records and
pub/sub messages travel in an envelope (format 2)::

    b"KPR2" | HMAC-SHA256(mac_key, context + b"\\0" + payload) (32 bytes) | payload

where ``context`` names where the payload belongs (the Redis key of a cache record, the
channel of a message), so a record copied to another key or account does not verify. The
MAC key is derived with HKDF-SHA256 from ``shared.token_key`` (one secret file for tokens and
records); ``shared.token_key_previous`` is accepted for reading while the replicas move to a
new key.

Formats (``shared.previous_format`` decides what is written and read, for rolling upgrades):

- format 1 (the previous release): the payload alone, no MAC;
- format 2 (this release): the envelope above.

``off`` (the default) writes and reads format 2 only; ``read`` writes 2 and still reads 1;
``write`` writes 1 (what replicas of the previous release read) and reads both.

A token record (already Fernet-encrypted and authenticated) is checked for shape before it is
decrypted: :func:`token_version`.
"""

from __future__ import annotations

import base64
import functools
import hmac
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.compat.hashes import hmac_sha256

MAGIC = b"KPR2"
TAG_SIZE = 32
INFO = b"kounta-proxy shared record mac v2"
# The format written by this release (what ``previous_format = "write"`` steps back from).
FORMAT = 2


# A sealed record and its payload: bytes, or a view of the reply it was read from.
Sealed = TypeVar("Sealed", bytes, memoryview)


class BadRecord(Exception):
    """A record or message read from Redis that fails its checks (malformed, too large, not
    authenticated): never trusted, counted, and treated as absent. The message says what is
    wrong in general terms, never the record's contents."""


def mac_key(token_key: str) -> bytes:
    """The record MAC key derived from a Fernet token key (its 32 decoded bytes)."""
    try:
        secret = base64.urlsafe_b64decode(token_key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        secret = token_key.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO).derive(secret)


@dataclass(frozen=True)
class RecordKeys:
    """The MAC keys: the current one signs and verifies, the previous one only verifies."""

    current: bytes
    previous: bytes | None = None
    # Whether format 1 (no MAC) is written ("write") and read ("write", "read").
    write_previous: bool = False
    read_previous: bool = False

    @classmethod
    def derive(cls, token_key: str, previous: str = "", compat: str = "off") -> RecordKeys:
        return cls(
            mac_key(token_key),
            mac_key(previous) if previous else None,
            write_previous=compat == "write",
            read_previous=compat in ("read", "write"),
        )

    def seal(self, context: bytes, payload: bytes) -> bytes:
        if self.write_previous:
            return payload
        return MAGIC + _tag(self.current, context, payload) + payload

    def unchecked(self, data: bytes) -> bytes:
        """The payload part of a sealed record's first bytes, its MAC NOT checked (it cannot
        be: the rest is not here): only to decide whether to read the record whole, never to
        answer from."""
        if data[: len(MAGIC)] == MAGIC:
            return data[len(MAGIC) + TAG_SIZE :]
        return data if self.read_previous else b""

    def open(self, context: bytes, data: Sealed) -> Sealed:
        """The payload of a sealed record (a view of a view: no copy); raises
        :class:`BadRecord`."""
        return self.opened(context, data)[1]

    def opened(self, context: bytes, data: Sealed) -> tuple[bytes, Sealed]:
        """The verified MAC tag of a sealed record and its payload, as :meth:`open` gives
        it; the tag is empty for a record of format 1 (read with ``read_previous``: no MAC).
        A tag that verified names the payload for this context (HMAC-SHA256): the same tag
        read again, verified again, is the same payload, so what was checked of it once
        may be remembered by tag (:func:`proxy.cache.records.decode`)."""
        if data[: len(MAGIC)] != MAGIC:
            if self.read_previous:
                return b"", data
            raise BadRecord("no record MAC (written without shared.token_key, or forged)")
        tag, payload = data[len(MAGIC) : len(MAGIC) + TAG_SIZE], data[len(MAGIC) + TAG_SIZE :]
        for key in (self.current, self.previous):
            if key is not None and hmac.compare_digest(tag, _tag(key, context, payload)):
                return bytes(tag), payload
        raise BadRecord("the record MAC does not verify (another key, or forged)")


def _tag(key: bytes, context: bytes, payload: bytes | memoryview) -> bytes:
    mac = _keyed(key).copy()  # the key's HMAC state, set up once (OpenSSL's, by name)
    mac.update(context)
    mac.update(b"\0")
    mac.update(payload)
    return mac.digest()  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=8)
def _keyed(key: bytes) -> Any:
    """The key's HMAC-SHA256 state, set up once (:func:`proxy.compat.hashes.hmac_sha256`)."""
    return hmac_sha256(key)


# The largest token record read (a Fernet token of a few hundred bytes in practice).
MAX_TOKEN_RECORD = 64 * 1024
# Token record formats read: absent (the previous release) and 2 (this one).
TOKEN_FORMATS = (None, b"2")


def token_version(found: list[Any]) -> int:
    """The version of a token record read as [version, data, format]; raises BadRecord."""
    version, data, fmt = found
    if not isinstance(version, bytes) or not version.isdigit() or len(version) > 16:
        raise BadRecord("the token record's version is not a positive integer")
    if not isinstance(data, bytes) or not data or len(data) > MAX_TOKEN_RECORD:
        raise BadRecord("the token record's data is missing or too large")
    if fmt not in TOKEN_FORMATS:
        raise BadRecord("the token record is of an unknown format")
    if not 0 < int(version) < 2**53:
        raise BadRecord("the token record's version is out of range")
    return int(version)
