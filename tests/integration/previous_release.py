"""The previous release's record writers and readers (main 1ab7810), kept as fixture code so
the rolling-upgrade tests can run them against this release's readers and writers. Copied as
they were; never imported by the proxy. Remove a piece when its format is no longer read."""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict
from typing import Any

from cryptography.fernet import Fernet

from proxy.auth.token_file import StoredToken, parse_token
from proxy.cache.entry import Entry
from proxy.cache.store import Stored

MAGIC = b"KPC1\n"

# proxy/shared/redis_backend.py: the token record's compare-and-set.
CAS_SCRIPT = """
local v = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if v ~= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'version', v + 1, 'data', ARGV[2])
return v + 1
"""

# proxy/shared/redis_backend.py: a send slot (GCRA + sliding log; no cap on a pause read).
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local per_window = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local interval = period / per_window
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or now)
local paused = tonumber(redis.call('HGET', KEYS[1], 'paused') or 0)
if tat < now then tat = now end
local wait = tat - (burst - 1) * interval - now
if paused - now > wait then wait = paused - now end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - period)
local count = redis.call('ZCARD', KEYS[2])
if count >= per_window then
  local oldest = redis.call('ZRANGE', KEYS[2], count - per_window, count - per_window, 'WITHSCORES')
  local free_at = tonumber(oldest[2]) + period
  if free_at - now > wait then wait = free_at - now end
end
if wait > 0 then return {0, tostring(wait)} end
redis.call('HSET', KEYS[1], 'tat', tostring(tat + interval))
redis.call('ZADD', KEYS[2], now, ARGV[4])
return {1, '0'}
"""

# proxy/shared/redis_backend.py: a Kounta 429 shared (no format field, no cap on reading).
PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local paused = tonumber(redis.call('HGET', KEYS[1], 'paused') or 0)
local until_ = now + tonumber(ARGV[1])
if paused > until_ then until_ = paused end
redis.call('HSET', KEYS[1], 'paused', tostring(until_))
local interval = tonumber(ARGV[4]) / tonumber(ARGV[2])
local tat = until_ + (tonumber(ARGV[3]) - 1) * interval
local old = tonumber(redis.call('HGET', KEYS[1], 'tat') or 0)
if tat > old then redis.call('HSET', KEYS[1], 'tat', tostring(tat)) end
return tostring(until_ - now)
"""


# proxy/auth/shared_tokens.py: the record's encryption.
def encrypt_token(key: str, token: StoredToken) -> bytes:
    return Fernet(key.encode("ascii")).encrypt(json.dumps(asdict(token)).encode())


def decrypt_token(key: str, data: bytes) -> StoredToken:
    return parse_token(json.loads(Fernet(key.encode("ascii")).decrypt(data)))


# proxy/shared/redis_backend.py: read_token.
def token_version(found: list[Any]) -> int:
    version, _data = found
    return int(version)


# proxy/shared/redis_backend.py: publish, and what _listen hands on.
def message(replica: str, data: bytes) -> bytes:
    return replica.encode() + b"|" + data


def received(own: str, data: bytes) -> bytes | None:
    return None if data.startswith(own.encode() + b"|") else data.partition(b"|")[2]


# proxy/cache/broadcast.py: an invalidation.
def invalidation(account: str, paths: list[str], lists_of: list[str]) -> bytes:
    body = {"account": account, "paths": sorted(paths), "lists_of": sorted(lists_of)}
    return json.dumps(body, separators=(",", ":")).encode()


# proxy/cache/redis_records.py (now proxy/cache/records.py): the cache record codec.
def encode(key: str, stored: Stored) -> bytes:
    """One record: magic, 4-byte header length, JSON header, body (must be in memory)."""
    assert stored.body is not None
    entry = stored.entry
    header = {
        "key": key,
        "crc": zlib.crc32(stored.body),
        "entry": {
            "status": entry.status,
            "headers": [list(h) for h in entry.headers],
            "account": entry.account,
            "path": entry.path,
            "request_time": entry.request_time,
            "response_time": entry.response_time,
            "initial_age": entry.initial_age,
            "fresh_for": entry.fresh_for,
            "stale_if_error": entry.stale_if_error,
            "stale_while_revalidate": entry.stale_while_revalidate,
            "strict": entry.strict,
            "vary": [list(v) for v in entry.vary],
            "size": entry.size,
        },
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + len(raw).to_bytes(4, "big") + raw + stored.body


class BadRecord(ValueError):
    """A shared record that is not an intact entry for the key asked for."""


def decode(key: str, data: bytes) -> Stored:
    """The entry and body of a record for ``key``; raises :class:`BadRecord`."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise BadRecord("not a cache record")
    start = len(MAGIC) + 4
    end = start + int.from_bytes(data[len(MAGIC) : start], "big")
    try:
        header = json.loads(data[start:end])
        fields = header["entry"]
        entry = Entry(
            status=_typed(fields["status"], int),
            headers=tuple((_str(n), _str(v)) for n, v in fields["headers"]),
            account=_str(fields["account"]),
            path=_str(fields["path"]),
            request_time=_number(fields["request_time"]),
            response_time=_number(fields["response_time"]),
            initial_age=_number(fields["initial_age"]),
            fresh_for=_number(fields["fresh_for"]),
            stale_if_error=_number(fields["stale_if_error"]),
            stale_while_revalidate=_number(fields["stale_while_revalidate"]),
            strict=_typed(fields["strict"], bool),
            vary=tuple((_str(n), None if v is None else _str(v)) for n, v in fields["vary"]),
            size=_typed(fields["size"], int),
        )
        crc = _typed(header["crc"], int)
        owner = header["key"]
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise BadRecord(f"a damaged record ({type(e).__name__})") from None
    if owner != key:
        raise BadRecord("a record of another key")
    body = data[end:]
    if len(body) != entry.size or zlib.crc32(body) != crc:
        raise BadRecord("a body of the wrong size or CRC32")
    return Stored(entry, body, None, crc)


def _typed(value: Any, kind: type[Any]) -> Any:
    if type(value) is not kind:
        raise TypeError(f"{kind.__name__} expected")
    return value


def _str(value: Any) -> str:
    return str(_typed(value, str))


def _number(value: Any) -> float:
    if type(value) not in (int, float):
        raise TypeError("number expected")
    return float(value)
