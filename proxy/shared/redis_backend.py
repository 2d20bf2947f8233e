"""The Redis backend: one connection pool, atomic scripts, health tracked.

Keys (``P`` is ``shared.key_prefix``; only cache entries and fetch locks have a TTL, so
``maxmemory-policy volatile-lru`` evicts cache entries and never the others)::

    P:budget:ACCOUNT        hash: tat (GCRA theoretical arrival time), paused (until, epoch s)
    P:budget:ACCOUNT:log    sorted set: one member per send in the last window (score: time)
    P:budget:ACCOUNT:demand hash: each replica's waiting requests by class and the classes'
                            fair-queuing tags; a short TTL (a dead replica's demand expires)
    P:token:ACCOUNT         hash: version (grows by one per write), data (Fernet ciphertext)
    P:token:ACCOUNT:lock    the refresh lock: an owner token with a TTL (redis-py's Lock)
    P:events:TOPIC          a pub/sub channel (cache invalidations between replicas)
    P:cache:ACCOUNT:e:D     a cache entry (record + body) under D = sha256 of its cache key:
                            the only keys with a TTL (the entry's reuse window)
    P:cache:ACCOUNT:lock:D  the fetch lock of one key (owner token, PX = upstream total timeout)
    P:cache:ACCOUNT:p:S     sorted set: the entries D of one path (S = sha1 of the path), by expiry
    P:cache:ACCOUNT:paths   sorted set: the account's cached paths, by their latest expiry
    P:cache:ACCOUNT:gen     the account's invalidation count (a store begun before one is refused)

The path indexes let an invalidation or purge find an account's entries without SCAN (which
walks the whole keyspace); they have no TTL (so eviction never loses them) and are pruned by
expiry on every store, so they hold no more than the live entries.

Every call has a timeout (``shared.timeout``). A call that fails on the connection marks
the backend *degraded*: from then on calls fail fast with :class:`SharedUnavailable` (no
request waits for a dead Redis) until the background probe, once a second, gets a PONG.
Each change of state is one log line and moves the ``kounta_proxy_shared_backend_up`` and
``kounta_proxy_shared_degraded`` gauges.

Times in the scripts come from Redis (``TIME``), so replicas with skewed clocks still agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.logs import event
from proxy.metrics import Metrics
from proxy.settings import SharedSettings
from proxy.shared.base import Claim, ClassedAsk, SharedUnavailable, Taken, TokenRecord

T = TypeVar("T")
# How often the health probe pings (and so how soon a returning Redis is used again).
PROBE_SECONDS = 1.0
# Lock polling while another replica refreshes a token.
LOCK_POLL = 0.05
POOL_SIZE = 64

# GCRA for pace and burst plus a sliding log for the hard cap per window, in one script.
# ARGV: per_window, burst, period (window + margin, seconds), a unique member for the log.
# Returns {1, "0"} when a slot was taken, else {0, "<seconds to wait>"}.
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

# TAKE with budget classes, fleet-wide: each replica registers its waiting requests by class
# in the account's demand hash (one field per replica, "i s b expiry_ms"; the hash has a short
# TTL, refreshed by every call, and an entry past its expiry is dropped: a dead replica's
# demand goes away). When a slot is free, it goes to the class weighted fair queuing picks
# among the classes the fleet has waiting (start tags "s:CLASS", virtual time "v" and "on:CLASS"
# flags, kept in the same hash); a replica asking for another class is told to ask again
# shortly. Batch leaves the reserve (a fraction of the burst and of the window's cap).
# KEYS: budget, log, demand. ARGV: per_window, burst, period, member, replica, class,
# waiting interactive, standard, batch (this replica's, this request included), ttl ms,
# reserve, weight interactive, standard, batch, seconds the oldest waiting request of each
# class has waited (0 for none). Within a class the oldest request in the fleet goes first.
# Returns {taken 1/0, wait seconds, fleet waiting interactive, standard, batch}.
TAKE_CLASSED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_ms = math.floor(now * 1000)
local per_window = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local klass = ARGV[6]
local ttl = tonumber(ARGV[10])
local reserve = 0
if klass == 'batch' then reserve = tonumber(ARGV[11]) end
local classes = {'interactive', 'standard', 'batch'}
local weights = {tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])}
local mine = {tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])}
local heads = {}
for i = 1, 3 do heads[i] = now_ms - math.floor(tonumber(ARGV[14 + i]) * 1000) end
local interval = period / per_window
local function record(counts)
  redis.call('HSET', KEYS[3], 'r:' .. ARGV[5], counts[1] .. ' ' .. counts[2] .. ' '
    .. counts[3] .. ' ' .. heads[1] .. ' ' .. heads[2] .. ' ' .. heads[3] .. ' ' .. now_ms
    .. ' ' .. (now_ms + ttl))
  redis.call('PEXPIRE', KEYS[3], ttl)
end
record(mine)
local fleet = {0, 0, 0}
-- The oldest waiting request of each class among replicas heard from lately (FIFO across
-- the fleet within a class); a replica silent for longer may have let its requests go.
local oldest = {math.huge, math.huge, math.huge}
local lately = now_ms - math.floor((2 * interval + 0.1) * 1000)
local fields = redis.call('HGETALL', KEYS[3])
for i = 1, #fields, 2 do
  local name = fields[i]
  if string.sub(name, 1, 2) == 'r:' then
    local r = {}
    for n in string.gmatch(fields[i + 1], '%-?%d+') do r[#r + 1] = tonumber(n) end
    if #r ~= 8 or r[8] < now_ms then
      redis.call('HDEL', KEYS[3], name)
    else
      for c = 1, 3 do
        fleet[c] = fleet[c] + r[c]
        if r[c] > 0 and r[7] >= lately and r[3 + c] < oldest[c] then oldest[c] = r[3 + c] end
      end
    end
  end
end
local function reply(taken, wait)
  return {taken, tostring(wait), fleet[1], fleet[2], fleet[3]}
end
local extra = math.min(burst - 1, reserve * burst)
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or now)
local paused = tonumber(redis.call('HGET', KEYS[1], 'paused') or 0)
if tat < now then tat = now end
local wait = tat - (burst - 1 - extra) * interval - now
if paused - now > wait then wait = paused - now end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - period)
local count = redis.call('ZCARD', KEYS[2])
local cap = math.max(1, math.floor(per_window * (1 - reserve) + 1e-9))
if count >= cap then
  local oldest = redis.call('ZRANGE', KEYS[2], count - cap, count - cap, 'WITHSCORES')
  local free_at = tonumber(oldest[2]) + period
  if free_at - now > wait then wait = free_at - now end
end
if wait > 0 then return reply(0, wait) end
local v = tonumber(redis.call('HGET', KEYS[3], 'v') or 0)
local best, best_finish, best_weight, starts = 0, math.huge, -1, {}
for i = 1, 3 do
  local start = tonumber(redis.call('HGET', KEYS[3], 's:' .. classes[i]) or 0)
  local on = redis.call('HGET', KEYS[3], 'on:' .. classes[i])
  if fleet[i] > 0 and on ~= '1' and start < v then start = v end
  starts[i] = start
  redis.call('HSET', KEYS[3], 's:' .. classes[i], tostring(start),
    'on:' .. classes[i], fleet[i] > 0 and '1' or '0')
  if fleet[i] > 0 then
    local finish = math.huge
    if weights[i] > 0 then finish = start + 1 / weights[i] end
    local tie = finish == best_finish and weights[i] > best_weight
    if best == 0 or finish < best_finish or tie then
      best, best_finish, best_weight = i, finish, weights[i]
    end
  end
end
local me = 0
for i = 1, 3 do if classes[i] == klass then me = i end end
local slack = math.floor(interval * 500)
if (best ~= 0 and best ~= me) or (me ~= 0 and heads[me] > oldest[me] + slack) then
  -- The slot is another class's, or an older request's of this class on another replica:
  -- that replica takes it; ask again within half an interval.
  return reply(0, math.max(0.001, math.min(interval / 2, 0.05)))
end
redis.call('HSET', KEYS[1], 'tat', tostring(tat + interval))
redis.call('ZADD', KEYS[2], now, ARGV[4])
if me ~= 0 and weights[me] > 0 then starts[me] = starts[me] + 1 / weights[me] end
if me ~= 0 then
  redis.call('HSET', KEYS[3], 's:' .. klass, tostring(starts[me]))
  if mine[me] > 0 then mine[me] = mine[me] - 1 end
  if fleet[me] > 0 then fleet[me] = fleet[me] - 1 end
end
local low = math.huge
for i = 1, 3 do
  if fleet[i] > 0 and weights[i] > 0 and starts[i] < low then low = starts[i] end
end
if low == math.huge and me ~= 0 then low = starts[me] end
if low ~= math.huge and low > v then redis.call('HSET', KEYS[3], 'v', tostring(low)) end
record(mine)
return reply(1, 0)
"""

