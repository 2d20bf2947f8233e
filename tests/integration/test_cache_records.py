"""Cache records and messages in a real Redis are untrusted input: JSON tricks, oversized values
and records or messages without a valid MAC are misses or dropped, deleted and counted; never
served, never a 500, never read whole."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from cryptography.fernet import Fernet

from proxy.edge.services import SERVICES
from proxy.shared.records import RecordKeys
from tests.conftest import Proxy, Sandbox
from tests.integration.test_cache import LIST, get
from tests.integration.test_shared_entries import entry_keys, sample, shared_op
from tests.redis_server import TOKEN_KEY
from tests.replicas import Replicas, until

KEYS = RecordKeys.derive(TOKEN_KEY)


@dataclass
class Pair:
    """Two replicas on one Redis; A fetched LIST, so Redis holds its record under ``name``."""

    a: Proxy
    b: Proxy
    body: bytes
    name: bytes
    prefix: str


@pytest.fixture
async def pair(
    replicas: Replicas,
    sandbox: Sandbox,
    client: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> Pair:
    a, b = await replicas.caching(sandbox.url)
    status, headers, body = await get(client, a.url + LIST)
    assert status == 200, (status, body)
    for _ in range(100):  # the store lands just after the answer
        names = await entry_keys(redis_client, replicas.space.prefix)
        if names:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"no entry in Redis: {headers.get('X-Cache')} {shared_ops(a)}")
    (name,) = names
    return Pair(a, b, body, name, replicas.space.prefix)


def shared_ops(proxy: Proxy) -> dict[str, float]:
    return {
        f"{op}/{result}": shared_op(proxy, op, result)
        for op, result in [("put", "ok"), ("put", "error"), ("put", "invalidated")]
    }


def seal(name: bytes, record: bytes) -> bytes:
    """What a writer holding the key stores (the checks below are past the MAC)."""
    return KEYS.seal(name, record)


def unseal(name: bytes, data: bytes) -> bytes:
    return KEYS.open(name, data)


def rewrite(record: bytes, change: Callable[[dict[str, Any]], bytes]) -> bytes:
    """The record with its JSON header replaced by ``change(header)``."""
    size = int.from_bytes(record[5:9], "big")
    header, body = json.loads(record[9 : 9 + size]), record[9 + size :]
    raw = change(header)
    return record[:5] + len(raw).to_bytes(4, "big") + raw + body


def entry(**fields: Any) -> Callable[[dict[str, Any]], bytes]:
    def change(header: dict[str, Any]) -> bytes:
        header["entry"].update(fields)
        return json.dumps(header).encode()

    return change


def header_line(name: str, value: str) -> Callable[[dict[str, Any]], bytes]:
    def change(header: dict[str, Any]) -> bytes:
        header["entry"]["headers"].append([name, value])
        return json.dumps(header).encode()

    return change


def nested(depth: int) -> Callable[[dict[str, Any]], bytes]:
    def change(header: dict[str, Any]) -> bytes:
        header["entry"]["vary"] = "NESTED"
        text = json.dumps(header)
        return text.replace('"NESTED"', "[" * depth + "]" * depth).encode()

    return change


HOSTILE = {
    "NaN freshness (fresh forever)": entry(fresh_for=float("nan")),
    "infinite freshness": entry(fresh_for=float("inf")),
    "10**400 freshness": entry(fresh_for=10**400),
    "negative age": entry(initial_age=-5.0),
    "status 99": entry(status=99),
    "status 10**30": entry(status=10**30),
    "CR LF in a header value": header_line("X-Evil", "a\r\nSet-Cookie: stolen=1"),
    "a header name with a space": header_line("X Evil", "1"),
    "a header name with a colon": header_line("X:Evil", "1"),
    "deep nesting": nested(100_000),
    "another account": entry(account="other"),
}


@pytest.mark.parametrize("change", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_record_with_json_tricks_is_a_miss_deleted_and_counted(
    pair: Pair,
    sandbox: Sandbox,
    client: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    change: Callable[[dict[str, Any]], bytes],
) -> None:
    b, body, name = pair.b, pair.body, pair.name
    record = unseal(name, await redis_client.get(name))
    await redis_client.set(name, seal(name, rewrite(record, change)), px=60_000)
    status, headers, got = await asyncio.wait_for(get(client, b.url + LIST), 10)
    assert (status, headers["X-Cache"], got) == (200, "MISS", body)  # fetched, not the bad one
    assert "X-Evil" not in headers and "Set-Cookie" not in headers
    assert shared_op(b, "get", "bad_record") == 1
    assert sandbox.state.served("GET", LIST) == 2
    # Deleted: what Redis holds now is B's own fetch, a good record.
    (name,) = await entry_keys(redis_client, pair.prefix)
    assert unseal(name, await redis_client.get(name)) != rewrite(record, change)


async def test_an_oversized_value_is_not_read_at_all(
    pair: Pair,
    client: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    """A value far over cache.max_entry_size under a cache key: its size is checked first
    (STRLEN), so a lookup neither reads it nor times out into degraded mode."""
    b, body, name = pair.b, pair.body, pair.name
    await redis_client.set(name, b"x" * (48 << 20), px=60_000)
    sent = (await redis_client.info("stats"))["total_net_output_bytes"]
    status, headers, got = await get(client, b.url + LIST)
    sent = (await redis_client.info("stats"))["total_net_output_bytes"] - sent
    assert (status, headers["X-Cache"], got) == (200, "MISS", body)
    assert sent < 1 << 20, sent  # the 48 MiB never left Redis
    assert b.app[SERVICES].shared.up  # not degraded by a read past shared.timeout
    assert shared_op(b, "get", "bad_record") == 1
    assert sample(b, "kounta_proxy_shared_bad_records_total", kind="cache") == 1


async def test_a_record_without_a_valid_mac_is_never_served(
    pair: Pair,
    client: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    """Someone able to write Redis but without shared.token_key: a well-formed record with the
    body of their choice (unsigned, or signed with another key) is a miss, deleted, counted."""
    b, body, name = pair.b, pair.body, pair.name
    record = unseal(name, await redis_client.get(name))
    forged_body = b'[{"id": 1, "first_name": "Mallory"}]'
    forged = rewrite(record, entry(size=len(forged_body)))
    size = int.from_bytes(forged[5:9], "big")
    header = json.loads(forged[9 : 9 + size])
    header["crc"] = zlib.crc32(forged_body)
    raw = json.dumps(header).encode()
    forged = forged[:5] + len(raw).to_bytes(4, "big") + raw + forged_body
    other_key = RecordKeys.derive(Fernet.generate_key().decode())
    for attempt, data in enumerate([forged, other_key.seal(name, forged)], start=1):
        await redis_client.set(name, data, px=60_000)
        status, _, got = await get(client, b.url + LIST)
        assert status == 200 and b"Mallory" not in got, got
        assert shared_op(b, "get", "bad_record") == attempt
        await b.app[SERVICES].store.purge("", None)  # the next look goes to Redis again
    assert sample(b, "kounta_proxy_shared_bad_records_total", kind="cache") == 2
    # A good record copied under another Redis key (the MAC names the key) fails too.
    await get(client, b.url + LIST)
    await asyncio.sleep(0.05)
    good = await redis_client.get(name)
    other = name[:-8] + b"00000000"
    await redis_client.set(other, good, px=60_000)
    with pytest.raises(Exception, match="MAC"):
        unseal(other, good)
    assert unseal(name, good)[9:].endswith(body)


async def test_a_forged_invalidation_message_is_dropped_and_counted(
    pair: Pair,
    client: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    """An unsigned purge-everything message on the channel: every replica drops it (its cache
    stays), counts it, and keeps listening: a signed message afterwards still works."""
    b = pair.b
    assert (await get(client, b.url + LIST))[1]["X-Cache"] == "HIT"
    received = sample(b, "kounta_proxy_cache_broadcasts_total", result="received")
    channel = f"{pair.prefix}:events:cache"
    purge = b"intruder|" + json.dumps({"purge": "", "account": None}).encode()
    await redis_client.publish(channel, purge)
    await redis_client.publish(channel, RecordKeys.derive(Fernet.generate_key().decode()).seal(
        channel.encode(), purge))  # fmt: skip
    # Both heard (in order) and neither applied (nor even parsed): dropped and counted.
    await until(lambda: sample(b, "kounta_proxy_shared_bad_records_total", kind="message") >= 2)
    assert sample(b, "kounta_proxy_cache_broadcasts_total", result="received") == received
    assert sample(b, "kounta_proxy_cache_broadcasts_total", result="ignored") == 0
    assert sample(b, "kounta_proxy_shared_bad_records_total", kind="message") == 2
    # The listener is alive: a signed message is applied.
    await redis_client.publish(channel, seal(channel.encode(), purge))
    await until(
        lambda: sample(b, "kounta_proxy_cache_broadcasts_total", result="received") > received
    )
    assert sample(b, "kounta_proxy_cache_broadcasts_total", result="received") == received + 1
