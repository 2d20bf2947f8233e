"""Decoder fuzz (hypothesis) for everything read back from a real Redis: token records, budget
records, cache records and pub/sub messages. Never an exception past the decoder (only its
documented "bad record" errors), never a 500 from a bad cache record, and a bad token record is
:class:`~proxy.auth.shared_tokens.TokenStoreError` (the documented 503)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from proxy.auth.shared_tokens import SharedTokenStore, TokenStoreError
from proxy.cache import broadcast
from proxy.cache.invalidation import Purge
from proxy.cache.records import BadRecord, decode, encode
from proxy.cache.store import Stored
from proxy.edge.app import create_app
from proxy.edge.services import SERVICES
from proxy.sandbox import SandboxConfig, create_sandbox_app
from proxy.shared import RedisBackend
from proxy.shared.base import ClassedAsk
from proxy.shared.metrics import SharedMetrics
from proxy.shared.records import BadRecord as BadSharedRecord
from proxy.shared.records import RecordKeys
from tests.conftest import TOKEN, serve
from tests.integration.test_cache import LIST
from tests.redis_server import TOKEN_KEY
from tests.replicas import RedisSpace, caching

T = TypeVar("T")
# Thousands of generated records through paths other tests cover too: not traced by coverage
# (pytest-cov's no_cover), which more than doubles their CPU time.
pytestmark = pytest.mark.no_cover

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEYS = RecordKeys.derive(TOKEN_KEY)

# Byte strings a hostile writer would try for a number field, and anything else.
NUMBERS = st.sampled_from(
    [b"nan", b"-nan", b"inf", b"-inf", b"1e400", b"-1", b"0", b"1.5", b" 1", b"1\n", b"0x10",
     b"9007199254740993", b"99999999999999999999", b"", b"1e308", b"-1e308"]
)  # fmt: skip
FIELD_VALUES = st.one_of(
    NUMBERS,
    st.binary(max_size=40),
    st.integers().map(lambda i: str(i).encode()),
    st.floats().map(lambda f: repr(f).encode()),
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@dataclass
class World:
    """A loop of the test's own (hypothesis drives a sync test), a backend and a raw client."""

    loop: asyncio.AbstractEventLoop
    backend: RedisBackend
    raw: aioredis.Redis
    prefix: str

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)


@pytest.fixture
def world(redis_space: RedisSpace) -> Iterator[World]:
    loop = asyncio.new_event_loop()
    backend = RedisBackend(redis_space.settings(timeout=2.0), SharedMetrics(CollectorRegistry()))
    raw = aioredis.Redis.from_url(redis_space.url)
    loop.run_until_complete(backend.start())
    try:
        yield World(loop, backend, raw, redis_space.prefix)
    finally:
        loop.run_until_complete(backend.close())
        loop.run_until_complete(raw.aclose())
        loop.close()


async def put_hash(raw: aioredis.Redis, key: str, fields: dict[bytes, bytes]) -> None:
    await raw.delete(key)
    if fields:
        await raw.hset(key, mapping=fields)  # type: ignore[arg-type]


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from([b"version", b"data", b"format", b"other"]), FIELD_VALUES, max_size=4
    ),
    good_data=st.booleans(),
)
def test_any_token_record_is_a_token_none_or_a_store_error(
    world: World, fields: dict[bytes, bytes], good_data: bool
) -> None:
    if good_data and b"data" in fields:
        token = {"access_token": "a", "refresh_token": "r", "expires_at": 4102444800.0}
        fields[b"data"] = Fernet(TOKEN_KEY.encode()).encrypt(json.dumps(token).encode())
    key = f"{world.prefix}:token:main"
    world.run(put_hash(world.raw, key, fields))
    store = SharedTokenStore("main", world.backend, world.backend, world.backend.settings)
    try:
        found = world.run(store.fetch())
    except TokenStoreError:
        return  # the documented 503 (or, decrypted but no token, set aside)
    assert found is None or found.access_token == "a"


@FUZZ
@given(payload=JSON)
def test_any_decrypted_token_payload_is_a_sane_token_or_refused(world: World, payload: Any) -> None:
    data = Fernet(TOKEN_KEY.encode()).encrypt(json.dumps(payload).encode())
    key = f"{world.prefix}:token:main"
    world.run(put_hash(world.raw, key, {b"version": b"1", b"data": data}))
    store = SharedTokenStore("main", world.backend, world.backend, world.backend.settings)
    try:
        found = world.run(store.fetch())
    except TokenStoreError:
        return
    assert found is not None
    assert isinstance(found.access_token, str) and isinstance(found.refresh_token, str)
    assert found.expires_at is None or math.isfinite(found.expires_at)
    assert math.isfinite(found.obtained_at)