# Kounta said 429: every replica pauses until then, and starts again with one request and
# then the pace (a burst would hit the wall again). ARGV: seconds, per_window, burst, period.
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

# Compare-and-set: write only over the version the writer read (0: nothing stored yet), so an
# older token never replaces a newer one. Returns the new version, or -1.
CAS_SCRIPT = """
local v = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if v ~= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'version', v + 1, 'data', ARGV[2])
return v + 1
"""

# Store a cache entry unless the account saw an invalidation since the fetch began; prune the
# account's expired paths, then index the entry. KEYS: entry, path set, paths, gen.
# ARGV: gen read when the fetch began, record, ttl ms, digest, path, path-set key prefix.
CACHE_PUT = """
if (redis.call('GET', KEYS[4]) or '0') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = now + tonumber(ARGV[3])
for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('DEL', ARGV[6] .. redis.sha1hex(p))
  redis.call('ZREM', KEYS[3], p)
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], expires, ARGV[4])
local latest = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[5]) or '0')
if expires > latest then redis.call('ZADD', KEYS[3], expires, ARGV[5]) end
return 1
"""

# Take a key's fetch lock if free, and read the account's invalidation count, in one trip.
# KEYS: lock, gen. ARGV: owner, ttl ms. Returns {1 or 0, gen}.
CACHE_CLAIM = """
local taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return {taken and 1 or 0, redis.call('GET', KEYS[2]) or '0'}
"""

