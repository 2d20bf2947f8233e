"""The Redis backend: one connection pool, atomic scripts, health tracked.

Keys (``P`` is ``shared.key_prefix``; only cache entries, fetch locks and the budget's demand
hash have a TTL, so ``maxmemory-policy volatile-lru`` evicts those and never the others)::

    P:budget:ACCOUNT        hash: tat (GCRA theoretical arrival time), paused (until, epoch s),
                            format (1)
    P:budget:ACCOUNT:log    sorted set: one member per send in the last window (score: time)
    P:budget:ACCOUNT:demand hash: each replica's waiting requests by class and the classes'
                            fair-queuing tags; a short TTL (a dead replica's demand expires)
    P:token:ACCOUNT         hash: version (grows with every write), data (Fernet ciphertext),
                            format (2; absent: written by the previous release)
    P:token:ACCOUNT:lock    the refresh lock: an owner token with a TTL (redis-py's Lock)
    P:events:TOPIC          a pub/sub channel (cache invalidations between replicas)
    P:events:TOPIC:log      stream: the channel's messages, the last shared.invalidation_log
                            (approximately), replayed after a gap (proxy.shared.log)
    P:cache:ACCOUNT:e:D     a cache entry (record + body, sealed with its MAC) under D = sha256
                            of its cache key:
                            the only keys with a TTL (the entry's reuse window)
    P:cache:ACCOUNT:lock:D  the fetch lock of one key (owner token, PX = upstream total timeout)
    P:cache:ACCOUNT:lock:D:refresh  its background refresh's claim (the same), queued or out
    P:cache:ACCOUNT:lock:D:waiting  the replicas waiting on the lock (a set, the lock's TTL)
    P:cache:notes:REPLICA   a channel: the notes lock owners leave that replica on letting go
                            (proxy.shared.notes; the cache's calls: proxy.shared.redis_cache)
    P:cache:ACCOUNT:p:S     sorted set: the entries D of one path (S = sha1 of the path), by expiry
    P:cache:ACCOUNT:paths   sorted set: the account's cached paths, by their latest expiry
    P:cache:ACCOUNT:gen     the account's invalidation count (a store begun before one is refused)
    P:epoch                 RUN_ID:RANDOM, named when replicas found the data of this run checked

The path indexes let an invalidation or purge find an account's entries without SCAN (which
walks the whole keyspace); they have no TTL (so eviction never loses them) and are pruned by
expiry on every store, so they hold no more than the live entries.

Every call has a timeout (``shared.timeout``). A call that fails on the connection marks
the backend *degraded*: from then on calls fail fast with :class:`SharedUnavailable` (no
request waits for a dead Redis) until the background probe, once a second, gets a PONG.
Each change of state is one log line and moves the ``kounta_proxy_shared_backend_up`` and
``kounta_proxy_shared_degraded`` gauges.

Times in the scripts come from Redis (``TIME``), so replicas with skewed clocks still agree.

Everything read back is untrusted (:mod:`proxy.shared.records`): a cache record or message
whose MAC does not verify, a cache record larger than the caller's limit (checked with
``STRLEN`` before it is read) and a malformed token record raise
:class:`~proxy.shared.records.BadRecord`, counted in ``kounta_proxy_shared_bad_records_total``.

**Epochs** (:mod:`proxy.shared.epochs`): a restarted, rewound or emptied Redis is a new
epoch; its cache entries are deleted and every replica purges its own before using it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.compat.redispy import fast_writes
from proxy.logs import event
from proxy.settings import SharedSettings
from proxy.shared.base import SharedUnavailable, TokenRecord
from proxy.shared.epochs import Epochs
from proxy.shared.log import Delivered, Log, replayed, split, subscribed
from proxy.shared.metrics import SharedMetrics
from proxy.shared.notes import Notes
from proxy.shared.piped import Script
from proxy.shared.reads import Reads
from proxy.shared.records import BadRecord, RecordKeys, token_version
from proxy.shared.redis_budget import BudgetRecords
from proxy.shared.redis_cache import CacheRecords
from proxy.shared.redis_webhooks import WebhookRecords
from proxy.shared.scripts import (
    CACHE_CLAIM,
    CACHE_DROP,
    CACHE_GET,
    CACHE_PUT,
    CACHE_RELEASE,
    CAS_SCRIPT,
    GIVE_BACK,
    PAUSE,
    SPARE,
    TAKE,
    TAKE_CLASSED,
    TAKE_OWNED,
)
from proxy.shared.wire import Wire

T = TypeVar("T")
# How often the health probe pings (and so how soon a returning Redis is used again).
PROBE_SECONDS = 1.0
# Lock polling while another replica refreshes a token.
LOCK_POLL = 0.05
POOL_SIZE = 64

_CONNECTION_ERRORS = (rexc.ConnectionError, rexc.TimeoutError, TimeoutError, OSError)


class RedisBackend(BudgetRecords, CacheRecords, WebhookRecords):
    kind = "redis"

    def __init__(self, settings: SharedSettings, metrics: SharedMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.prefix = settings.key_prefix
        self.timeout = settings.timeout
        # The probe's own pool: it may talk to a Redis of a new epoch; the data pool may not.
        self.prober = self._connect(2, None)
        self.epochs = Epochs(self.prober, self.prefix, metrics)
        self.client = self._connect(POOL_SIZE, self.epochs.check_connection)
        self._closed = False
        # The hot calls (the Redis tier's reads, the flight's scripts: the budget's slot,
        # the fetch lock's claim and release) on one pipelined connection of plain RESP
        # (proxy.shared.wire); the rest (large writes and reads, tokens, invalidations)
        # through redis-py.
        self.wire = Wire(self.client.connection_pool, settings.timeout)
        self.reads = Reads(self.wire)
        self._take = Script(self.wire, TAKE)
        self._pause = Script(self.wire, PAUSE)
        self._take_classed = Script(self.wire, TAKE_CLASSED)
        self._take_owned = Script(self.wire, TAKE_OWNED)
        self._spare = Script(self.wire, SPARE)
        self._give_back = Script(self.wire, GIVE_BACK)
        self._cache_claim = Script(self.wire, CACHE_CLAIM)
        self._cache_release = Script(self.wire, CACHE_RELEASE)
        self._write_token = self.client.register_script(CAS_SCRIPT)
        self._cache_put = self.client.register_script(CACHE_PUT)
        self._cache_drop = self.client.register_script(CACHE_DROP)
        self._cache_get = self.client.register_script(CACHE_GET)
        self.records = RecordKeys.derive(
            settings.token_key.reveal(),
            settings.token_key_previous.reveal(),
            settings.previous_format,
        )
        self._up = False
        self._state = ""
        self._back_since = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._replica = uuid.uuid4().hex[:12]
        # Notes of other replicas' fetches this one waits on (proxy.shared.notes).
        self.notes = Notes(
            self.client.connection_pool, self.key("cache", "notes", self._replica), self.timeout
        )
        self._sent = 0
        self._listeners: list[asyncio.Task[None]] = []
        self._logs: dict[str, Log] = {}

    def _connect(
        self, size: int, on_connect: Callable[[Any], Awaitable[None]] | None
    ) -> aioredis.Redis:
        settings = self.settings
        client = aioredis.Redis.from_url(
            settings.url,
            password=settings.password.reveal() or None,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            # No resends inside the client: a failure is reported at once and the caller
            # falls back; the probe decides when Redis is back.
            retry=Retry(NoBackoff(), 0),
            max_connections=size,
            redis_connect_func=on_connect,
        )
        fast_writes(client.connection_pool)  # no task per command written (proxy.compat.redispy)
        return client

    @property
    def budget(self) -> RedisBackend:
        return self

    @property
    def tokens(self) -> RedisBackend:
        return self

    @property
    def events(self) -> RedisBackend:
        return self

    @property
    def cache(self) -> RedisBackend:
        return self

    # --- health

    @property
    def up(self) -> bool:
        return self._up

    def detail(self) -> str | None:
        return None if self._up else "degraded"

    @property
    def back_since(self) -> float:
        return self._back_since

    async def start(self) -> None:
        """Connect once (a Redis that is away at startup only means degraded) and probe."""
        await self._check()
        if not self._up:
            self._set_state(False, "no answer at startup")
        self._probe = asyncio.create_task(self._watch(), name="shared-redis-probe")
        self.notes.start()

    async def close(self) -> None:
        # Listeners also stop by this flag: a cancel that lands as get_message's own
        # timeout expires is swallowed (asyncio.timeout on 3.11), and the loop would go on.
        self._closed = True
        await self.notes.close()
        for task in [self._probe, *self._listeners]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.wire.close()
        await self.client.aclose()
        await self.prober.aclose()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            await self._check()

    async def _check(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                run_id, epoch = await self.epochs.read()
            if self.epochs.changed(run_id, epoch):
                # Not under the one timeout: deleting a large cache takes many round trips.
                await self.epochs.begin(run_id, epoch)
        except (*_CONNECTION_ERRORS, rexc.RedisError) as e:
            self._set_state(False, _why(e))
            return
        if self._state == "degraded":
            # Back after a break: Redis may be a new process (a restart, a restore), and the
            # pool's other connections dead. Drop them now rather than fail one call on each.
            with contextlib.suppress(*_CONNECTION_ERRORS, rexc.RedisError):
                await self.client.connection_pool.disconnect()
        self._set_state(True, "answering")

    def _set_state(self, up: bool, reason: str) -> None:
        self._up = up
        self.metrics.shared_backend_up.set(1 if up else 0)
        self.metrics.shared_degraded.set(0 if up else 1)
        state = "shared" if up else "degraded"
        if state != self._state:
            previous, self._state = self._state or "starting", state
            if up and previous == "degraded":
                self._back_since = time.monotonic()
            level = logging.INFO if up else logging.WARNING
            event("shared_backend", level, state=state, previous=previous, reason=reason)

    async def _run(self, op: str, call: Callable[[], Awaitable[T]], limit: float | None = 0.0) -> T:
        """``call()``, counted, within ``limit`` (0: ``shared.timeout``; None: the call keeps
        to it by itself, as the pipelined connection's calls do: :mod:`proxy.shared.wire`)."""
        if not self._up:
            raise SharedUnavailable(f"shared store away ({op})")
        started = time.perf_counter()
        try:
            if limit is None:
                result = await call()
            else:
                async with asyncio.timeout(limit or self.timeout):
                    result = await call()
        except _CONNECTION_ERRORS as e:
            self._failed(op, e)
            raise SharedUnavailable(f"shared store away ({op}: {_why(e)})") from None
        except rexc.RedisError as e:
            self._failed(op, e)
            raise SharedUnavailable(f"shared store refused {op}: {_why(e)}") from None
        finally:
            self.metrics.shared_call_duration.labels(op).observe(time.perf_counter() - started)
        self.metrics.shared_calls.labels(op, "ok").inc()
        return result

    def _run_off(self, op: str, call: Callable[[], Awaitable[Any]]) -> None:
        """``call()`` made now and left to run, its reply counted as :meth:`_run` counts one
        when it comes (a callback on its future: no task, when the pipelined connection is
        up; a call that must connect first gets one). Raises :class:`SharedUnavailable` at
        once when the store is away; later errors are only counted (nobody waits)."""
        if not self._up:
            raise SharedUnavailable(f"shared store away ({op})")
        sent = asyncio.ensure_future(call())
        sent.add_done_callback(functools.partial(self._ran_off, op, time.perf_counter()))

    def _ran_off(self, op: str, started: float, done: asyncio.Future[Any]) -> None:
        self.metrics.shared_call_duration.labels(op).observe(time.perf_counter() - started)
        error = None if done.cancelled() else done.exception()  # retrieved: nobody waits
        if error is None and not done.cancelled():
            self.metrics.shared_calls.labels(op, "ok").inc()
            return
        if not self._closed:  # (closed under it at shutdown: no error, as a cancelled call)
            self._failed(op, error)

    def _failed(self, op: str, error: BaseException | None) -> None:
        """A call that failed, counted; a connection's error marks the store away."""
        if isinstance(error, _CONNECTION_ERRORS):
            self._set_state(False, f"{op}: {_why(error)}")
        self.metrics.shared_calls.labels(op, "error").inc()

    def key(self, kind: str, account: str, suffix: str = "") -> str:
        return f"{self.prefix}:{kind}:{account}{':' + suffix if suffix else ''}"

    # --- tokens

    async def read_token(self, account: str) -> TokenRecord | None:
        """The record, None when there is none; raises :class:`BadRecord` for a malformed one
        (a version that is not a positive integer, no data, too large, an unknown format, a
        key of another type) and :class:`SharedUnavailable`."""
        key = self.key("token", account)

        async def read() -> list[Any] | None:
            try:
                found: list[Any] = await self.client.hmget(key, ["version", "data", "format"])
            except rexc.ResponseError as e:
                if "WRONGTYPE" in str(e):
                    return None  # a key of another type: malformed
                raise
            return found

        found = await self._run("token_read", read)
        if found is None:
            self._bad("token", "the token record is not a hash")
        if found[0] is None and found[1] is None:
            return None
        try:
            return TokenRecord(token_version(found), bytes(found[1]))
        except BadRecord as e:
            self._bad("token", str(e))

    def _bad(self, kind: str, problem: str) -> NoReturn:
        self.metrics.shared_bad_records.labels(kind).inc()
        raise BadRecord(problem)

    async def write_token(
        self, account: str, data: bytes, expected: int, floor: int = 0
    ) -> int | None:
        keys = [self.key("token", account)]
        args: list[Any] = [expected, data, floor]
        version = await self._run("token_write", lambda: self._write_token(keys=keys, args=args))
        return None if int(version) <= 0 else int(version)

    @contextlib.asynccontextmanager
    async def token_lock(self, account: str, ttl: float, patience: float) -> AsyncIterator[bool]:
        """redis-py's Lock: SET NX PX with an owner token; release and extend are Lua scripts
        that act only for the owner, so a lock that expired and was taken by another replica
        is never released by us. A crash leaves it to expire."""
        lock = Lock(
            self.client,
            self.key("token", account, "lock"),
            timeout=ttl,
            sleep=LOCK_POLL,
            blocking_timeout=patience,
            thread_local=False,
        )
        taken = await self._run("token_lock", lock.acquire, limit=patience + self.timeout)
        try:
            yield bool(taken)
        finally:
            if taken:
                with contextlib.suppress(SharedUnavailable, rexc.LockError):
                    await self._run("token_unlock", lock.release)

    # --- events

    def _log(self, topic: str) -> Log:
        """The topic's invalidation log (none while writing the previous release's format)."""
        if topic not in self._logs:
            length = 0 if self.records.write_previous else self.settings.invalidation_log
            channel = self.key("events", topic)
            self._logs[topic] = Log(self.client, channel, length, self.metrics, self.epochs)
        return self._logs[topic]

    async def publish(self, topic: str, data: bytes) -> None:
        channel, log = self.key("events", topic), self._log(topic)
        message = self.records.seal(channel.encode(), self._replica.encode() + b"|" + data)
        await self._run("publish", lambda: log.publish(message))

    def _opened(self, channel: str, data: bytes) -> bytes | None:
        """A message's ``replica|payload``, or None (dropped and counted) when its MAC does
        not verify."""
        try:
            return self.records.open(channel.encode(), data)
        except BadRecord as e:
            self.metrics.shared_bad_records.labels("message").inc()
            event("shared_message_dropped", logging.WARNING, channel=channel, problem=str(e))
            return None

    def listen(
        self, topic: str, on_message: Callable[[bytes], None], on_gap: Callable[[], None]
    ) -> None:
        task = asyncio.create_task(self._listen(topic, on_message, on_gap), name=f"listen-{topic}")
        self._listeners.append(task)
        # A new epoch is a gap too, and one that always purges.
        self.epochs.gaps.append(functools.partial(self._log(topic).new_epoch, on_gap))

    def _deliver(self, log: Log, delivered: Delivered, on_message: Callable[[bytes], None]) -> None:
        """A message heard or replayed: its MAC checked (one place for both), the log's
        cursor moved, and handed on unless this replica sent it."""
        opened = self._opened(log.channel, delivered.body)
        if opened is None:
            return  # dropped and counted; nothing was missed for it
        log.cursor.heard(delivered)
        sender, _, data = opened.partition(b"|")
        if sender != self._replica.encode():
            on_message(data)

    async def _listen(
        self, topic: str, on_message: Callable[[bytes], None], on_gap: Callable[[], None]
    ) -> None:
        """Subscribe, deliver, and after any break subscribe again and report the gap."""
        channel, log = self.key("events", topic), self._log(topic)
        lost = False
        while not self._closed:
            pubsub = self.client.pubsub()
            try:
                async with asyncio.timeout(self.timeout):
                    await subscribed(pubsub, channel)
                # What a gap missed, from the log (None: unknown, purge); each call has the
                # socket's timeout, and the log's length bounds the pages.
                missed = await log.resume(after_gap=lost)
                if lost:
                    lost = False
                    event("shared_resubscribed", topic=topic, replayed=replayed(missed))
                    for entry in missed or ():
                        self._deliver(log, entry, on_message)
                    if missed is None:
                        on_gap()
                while not self._closed:
                    message = await pubsub.get_message(timeout=PROBE_SECONDS)
                    kind = message.get("type") if message else None
                    data = message.get("data") if message else None
                    if kind == "message" and isinstance(data, bytes):
                        self._deliver(log, split(data), on_message)
            except (*_CONNECTION_ERRORS, rexc.RedisError) as e:
                if not lost:
                    event("shared_unsubscribed", logging.WARNING, topic=topic, reason=_why(e))
                lost = True
            except Exception as e:  # supervised: whatever it was, listen again
                # Nothing may stop the listener for good (a replica that stops hearing
                # invalidations serves old entries): log, count, listen again, report a gap.
                event("shared_listener_failed", logging.ERROR, topic=topic, error=_why(e))
                self.metrics.shared_listener_restarts.labels(topic).inc()
                # What killed it may kill a replay too: this gap purges.
                log.cursor.forget()
                lost = True
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(PROBE_SECONDS / 2)


def _why(error: BaseException) -> str:
    text = str(error).split("\n")[0][:120]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
