# ruff: noqa: F811 - the origin fixture of test_fast_tiers.py is imported, then named as a parameter
"""Memory-tier misses answered in the connection's protocol (proxy.edge.looking.Looking): a
fresh entry found on disk or in Redis is answered once its lookup is done, with no aiohttp
request object or handler task, and the bytes the long way sends; anything else is handed
to the long way, which goes on from what was found (one lookup a request).

Raw sockets to real proxies (a real redis-server for the Redis tier); the requests that
reached the request handler are counted (tests/integration/test_fast_protocol.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.cache.memory import Stored
from proxy.edge.services import SERVICES
from tests.conftest import MakeProxy
from tests.integration.test_fast_protocol import Handlers, answer, ask, connect, field, steady
from tests.integration.test_fast_tiers import (
    FRESH,
    SLOW,
    STALE,
    Origin,
    disk_only,
    origin,  # noqa: F401 (a fixture)
    sample,
    settings_for,
)
from tests.integration.test_shared_entries import shared_op
from tests.redis_server import RedisServer

PRAGMA = "".join(f"{k}: {v}\r\n" for k, v in SLOW.items())


async def test_a_fresh_disk_hit_is_answered_in_the_protocol_with_the_long_ways_bytes(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Any
) -> None:
    p, long_way, looks = await disk_only(make_proxy, origin, tmp_path)
    handlers = Handlers(p)
    reader, writer = await connect(p)
    writer.write(ask("m", path=FRESH))
    assert field(await answer(reader), b"X-Cache") == b"MISS"
    assert handlers.count == 1
    writer.write(ask("d1", path=FRESH))
    fast = await answer(reader)
    assert handlers.count == 1  # no handler task: answered in the protocol
    writer.write(ask("d2", PRAGMA, path=FRESH))
    slow = await answer(reader)
    assert handlers.count == 2
    assert fast.startswith(b"HTTP/1.1 200 OK\r\n") and field(fast, b"X-Cache") == b"HIT"
    assert steady(fast) == steady(slow)  # the same bytes, headers in the same order
    # Pipelined in one write: two disk hits (the second held back while the first looks),
    # a stale entry (handed to the long way, which goes on from the lookup), a disk hit.
    writer.write(ask("d3", path=FRESH) + ask("d4", path=FRESH) + ask("s1", path=STALE))
    writer.write(ask("d5", path=FRESH))
    got = [await answer(reader) for _ in range(4)]
    assert [field(a, b"X-Request-ID") for a in got] == [b"d3", b"d4", b"s1", b"d5"]
    assert [field(a, b"X-Cache") for a in got] == [b"HIT", b"HIT", b"MISS", b"HIT"]
    assert steady(got[0]) == steady(got[1]) == steady(fast)
    # s1 the long way (from its lookup), d5 queued behind it in order: the handler's fast
    # path looked it up and answered it
    assert (handlers.count, long_way.count) == (4, 3)
    assert looks.count == 7  # one lookup a request, whichever way it went
    assert sample(p, "kounta_proxy_requests_in_flight") == 0
    writer.close()


async def test_a_fresh_redis_hit_is_answered_in_the_protocol(
    make_proxy: MakeProxy,
    origin: Origin,
    tmp_path: Any,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    url = redis_server.url
    a, b = [
        await make_proxy(
            settings_for(origin.url, tmp_path, f"r{i}", url, redis_prefix, memory_size=0),
            registry=CollectorRegistry(),
        )
        for i in range(2)
    ]
    reader, writer = await connect(a)
    writer.write(ask("m", path=FRESH))
    missed = await answer(reader)
    assert field(missed, b"X-Cache") == b"MISS"
    writer.close()
    for _ in range(100):  # the store in Redis follows the answer
        if shared_op(a, "put", "ok"):
            break
        await asyncio.sleep(0.01)
    handlers = Handlers(b)
    reader, writer = await connect(b)
    writer.write(ask("r1", path=FRESH) + ask("r2", path=FRESH))
    got = [await answer(reader) for _ in range(2)]
    assert handlers.count == 0  # both answered in the protocol, one after the other
    assert shared_op(b, "get", "hit") == 2  # b holds nothing: each a Redis hit
    writer.write(ask("r3", PRAGMA, path=FRESH))
    slow = await answer(reader)
    assert handlers.count == 1
    assert [field(a, b"X-Request-ID") for a in got] == [b"r1", b"r2"]
    assert steady(got[0]) == steady(got[1]) == steady(slow)
    assert got[0].endswith(missed[missed.index(b"\r\n\r\n") :])  # the stored body
    assert origin.served == [(FRESH, "-")]
    assert sample(b, "kounta_proxy_requests_in_flight") == 0
    writer.close()


async def test_a_tier_lookup_that_fails_leaves_the_answer_to_the_long_way(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    p, long_way, _ = await disk_only(make_proxy, origin, tmp_path)
    reader, writer = await connect(p)
    writer.write(ask("m", path=FRESH))
    assert field(await answer(reader), b"X-Cache") == b"MISS"
    entries = p.app[SERVICES].cache.entries  # type: ignore[union-attr]
    real = entries.lookup
    failed = []

    async def failing(account: str, key: str) -> Stored | None:
        if not failed:
            failed.append(key)
            raise RuntimeError("a bug")
        return await real(account, key)

    entries.lookup = failing
    caplog.set_level(logging.ERROR, logger="kounta_proxy")
    writer.write(ask("f1", path=FRESH))
    got = await answer(reader)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and field(got, b"X-Request-ID") == b"f1"
    assert field(got, b"X-Cache") == b"HIT"  # the long way looked again, and found it
    assert failed and long_way.count == 2
    assert [r.getMessage() for r in caplog.records] == ["fast_path_failed"]
    assert sample(p, "kounta_proxy_requests_in_flight") == 0
    writer.close()


async def test_a_long_pipeline_behind_a_tier_lookup_is_answered_whole_and_in_order(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Any
) -> None:
    """More requests in one write than aiohttp's parser gives at once (its queue limit, 32):
    the parser goes on with what it kept while the first waits in the protocol, and what it
    gives then waits behind the first, in order (it took the first's place before)."""
    p, _, looks = await disk_only(make_proxy, origin, tmp_path)
    reader, writer = await connect(p)
    writer.write(ask("m", path=FRESH))
    assert field(await answer(reader), b"X-Cache") == b"MISS"
    count = 80
    writer.write(b"".join(ask(f"p{n}", path=FRESH) for n in range(count)))
    got = [await answer(reader) for _ in range(count)]
    assert [field(a, b"X-Request-ID") for a in got] == [b"p%d" % n for n in range(count)]
    assert {field(a, b"X-Cache") for a in got} == {b"HIT"}
    assert looks.count == count + 1
    assert sample(p, "kounta_proxy_requests_in_flight") == 0
    writer.close()
