"""The flight's scripts (the fetch lock's claim and release, the budget's slot) on the
backend's pipelined connection of plain RESP (:mod:`proxy.shared.piped`,
:mod:`proxy.shared.wire`), on a real redis-server: no redis-py command per call, a script
Redis forgot (``SCRIPT FLUSH``) sent again whole, a stopped Redis failing the calls within
the timeout (degraded, as through redis-py), an error reply refused as redis-py's, a call
its caller gave up keeping its reply's place, and the connection made as the pool makes its
own (password, Unix socket, TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from prometheus_client import CollectorRegistry

from proxy.settings import Secret, SharedSettings
from proxy.shared import SharedUnavailable
from proxy.shared.metrics import SharedMetrics
from proxy.shared.redis_backend import RedisBackend
from tests.redis_server import TOKEN_KEY, RedisServer, free_port, redis_server_path
from tests.replicas import RedisSpace, until


def counting_commands(backend: RedisBackend) -> list[tuple[Any, ...]]:
    """The commands the backend sends through redis-py's client from now on."""
    sent: list[tuple[Any, ...]] = []
    execute = backend.client.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        sent.append(args)
        return await execute(*args, **options)

    backend.client.execute_command = counted  # type: ignore[method-assign]
    return sent


async def stats(space: RedisSpace, command: str) -> int:
    async with space.client() as raw:
        found = await raw.info("commandstats")
    return int(found.get(f"cmdstat_{command}", {}).get("calls", 0))


async def flight(backend: RedisBackend, i: int) -> None:
    """A flight's calls: the fetch lock claimed, a budget slot taken, the lock let go."""
    claim = await backend.cache_claim("main", f"d{i}", f"owner{i}", 5.0, 1000, peek=8192)
    assert claim.owner == f"owner{i}"
    assert await backend.take("main", 1000, 100, 60.0) == 0.0
    await backend.cache_release("main", f"d{i}", f"owner{i}", b"a note")


async def test_the_flights_scripts_go_on_the_pipelined_connection_not_through_redis_py(
    redis_space: RedisSpace,
) -> None:
    """Twenty flights' claims, budget slots and releases: sixty EVALSHA run by Redis, none
    of them sent through redis-py's client (sixty were before), and no connection per call."""
    async with redis_space.backend() as backend:
        await flight(backend, 100)  # connected, scripts loaded
        sent = counting_commands(backend)
        before = await stats(redis_space, "evalsha")
        await asyncio.gather(*(flight(backend, i) for i in range(20)))
        assert sent == [], f"redis-py sent {len(sent)} commands, first {sent[:1]}"
        assert await stats(redis_space, "evalsha") - before == 60
        assert backend.up
        again = await backend.cache_claim("main", "d3", "other", 5.0, 1000)
        assert again.owner == "other"  # the release arrived


async def test_a_script_redis_forgot_is_sent_again_whole(redis_space: RedisSpace) -> None:
    """After SCRIPT FLUSH each script answers NOSCRIPT once; its call is sent again as EVAL
    and answered (no error, not degraded), and Redis keeps it: the next call is EVALSHA."""
    async with redis_space.backend() as backend, redis_space.client() as raw:
        await flight(backend, 0)
        await raw.script_flush()
        evals = await stats(redis_space, "eval")
        await asyncio.gather(flight(backend, 1), flight(backend, 2))
        assert await stats(redis_space, "eval") - evals >= 3  # claim, take, release once each
        assert backend.up
        evals, shas = await stats(redis_space, "eval"), await stats(redis_space, "evalsha")
        await flight(backend, 3)
        assert await stats(redis_space, "eval") == evals
        assert await stats(redis_space, "evalsha") - shas == 3


async def test_an_error_reply_is_refused_as_before_and_the_others_answered(
    redis_space: RedisSpace,
) -> None:
    """A lock key holding a list: the claim's script fails in Redis (WRONGTYPE): that call is
    refused (SharedUnavailable, the backend still up, counted an error), and the calls
    pipelined beside it get their own replies."""
    registry = CollectorRegistry()
    async with redis_space.backend(registry) as backend, redis_space.client() as raw:
        await raw.rpush(f"{redis_space.prefix}:cache:main:lock:bad", b"x")
        results = await asyncio.gather(
            backend.cache_claim("main", "good1", "o1", 5.0, 1000),
            backend.cache_claim("main", "bad", "o2", 5.0, 1000),
            backend.cache_claim("main", "good2", "o3", 5.0, 1000),
            return_exceptions=True,
        )
        assert [getattr(r, "owner", None) for r in results] == ["o1", None, "o3"]
        assert isinstance(results[1], SharedUnavailable) and "refused" in str(results[1])
        assert backend.up
        labels = {"op": "cache_lock", "result": "error"}
        assert registry.get_sample_value("kounta_proxy_shared_calls_total", labels) == 1.0