def test_a_token_key_of_another_type_is_a_store_error(world: World) -> None:
    key = f"{world.prefix}:token:main"
    world.run(world.raw.rpush(key, b"x"))
    store = SharedTokenStore("main", world.backend, world.backend, world.backend.settings)
    with pytest.raises(TokenStoreError, match="malformed"):
        world.run(store.fetch())


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from([b"tat", b"paused", b"format"]), FIELD_VALUES, max_size=3
    ),
    cap=st.sampled_from([1.0, 10.0, 3600.0]),
)
def test_any_budget_record_gives_a_finite_wait_within_the_cap(
    world: World, fields: dict[bytes, bytes], cap: float
) -> None:
    key = f"{world.prefix}:budget:main"
    world.run(world.raw.delete(key + ":log"))  # a fresh window: only the record's own wait
    world.run(put_hash(world.raw, key, fields))
    wait = world.run(world.backend.take("main", 60, 3, 61.0, longest=cap))
    # The pace is one slot a second; a pause counts for at most this replica's cap.
    assert math.isfinite(wait) and 0.0 <= wait <= max(cap, 61.0 / 60) + 0.5, wait
    left = world.run(world.backend.pause("main", 0.5, 60, 3, 61.0))
    assert math.isfinite(left)


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from([b"tat", b"paused", b"format"]), FIELD_VALUES, max_size=3
    ),
    demand=st.dictionaries(
        st.sampled_from([b"v", b"s:interactive", b"s:batch", b"on:batch", b"r:other"]),
        FIELD_VALUES,
        max_size=5,
    ),
    klass=st.sampled_from(["interactive", "standard", "batch"]),
    cap=st.sampled_from([1.0, 10.0, 3600.0]),
)
def test_any_budget_record_gives_a_finite_wait_within_the_cap_with_classes(
    world: World, fields: dict[bytes, bytes], demand: dict[bytes, bytes], klass: str, cap: float
) -> None:
    """The classed script (TAKE_CLASSED) reads the budget record as TAKE does, and its demand
    hash too: damaged fields count as absent, a pause for at most this replica's cap."""
    key = f"{world.prefix}:budget:main"
    world.run(world.raw.delete(key + ":log", key + ":demand"))
    world.run(put_hash(world.raw, key, fields))
    world.run(put_hash(world.raw, key + ":demand", demand))
    mine = [int(k == klass) for k in ("interactive", "standard", "batch")]
    ask = ClassedAsk(klass, (mine[0], mine[1], mine[2]), 0.0, (6.0, 3.0, 1.0), 2.0, longest=cap)
    taken = world.run(world.backend.take_classed("main", 60, 3, 61.0, ask))
    assert math.isfinite(taken.wait) and 0.0 <= taken.wait <= max(cap, 61.0 / 60) + 0.5, taken


ENTRY_FIELDS = [
    "status", "headers", "account", "path", "request_time", "response_time", "initial_age",
    "fresh_for", "stale_if_error", "stale_while_revalidate", "strict", "vary", "size",
]  # fmt: skip


def good_record(key: str) -> bytes:
    from proxy.cache.entry import Entry

    entry = Entry(200, (("ETag", '"1"'),), "main", "/v1/x", 1.0, 2.0, 0.0, 60.0, 0.0, 0.0,
                  False, (("x-a", None),), 3)  # fmt: skip
    return encode(key, Stored(entry, b"abc"))


def replace_header(record: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    size = int.from_bytes(record[5:9], "big")
    header, body = json.loads(record[9 : 9 + size]), record[9 + size :]
    change(header)
    raw = json.dumps(header).encode()
    return record[:5] + len(raw).to_bytes(4, "big") + raw + body


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from([*ENTRY_FIELDS, "crc", "key", "entry"]), value=JSON)
def test_a_cache_record_with_any_field_replaced_decodes_sane_or_is_bad(
    field: str, value: Any
) -> None:
    def change(header: dict[str, Any]) -> None:
        if field in ("crc", "key", "entry"):
            header[field] = value
        else:
            header["entry"][field] = value

    record = replace_header(good_record("k"), change)
    try:
        stored = decode("k", record)
    except BadRecord:
        return
    entry = stored.entry
    assert 100 <= entry.status <= 599
    for number in (entry.fresh_for, entry.initial_age, entry.request_time, entry.response_time):
        assert math.isfinite(number) and number >= 0
    for name, text in entry.headers:
        assert name and ":" not in name and " " not in name
        assert "\r" not in text and "\n" not in text and "\0" not in text


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200), header=st.binary(max_size=200))
def test_any_bytes_are_a_record_or_bad(data: bytes, header: bytes) -> None:
    for record in (data, b"KPC1\n" + len(header).to_bytes(4, "big") + header + data):
        with contextlib.suppress(BadRecord):
            decode("k", record)


@FUZZ
@given(value=st.binary(max_size=300), sealed=st.booleans())
def test_any_value_under_a_cache_key_is_verified_bytes_or_bad(
    world: World, value: bytes, sealed: bool
) -> None:
    name = f"{world.prefix}:cache:main:e:d1"
    data = KEYS.seal(name.encode(), value) if sealed else value
    world.run(world.raw.set(name, data, px=60_000))
    try:
        got = world.run(world.backend.cache_get("main", "d1", 1000))
    except BadSharedRecord:
        assert not sealed or len(value) > 1000 + world.backend.OVERHEAD
        return
    assert sealed and got == value