# Release a fetch lock only for its owner (one that expired and was taken again stays).
CACHE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Delete the entries of the given paths and their indexes. KEYS: paths.
# ARGV: entry key prefix, path-set key prefix, then the paths. Returns the entries deleted.
CACHE_DROP = """
local removed = 0
for i = 3, #ARGV do
  local set = ARGV[2] .. redis.sha1hex(ARGV[i])
  for _, d in ipairs(redis.call('ZRANGE', set, 0, -1)) do
    removed = removed + redis.call('DEL', ARGV[1] .. d)
  end
  redis.call('DEL', set)
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return removed
"""

_CONNECTION_ERRORS = (rexc.ConnectionError, rexc.TimeoutError, TimeoutError, OSError)


class RedisBackend:
    kind = "redis"
    shared = True

    def __init__(self, settings: SharedSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.prefix = settings.key_prefix
        self.timeout = settings.timeout
        self.client = aioredis.Redis.from_url(
            settings.url,
            password=settings.password.reveal() or None,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            # No resends inside the client: a failure is reported at once and the caller
            # falls back; the probe decides when Redis is back.
            retry=Retry(NoBackoff(), 0),
            max_connections=POOL_SIZE,
        )
        self._take = self.client.register_script(TAKE)
        self._pause = self.client.register_script(PAUSE)
        self._take_classed = self.client.register_script(TAKE_CLASSED)
        self._write_token = self.client.register_script(CAS_SCRIPT)
        self._cache_put = self.client.register_script(CACHE_PUT)
        self._cache_claim = self.client.register_script(CACHE_CLAIM)
        self._cache_release = self.client.register_script(CACHE_RELEASE)
        self._cache_drop = self.client.register_script(CACHE_DROP)
        self._up = False
        self._state = ""
        self._probe: asyncio.Task[None] | None = None
        self._replica = uuid.uuid4().hex[:12]
        self._sent = 0
        self._listeners: list[asyncio.Task[None]] = []

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

    async def start(self) -> None:
        """Connect once (a Redis that is away at startup only means degraded) and probe."""
        await self._check()
        if not self._up:
            self._set_state(False, "no answer at startup")
        self._probe = asyncio.create_task(self._watch(), name="shared-redis-probe")

    async def close(self) -> None:
        for task in [self._probe, *self._listeners]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.client.aclose()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            await self._check()

    async def _check(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.ping()
        except (*_CONNECTION_ERRORS, rexc.RedisError) as e:
            self._set_state(False, _why(e))
            return
        self._set_state(True, "answering")

    def _set_state(self, up: bool, reason: str) -> None:
        self._up = up
        self.metrics.shared_backend_up.set(1 if up else 0)
        self.metrics.shared_degraded.set(0 if up else 1)
        state = "shared" if up else "degraded"
        if state != self._state:
            previous, self._state = self._state or "starting", state
            level = logging.INFO if up else logging.WARNING
            event("shared_backend", level, state=state, previous=previous, reason=reason)

    async def _run(self, op: str, call: Callable[[], Awaitable[T]], limit: float = 0.0) -> T:
        if not self._up:
            raise SharedUnavailable(f"shared store away ({op})")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(limit or self.timeout):
                result = await call()
        except _CONNECTION_ERRORS as e:
            self._set_state(False, f"{op}: {_why(e)}")
            self.metrics.shared_calls.labels(op, "error").inc()
            raise SharedUnavailable(f"shared store away ({op}: {_why(e)})") from None
        except rexc.RedisError as e:
            self.metrics.shared_calls.labels(op, "error").inc()
            raise SharedUnavailable(f"shared store refused {op}: {_why(e)}") from None
        finally:
            self.metrics.shared_call_duration.labels(op).observe(time.perf_counter() - started)
        self.metrics.shared_calls.labels(op, "ok").inc()
        return result

    def key(self, kind: str, account: str, suffix: str = "") -> str:
        return f"{self.prefix}:{kind}:{account}{':' + suffix if suffix else ''}"

    # --- budget

    async def take(self, account: str, per_window: int, burst: int, period: float) -> float:
        self._sent += 1
        member = f"{self._replica}:{self._sent}"
        keys = [self.key("budget", account), self.key("budget", account, "log")]
        args: list[Any] = [per_window, burst, repr(float(period)), member]
        taken, wait = await self._run("budget", lambda: self._take(keys=keys, args=args))
        return 0.0 if int(taken) == 1 else max(float(wait), 1e-3)

    async def take_classed(
        self, account: str, per_window: int, burst: int, period: float, ask: ClassedAsk
    ) -> Taken:
        self._sent += 1
        member = f"{self._replica}:{self._sent}"
        keys = [
            self.key("budget", account),
            self.key("budget", account, "log"),
            self.key("budget", account, "demand"),
        ]
        ttl_ms = max(1, round(ask.demand_ttl * 1000))
        args: list[Any] = [
            per_window, burst, repr(float(period)), member, self._replica, ask.klass,
            *ask.waiting, ttl_ms, repr(float(ask.reserve)), *(repr(float(w)) for w in ask.weights),
            *(repr(float(a)) for a in ask.ages),
        ]  # fmt: skip
        taken, wait, *fleet = await self._run(
            "budget", lambda: self._take_classed(keys=keys, args=args)
        )
        waited = 0.0 if int(taken) == 1 else max(float(wait), 1e-3)
        return Taken(waited, (int(fleet[0]), int(fleet[1]), int(fleet[2])))

    async def pause(
        self, account: str, seconds: float, per_window: int, burst: int, period: float
    ) -> float:
        keys = [self.key("budget", account)]
        args: list[Any] = [repr(float(seconds)), per_window, burst, repr(float(period))]
        left = await self._run("pause", lambda: self._pause(keys=keys, args=args))
        return float(left)

    # --- tokens

    async def read_token(self, account: str) -> TokenRecord | None:
        key = self.key("token", account)
        found: list[Any] = await self._run(
            "token_read", lambda: self.client.hmget(key, ["version", "data"])
        )
        version, data = found
        if version is None or data is None:
            return None
        return TokenRecord(int(version), bytes(data))

    async def write_token(self, account: str, data: bytes, expected: int) -> int | None:
        keys = [self.key("token", account)]
        args: list[Any] = [expected, data]
        version = await self._run("token_write", lambda: self._write_token(keys=keys, args=args))
        return None if int(version) < 0 else int(version)

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

    # --- cache entries

    def _cache_key(self, account: str, kind: str, name: str = "") -> str:
        return f"{self.prefix}:cache:{account}:{kind}{':' + name if name else ''}"

    async def cache_get(self, account: str, digest: str) -> bytes | None:
        key = self._cache_key(account, "e", digest)
        found: Any = await self._run("cache_get", lambda: self.client.get(key))
        return None if found is None else bytes(found)

    async def cache_put(
        self, account: str, digest: str, path: str, data: bytes, ttl: float, gen: str
    ) -> bool:
        # Lua's redis.sha1hex names the same key when a path expires or is invalidated.
        path_digest = hashlib.sha1(path.encode(), usedforsecurity=False).hexdigest()
        keys = [
            self._cache_key(account, "e", digest),
            self._cache_key(account, "p", path_digest),
            self._cache_key(account, "paths"),
            self._cache_key(account, "gen"),
        ]
        ttl_ms = max(1, int(ttl * 1000))
        args: list[Any] = [gen, data, ttl_ms, digest, path, self._cache_key(account, "p") + ":"]
        stored = await self._run("cache_put", lambda: self._cache_put(keys=keys, args=args))
        return int(stored) == 1

    async def cache_claim(self, account: str, digest: str, owner: str, ttl: float) -> Claim:
        keys = [self._cache_key(account, "lock", digest), self._cache_key(account, "gen")]
        args: list[Any] = [owner, max(1, int(ttl * 1000))]
        taken, gen = await self._run("cache_lock", lambda: self._cache_claim(keys=keys, args=args))
        return Claim(owner if int(taken) == 1 else None, _text(gen))

    async def cache_poll(self, account: str, digest: str) -> tuple[bytes | None, bool]:
        entry = self._cache_key(account, "e", digest)
        lock = self._cache_key(account, "lock", digest)

        async def poll() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(entry)
            pipe.exists(lock)
            return await pipe.execute()

        data, locked = await self._run("cache_poll", poll)
        return data, bool(locked)

    async def cache_release(self, account: str, digest: str, owner: str) -> None:
        keys, args = [self._cache_key(account, "lock", digest)], [owner]
        await self._run("cache_unlock", lambda: self._cache_release(keys=keys, args=args))

    async def cache_drop(self, account: str, covers: Callable[[str], bool]) -> int:
        """Two trips: count the invalidation and read the paths atomically (MULTI), so any
        store racing with it is refused or listed; then delete what ``covers`` names."""
        paths_key = self._cache_key(account, "paths")
        gen = self._cache_key(account, "gen")

        async def count() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.incr(gen)
            pipe.zrange(paths_key, 0, -1)
            return await pipe.execute()

        _, paths = await self._run("cache_invalidate", count)
        chosen = [p for p in map(_text, paths) if covers(p)]
        if not chosen:
            return 0
        args: list[Any] = [self._cache_key(account, "e") + ":", self._cache_key(account, "p") + ":"]
        args += chosen
        removed = await self._run(
            "cache_delete", lambda: self._cache_drop(keys=[paths_key], args=args)
        )
        return int(removed)

    # --- events

    async def publish(self, topic: str, data: bytes) -> None:
        message = self._replica.encode() + b"|" + data
        channel = self.key("events", topic)
        await self._run("publish", lambda: self.client.publish(channel, message))

    def listen(
        self, topic: str, on_message: Callable[[bytes], None], on_gap: Callable[[], None]
    ) -> None:
        task = asyncio.create_task(self._listen(topic, on_message, on_gap), name=f"listen-{topic}")
        self._listeners.append(task)

    async def _listen(
        self, topic: str, on_message: Callable[[bytes], None], on_gap: Callable[[], None]
    ) -> None:
        """Subscribe, deliver, and after any break subscribe again and report the gap."""
        channel, own = self.key("events", topic), self._replica.encode() + b"|"
        lost = False
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self.timeout):
                    await pubsub.subscribe(channel)
                if lost:
                    lost = False
                    event("shared_resubscribed", topic=topic)
                    on_gap()
                while True:
                    message = await pubsub.get_message(timeout=PROBE_SECONDS)
                    data = message.get("data") if message else None
                    if isinstance(data, bytes) and not data.startswith(own):
                        on_message(data.partition(b"|")[2])
            except (*_CONNECTION_ERRORS, rexc.RedisError) as e:
                if not lost:
                    event("shared_unsubscribed", logging.WARNING, topic=topic, reason=_why(e))
                lost = True
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(PROBE_SECONDS / 2)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _why(error: BaseException) -> str:
    text = str(error).split("\n")[0][:120]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