async def test_a_claim_its_caller_gave_up_keeps_its_place(own_redis_space: RedisSpace) -> None:
    """Redis paused: a claim, a budget slot and a read wait in the pipeline; the claim's
    caller gives up. Once Redis answers, the slot and the read get their own replies (the
    given-up claim's reply read and dropped); the claim did run, and its lock was let go."""
    async with own_redis_space.backend(timeout=2.0) as backend, own_redis_space.client() as raw:
        assert await backend.cache_put("main", "r1", "/v1/r", b"record", 60, "0")
        assert await backend.cache_get("main", "r1", 100) == b"record"  # connected
        await flight(backend, 0)  # the scripts loaded (a NOSCRIPT given up is not sent again)
        shas = await stats(own_redis_space, "evalsha")
        await raw.execute_command("CLIENT", "PAUSE", 300, "ALL")
        claim = asyncio.ensure_future(backend.cache_claim("main", "d1", "gone", 5.0, 1000))
        slot = asyncio.ensure_future(backend.take("main", 1000, 100, 60.0))
        read = asyncio.ensure_future(backend.cache_get("main", "r1", 100))
        await asyncio.sleep(0.05)
        claim.cancel()
        assert await asyncio.wait_for(slot, 2.0) == 0.0
        assert await asyncio.wait_for(read, 2.0) == b"record"
        assert claim.cancelled()
        assert backend.up
        # The given-up claim ran, and was let go after it (not held by no one until its TTL).
        assert await raw.get(f"{own_redis_space.prefix}:cache:main:lock:d1") is None
        assert await stats(own_redis_space, "evalsha") - shas == 3  # claim, slot, let go
        later = await backend.cache_claim("main", "d1", "later", 5.0, 1000)
        assert later.owner == "later"


def gone_within(url: str, key: str, seconds: float, *, present: bool = False) -> bool:
    """Whether ``key`` is gone from Redis (with ``present``: is there) within ``seconds``,
    asked by a client of its own (blocking: the caller's event loop does not turn meanwhile)."""
    raw = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + seconds
        while bool(raw.exists(key)) != present:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True
    finally:
        raw.close()


async def test_the_locks_release_is_written_before_the_rest_of_the_loop_turn(
    redis_space: RedisSpace,
) -> None:
    """The fetch lock's release (its note to the waiting replicas goes in the same script)
    reaches Redis from the step that lets go, not at the end of the loop turn: the callbacks
    queued behind it (a flight's wake-up answering its joiners, a millisecond and more) no
    longer hold it back. Before, it was written only after them (here: never within 2 s of
    a callback that keeps the loop busy)."""
    async with redis_space.backend() as backend:
        await flight(backend, 100)  # connected, scripts loaded
        claim = await backend.cache_claim("main", "d1", "owner1", 5.0, 1000)
        assert claim.owner == "owner1"
        lock = f"{redis_space.prefix}:cache:main:lock:d1"
        seen: list[bool] = []
        release = asyncio.ensure_future(backend.cache_release("main", "d1", "owner1", b"note"))
        # The joiners' answers: busy callbacks queued after the release's step.
        asyncio.get_running_loop().call_soon(
            lambda: seen.append(gone_within(redis_space.url, lock, 2.0))
        )
        await release
        assert seen == [True]
        assert backend.up