@dataclass
class Rig:
    world: World
    proxy_url: str
    client: aiohttp.ClientSession
    app: web.Application
    body: bytes
    entry_key: bytes


@pytest.fixture
def rig(world: World, redis_space: RedisSpace, tmp_path: Path) -> Iterator[Rig]:
    """A sandbox, one proxy on the fuzz Redis, a client: all on the world's loop."""
    runners: list[web.AppRunner] = []

    async def up() -> Rig:
        sandbox = create_sandbox_app(
            SandboxConfig(bearer_tokens=(TOKEN,), rate_per_minute_bearer=10**6)
        )
        runner, port = await serve(sandbox)
        runners.append(runner)
        settings_ = caching(
            f"http://127.0.0.1:{port}", tmp_path / "r", redis_space.settings(timeout=0.3)
        )
        app = create_app(settings_, registry=CollectorRegistry())
        runner, port = await serve(app)
        runners.append(runner)
        client = aiohttp.ClientSession()
        url = f"http://127.0.0.1:{port}"
        async with client.get(url + LIST) as r:
            body = await r.read()
        await asyncio.sleep(0.1)
        (name,) = [k async for k in world.raw.scan_iter(match=f"{world.prefix}:cache:main:e:*")]
        return Rig(world, url, client, app, body, name)

    rig = world.run(up())
    try:
        yield rig
    finally:

        async def down() -> None:
            await rig.client.close()
            for runner in reversed(runners):
                await runner.cleanup()

        world.run(down())


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(field=st.sampled_from([*ENTRY_FIELDS, "crc", "key"]), value=JSON)
def test_no_bad_cache_record_ever_makes_a_500(rig: Rig, field: str, value: Any) -> None:
    """Through the proxy's socket: a (correctly sealed) record with any field replaced by any
    JSON value is served as it says when valid, or is a miss answered from upstream."""

    def change(header: dict[str, Any]) -> None:
        if field in ("crc", "key"):
            header[field] = value
        else:
            header["entry"][field] = value

    async def one() -> tuple[int, bytes]:
        raw = rig.world.raw
        record = KEYS.open(rig.entry_key, await raw.get(rig.entry_key))
        await raw.set(rig.entry_key, KEYS.seal(rig.entry_key, replace_header(record, change)))
        await rig.app[SERVICES].store.purge("", None)  # the next look goes to Redis
        async with rig.client.get(rig.proxy_url + LIST) as r:
            got = await r.read()
            return r.status, got

    status, got = rig.world.run(asyncio.wait_for(one(), 10))
    assert status != 500 and 100 <= status <= 599, (status, got)
    # Put the good record back for the next example.
    rig.world.run(rig.app[SERVICES].store.purge("", None))
    rig.world.run(rig.world.raw.delete(rig.entry_key))

    async def refill() -> None:
        async with rig.client.get(rig.proxy_url + LIST) as r:
            assert await r.read() == rig.body
        await asyncio.sleep(0.02)

    rig.world.run(refill())


MESSAGES = st.one_of(
    st.binary(max_size=100),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=100_000).map(lambda n: b"[" * n + b"]" * n),
    st.fixed_dictionaries({"account": JSON, "paths": JSON, "lists_of": JSON}).map(
        lambda d: json.dumps(d).encode()
    ),
    st.fixed_dictionaries({"purge": JSON, "account": JSON}).map(lambda d: json.dumps(d).encode()),
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=st.lists(st.tuples(MESSAGES, st.booleans()), min_size=1, max_size=20))
def test_no_message_stops_the_listener(world: World, messages: list[tuple[bytes, bool]]) -> None:
    """Signed or not, any message is applied, or dropped (the MAC, or the decoder's
    BadMessage) and counted; the listener goes on and takes the next good message."""
    channel = f"{world.prefix}:events:fuzz"
    sentinel = broadcast.encode(Purge("/v1/sentinel", "main"))
    seen: list[object] = []

    def received(data: bytes) -> None:  # as Broadcast.received: a bad message is dropped
        try:
            seen.append(broadcast.decode(data))
        except broadcast.BadMessage:
            seen.append(None)

    async def run() -> None:
        listener = RedisBackend(world.backend.settings, SharedMetrics(CollectorRegistry()))
        await listener.start()
        try:
            listener.listen("fuzz", received, lambda: None)
            await asyncio.sleep(0.2)
            await publish_all()
        finally:
            await listener.close()

    async def publish_all() -> None:
        for payload, signed in messages:
            message = b"fuzzer|" + payload
            data = KEYS.seal(channel.encode(), message) if signed else message
            await world.raw.publish(channel, data)
        await world.raw.publish(channel, KEYS.seal(channel.encode(), b"fuzzer|" + sentinel))
        for _ in range(100):
            if Purge("/v1/sentinel", "main") in seen:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the listener stopped")

    world.run(run())