async def test_the_locks_claim_is_written_before_the_rest_of_the_loop_turn(
    redis_space: RedisSpace,
) -> None:
    """The fetch lock's claim (and the budget's slot behind it) reaches Redis from the step
    that claims, not at the end of the loop turn: the callbacks queued behind it (the
    requests that came with the flight's starter, parked as its joiners) no longer hold back
    the round trip the flight waits on. Before, it was written only after them (here: never
    within the 0.5 s a callback keeps the loop busy)."""
    async with redis_space.backend(timeout=2.0) as backend:
        await flight(backend, 100)  # connected, scripts loaded
        lock = f"{redis_space.prefix}:cache:main:lock:d1"
        seen: list[bool] = []
        claim = asyncio.ensure_future(backend.cache_claim("main", "d1", "owner1", 5.0, 1000))
        # The joiners parked: busy callbacks queued after the claim's step.
        asyncio.get_running_loop().call_soon(
            lambda: seen.append(gone_within(redis_space.url, lock, 0.5, present=True))
        )
        assert (await claim).owner == "owner1"
        assert seen == [True]
        assert backend.up


async def test_a_stopped_redis_fails_the_calls_within_the_timeout(
    redis_proc: RedisServer, redis_prefix: str
) -> None:
    """redis-server stopped (SIGSTOP) with claims and slots in flight: each fails within
    about shared.timeout as SharedUnavailable, the backend degraded (as through redis-py);
    once Redis runs again the backend comes back and the next flight works."""
    space = RedisSpace(redis_proc, redis_prefix)
    assert redis_proc.proc is not None
    async with space.backend(timeout=0.3) as backend:
        await flight(backend, 0)
        os.kill(redis_proc.proc.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            calls: list[Awaitable[Any]] = [
                backend.cache_claim("main", "d1", "o1", 5.0, 1000),
                backend.take("main", 1000, 100, 60.0),
                backend.cache_release("main", "d0", "owner0"),
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, SharedUnavailable) for r in results), results
            assert time.monotonic() - began < 1.0  # shared.timeout (0.3 s) and a little
            assert not backend.up
        finally:
            os.kill(redis_proc.proc.pid, signal.SIGCONT)
        await until(lambda: backend.up, within=5.0, what="back up after SIGCONT")
        await flight(backend, 2)


async def calls_work(backend: RedisBackend) -> None:
    await flight(backend, 0)
    assert await backend.cache_put("main", "r", "/v1/r", b"record", 60, "0")
    assert await backend.cache_get("main", "r", 100) == b"record"


async def test_the_calls_work_with_a_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password="s3cret pass")
    server.start()
    try:
        async with RedisSpace(server, "pw").backend(password=Secret("s3cret pass")) as backend:
            assert backend.up
            await calls_work(backend)
    finally:
        server.stop()


async def calls_work_on(args: list[str], url: str, ready: Callable[[], bool]) -> None:
    """A redis-server started with ``args``; once ``ready()``, a backend on ``url`` whose
    flights, puts and reads work."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await until(ready, within=10.0, what="redis-server listening")
        settings = SharedSettings(
            backend="redis", url=url, key_prefix="other", token_key=Secret(TOKEN_KEY)
        )
        backend = RedisBackend(settings, SharedMetrics(CollectorRegistry()))
        await backend.start()
        try:
            await until(lambda: backend.up, within=10.0, what="the backend up")
            await calls_work(backend)
        finally:
            await backend.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 5.0)


async def test_the_calls_work_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    args = [redis_server_path(), "--port", "0", "--unixsocket", str(path), "--dir",
            str(tmp_path), "--save", "", "--appendonly", "no"]  # fmt: skip
    await calls_work_on(args, f"unix://{path}?db=0", path.exists)


async def test_the_calls_work_over_tls(tmp_path: Path) -> None:
    """``rediss://``: the pipelined connection is the pool's TLS connection, taken over."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port()
    args = [redis_server_path(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(tmp_path / "cert.pem"),
            "--tls-key-file", str(tmp_path / "key.pem"),
            "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no",
            "--dir", str(tmp_path), "--save", "", "--appendonly", "no"]  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}"
    await calls_work_on(args, url, lambda: listening(port))


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@pytest.mark.parametrize("op", ["claim", "take"])
async def test_an_argument_redis_cannot_take_is_refused(redis_space: RedisSpace, op: str) -> None:
    """An argument redis-py would not encode (a bool): refused, the connection unharmed."""
    async with redis_space.backend() as backend:
        call: Callable[[], Awaitable[Any]] = (
            (lambda: backend._run("cache_lock", lambda: backend._cache_claim([True], []), None))
            if op == "claim"
            else (lambda: backend._run("budget", lambda: backend._take(["k"], [object()]), None))
        )
        with pytest.raises(SharedUnavailable, match="refused"):
            await call()
        assert backend.up
        await flight(backend, 1)
