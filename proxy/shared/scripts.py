"""The Lua scripts of the shared budget and token records, and the size-checked cache read.

Each is one atomic step in Redis (one round trip). Times come from Redis (``TIME``). What they
read back is untrusted: a number that is not one (text, NaN, infinite) counts as absent, and a
pause is cut to the reading replica's own cap.
"""

# A number read from a budget record, or the default for anything else (a damaged or hostile
# value: not a number, NaN, infinite).
NUM = """
local function num(value, default)
  local n = tonumber(value)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return default end
  return n
end
"""

# The window's spread (proxy.pipeline.bucket.Bucket._spread): the k-th latest send at least
# (k - burst) / (cap - burst) of the period ago, for each k past the burst below the cap, so
# a burst is paid back by a slightly slower pace, not by a stall a window later. The wait
# (0: none). Asked only when the pace, the pause and the cap let a send go: a wait they give
# may end before the spread's, and the request then asks again.
SPREAD = """
local function spread(log_key, count, cap, burst, period, now)
  local n = math.min(count, cap - 1)
  local wait = 0
  if n <= burst then return wait end
  local log = redis.call('ZRANGE', log_key, count - n, -1, 'WITHSCORES')
  for k = burst + 1, n do
    local at = tonumber(log[2 * (n - k + 1)]) + (k - burst) * period / (cap - burst)
    if at - now > wait then wait = at - now end
  end
  return wait
end
"""

# The wait for a slot (0: none) at the pace (``tat``), the pause and the window's log
# (``count`` sends in it), leaving ``share`` of the burst and of the window's cap and ``kept``
# tokens untaken (batch's reserve and headroom; 0 and 0 for everyone else), as
# proxy.pipeline.bucket.Bucket.ready_at. Uses SPREAD.
SLOT_WAIT = """
local function slot_wait(log_key, tat, paused, count, per_window, burst, period, now, share,
                         kept)
  local interval = period / per_window
  local extra = math.min(burst - 1, share * burst + kept)
  local wait = tat - (burst - 1 - extra) * interval - now
  if paused - now > wait then wait = paused - now end
  local cap = math.max(1, math.floor(per_window * (1 - share) + 1e-9) - kept)
  if count >= cap then
    local oldest = redis.call('ZRANGE', log_key, count - cap, count - cap, 'WITHSCORES')
    local free_at = tonumber(oldest[2]) + period
    if free_at - now > wait then wait = free_at - now end
  end
  -- Only when nothing else holds it back (the log's read costs more than the rest).
  if wait <= 0 then wait = spread(log_key, count, cap, burst - kept, period, now) end
  return wait
end
"""

# GCRA for pace and burst plus a sliding log for the hard cap per window, in one script.
# TAKE_CLASSED below repeats its pace, pause and window lines (with budget classes): keep the
# two in step. The proxy's budget uses TAKE_CLASSED; TAKE serves SharedBudget.take (a gate
# without an account queue, and the tests).
# ARGV: per_window, burst, period (window + margin, seconds), a unique member for the log,
# the longest pause this replica honours (budget.retry_after_max).
# Returns {1, "0"} when a slot was taken, else {0, "<seconds to wait>"}.
TAKE = (
    NUM
    + SPREAD
    + SLOT_WAIT
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local per_window = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local interval = period / per_window
local tat = num(redis.call('HGET', KEYS[1], 'tat'), now)
local paused = num(redis.call('HGET', KEYS[1], 'paused'), 0)
if tat < now then tat = now end
-- A pace or a pause read back is cut to what this replica would take itself: a damaged or
-- hostile record cannot stop it for longer, another replica's longer cap neither.
-- (A pause also moves tat, so it is cut the same way; a pace wait is at most one interval.)
local longest = tonumber(ARGV[5])
if paused > now + longest then paused = now + longest end
local slack = math.max(longest, interval)
if tat - (burst - 1) * interval - now > slack then tat = now + slack + (burst - 1) * interval end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - period)
local count = redis.call('ZCARD', KEYS[2])
local wait = slot_wait(KEYS[2], tat, paused, count, per_window, burst, period, now, 0, 0)
if wait > 0 then return {0, tostring(wait)} end
redis.call('HSET', KEYS[1], 'tat', tostring(tat + interval), 'format', '1')
redis.call('ZADD', KEYS[2], now, ARGV[4])
return {1, '0'}
"""
)

# TAKE with budget classes, fleet-wide (its pace, pause and window lines are TAKE's, hardened
# the same way: keep the two in step): each replica registers its waiting requests by class
# in the account's demand hash (one field per replica, "i s b expiry_ms"; the hash has a short
# TTL, refreshed by every call, and an entry past its expiry is dropped: a dead replica's
# demand goes away). When a slot is free, it goes to the class weighted fair queuing picks
# among the classes the fleet has waiting (start tags "s:CLASS", virtual time "v" and "on:CLASS"
# flags, kept in the same hash); a replica asking for another class is told to ask again
# shortly. Batch leaves the reserve (a fraction of the burst and of the window's cap) and the
# headroom (tokens of the burst; its window's spread and cap as many sends lower), as
# proxy.pipeline.bucket.Bucket.ready_at does.
# KEYS: budget, log, demand. ARGV: per_window, burst, period, member, replica, class,
# waiting interactive, standard, batch (this replica's, this request included), ttl ms,
# reserve, weight interactive, standard, batch, seconds the oldest waiting request of each
# class has waited (0 for none), the longest pause this replica honours (budget.retry_after_max),
# batch's headroom (tokens; a replica of an older release sends none: 0). Reserve and headroom
# are batch's, sent whatever the class asking. Within a class the oldest request goes first.
# Returns {taken 1/0, wait seconds, fleet waiting interactive, standard, batch}.
TAKE_CLASSED = (
    NUM
    + SPREAD
    + SLOT_WAIT
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_ms = math.floor(now * 1000)
local per_window = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local klass = ARGV[6]
local ttl = tonumber(ARGV[10])
-- Batch's hold: the reserve and the headroom (tokens), sent by every replica whatever its
-- request's class, so that a slot batch may not take goes to another class at once.
local reserve = math.max(0, num(ARGV[11], 0))
local keep = math.max(0, math.min(burst - 1, math.floor(num(ARGV[19], 0))))
local classes = {'interactive', 'standard', 'batch'}
local weights = {tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])}
local mine = {tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])}
local heads = {}
for i = 1, 3 do heads[i] = now_ms - math.floor(tonumber(ARGV[14 + i]) * 1000) end
local interval = period / per_window
local FIFO_SLACK_MS = 10
local OWED_TURNS = 4 -- proxy.pipeline.queue.OWED_TURNS
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
local tat = num(redis.call('HGET', KEYS[1], 'tat'), now)
local paused = num(redis.call('HGET', KEYS[1], 'paused'), 0)
if tat < now then tat = now end
-- As in TAKE: a pace or a pause read back is cut to what this replica would take itself.
local longest = tonumber(ARGV[18])
if paused > now + longest then paused = now + longest end
local room = math.max(longest, interval)
if tat - (burst - 1) * interval - now > room then tat = now + room + (burst - 1) * interval end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - period)
local count = redis.call('ZCARD', KEYS[2])
local function held_wait(share, kept)
  return slot_wait(KEYS[2], tat, paused, count, per_window, burst, period, now, share, kept)
end
local wait = held_wait(0, 0)
if wait > 0 then return reply(0, wait) end
local me = 0
for i = 1, 3 do if classes[i] == klass then me = i end end
local v = num(redis.call('HGET', KEYS[3], 'v'), 0)
local starts, finish = {}, {}
for i = 1, 3 do
  local start = num(redis.call('HGET', KEYS[3], 's:' .. classes[i]), 0)
  local on = redis.call('HGET', KEYS[3], 'on:' .. classes[i])
  if fleet[i] > 0 and on ~= '1' and start < v then start = v end
  starts[i] = start
  redis.call('HSET', KEYS[3], 's:' .. classes[i], tostring(start),
    'on:' .. classes[i], fleet[i] > 0 and '1' or '0')
  finish[i] = math.huge
  if weights[i] > 0 then finish[i] = start + 1 / weights[i] end
end
-- A free slot batch's hold keeps from batch: batch waits (it is no class's pick), the others
-- may have it. Unless the others' next turns are all more than four batch turns past
-- batch's (they went ahead while the headroom held batch back) or they have no weight: then
-- batch takes it without the headroom (the reserve still holds), so batch is never starved
-- (proxy.pipeline.queue.owed).
local held = 0
if (reserve > 0 or keep > 0) and fleet[3] > 0 then
  local other, others = math.huge, fleet[1] + fleet[2] > 0
  for i = 1, 2 do
    if fleet[i] > 0 and finish[i] < other then other = finish[i] end
  end
  if weights[3] > 0 and others and other > finish[3] + OWED_TURNS / weights[3] then keep = 0 end
  if reserve > 0 or keep > 0 then held = held_wait(reserve, keep) end
end
if me == 3 and held > 0 then return reply(0, held) end
local best, best_finish, best_weight = 0, math.huge, -1
for i = 1, 3 do
  if fleet[i] > 0 and (i ~= 3 or held <= 0) then
    local tie = finish[i] == best_finish and weights[i] > best_weight
    if best == 0 or finish[i] < best_finish or tie then
      best, best_finish, best_weight = i, finish[i], weights[i]
    end
  end
end
-- First come, first served within a class: only a request younger than the oldest by less
-- than the ages' own error (a round trip, a late event loop: a few ms) may take the slot.
-- (Half an interval here let a younger request on a replica that asked first take the slot,
-- and the older one waited a whole slot more.)
local slack = math.min(FIFO_SLACK_MS, math.floor(interval * 500))
if (best ~= 0 and best ~= me) or (me ~= 0 and heads[me] > oldest[me] + slack) then
  -- The slot is another class's, or an older request's of this class on another replica:
  -- that replica takes it; ask again within half an interval.
  return reply(0, math.max(0.001, math.min(interval / 2, 0.05)))
end
redis.call('HSET', KEYS[1], 'tat', tostring(tat + interval), 'format', '1')
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
)

# TAKE_CLASSED for the owner of a fetch lock only, sent right after its claim (CACHE_CLAIM) on
# the same connection, so that Redis runs it after that claim: a slot is taken only when the
# lock (KEYS[4]) holds the claim's owner token (ARGV[20]), never by a replica that did not get
# the lock. KEYS and ARGV otherwise TAKE_CLASSED's. Returns {-1, "0", 0, 0, 0} when not the owner.
TAKE_OWNED = (
    """
if redis.call('GET', KEYS[4]) ~= ARGV[20] then return {-1, '0', 0, 0, 0} end
"""
    + TAKE_CLASSED
)

# A slot taken and not used (AccountBudget.refund: a background refresh that found its key
# fetched meanwhile) goes back to the fleet: its send leaves the window's log and the pace
# moves back one interval (never before now), so the next replica to ask may have it.
# KEYS: budget, log. ARGV: the member the take logged, per_window, period.
# Returns 1, or 0 when the member is no longer in the log (nothing to give back).
GIVE_BACK = (
    NUM
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local interval = tonumber(ARGV[3]) / tonumber(ARGV[2])
local tat = num(redis.call('HGET', KEYS[1], 'tat'), now)
if tat - interval > now then tat = tat - interval else tat = now end
redis.call('HSET', KEYS[1], 'tat', tostring(tat), 'format', '1')
return 1
"""
)

# Kounta said 429: every replica pauses until then, and starts again with one request and
# then the pace (a burst would hit the wall again). ARGV: seconds, per_window, burst, period.
PAUSE = (
    NUM
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local paused = num(redis.call('HGET', KEYS[1], 'paused'), 0)
local until_ = now + tonumber(ARGV[1])
if paused > until_ then until_ = paused end
redis.call('HSET', KEYS[1], 'paused', tostring(until_), 'format', '1')
local interval = tonumber(ARGV[4]) / tonumber(ARGV[2])
local tat = until_ + (tonumber(ARGV[3]) - 1) * interval
local old = num(redis.call('HGET', KEYS[1], 'tat'), 0)
if tat > old then redis.call('HSET', KEYS[1], 'tat', tostring(tat)) end
return tostring(until_ - now)
"""
)

# Compare-and-set: write only over the version the writer read (0: nothing stored yet, -1: a
# malformed record, which only a writer that saw it as such replaces), so an older token never
# replaces a newer one. The new version is one more than the old, or ARGV[3] if higher (a
# replica writing back the newer record it holds after a restore; `authorize`).
# Returns the new version, or 0.
CAS_SCRIPT = """
local raw = redis.call('HGET', KEYS[1], 'version')
local v = 0
if raw then
  v = tonumber(raw)
  if v == nil or v ~= v or v < 1 or v > 9007199254740991 or v ~= math.floor(v)
    or not string.match(raw, '^[0-9]+$') then v = -1 end
end
if v ~= tonumber(ARGV[1]) then return 0 end
local new = math.max(v + 1, tonumber(ARGV[3]), 1)
redis.call('HSET', KEYS[1], 'version', string.format('%d', new), 'data', ARGV[2], 'format', '2')
return new
"""

# A cache entry, unless it is larger than the reader's limit (then its size) or not a string
# (then -1): nothing large is sent to a replica that would refuse it anyway.
# KEYS: entry (and for a poll, the fetch lock). ARGV: the limit in bytes.
CACHE_GET = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local locked = 0
if KEYS[2] then locked = redis.call('EXISTS', KEYS[2]) end
if kind == 'none' then return {false, locked} end
if kind ~= 'string' then return {-1, locked} end
local size = redis.call('STRLEN', KEYS[1])
if size > tonumber(ARGV[1]) then return {size, locked} end
return {redis.call('GET', KEYS[1]), locked}
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

# Take a key's fetch lock if free, and read the account's invalidation count, in one trip;
# the lock taken, look again: the entry stored by the lock's last owner (released just
# before) is returned too, so a fetch begun on an older look does not go upstream again.
# The lock held by another: its owner token is returned, and the caller (ARGV[4], its
# replica's notes channel suffix; empty: none) is added to the lock's waiters, to whom the
# owner's release publishes its note (CACHE_RELEASE).
# An entry larger than ARGV[5] bytes (the peek; absent: none) is not sent whole: only its
# first ARGV[5] bytes (its entry's header, for the caller to tell whether it may answer from
# it; it reads it whole only then), and its size.
# KEYS: lock, gen, entry, waiters. ARGV: owner, ttl ms, the largest entry read, waiter, peek.
# Returns {1, gen, entry or false, or -1 for one too large or not a string} when taken, or
# {1, gen, the entry's first ARGV[5] bytes, its size}; else {0, gen, the holder's token or
# false}.
CACHE_CLAIM = """
local taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local gen = redis.call('GET', KEYS[2]) or '0'
if not taken then
  if ARGV[4] ~= '' and KEYS[4] then
    redis.call('SADD', KEYS[4], ARGV[4])
    redis.call('PEXPIRE', KEYS[4], ARGV[2])
  end
  return {0, gen, redis.call('GET', KEYS[1]) or false}
end
local kind = redis.call('TYPE', KEYS[3])['ok']
if kind == 'none' then return {1, gen} end
-- Larger than the caller's limit (ARGV[3]) or not a string: never sent, a bad record.
if kind ~= 'string' then return {1, gen, -1} end
local size = redis.call('STRLEN', KEYS[3])
if size > tonumber(ARGV[3]) then return {1, gen, -1} end
local peek = tonumber(ARGV[5] or '0')
if peek > 0 and size > peek then
  return {1, gen, redis.call('GETRANGE', KEYS[3], 0, peek - 1), size}
end
return {1, gen, redis.call('GET', KEYS[3])}
"""

# Release a fetch lock only for its owner (one that expired and was taken again stays), and
# publish the owner's note (ARGV[2], sealed; empty: none) to the replicas waiting on it (at
# most 64 channels ARGV[3] .. waiter). KEYS: lock, waiters (optional).
CACHE_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if KEYS[2] then
  local waiting = redis.call('SRANDMEMBER', KEYS[2], 64)
  redis.call('DEL', KEYS[2])
  if ARGV[2] ~= '' then
    for _, r in ipairs(waiting) do redis.call('PUBLISH', ARGV[3] .. r, ARGV[2]) end
  end
end
return 1
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

# Spare room for background work (read only): the slots the shared bucket could grant now
# (GCRA tokens, cut to the window's room; 0 while paused) and the fleet's waiting requests by
# class (the demand hash's live entries, as TAKE_CLASSED counts them). Values read back are
# hardened as in TAKE: a damaged tat or pause counts for at most ARGV[4] seconds.
# Also the seconds until the next slot (0: one at hand) by the pace, the pause and the window's
# cap, as TAKE counts them (not the burst's payback spread: an estimate, it errs early).
# KEYS: budget, log, demand. ARGV: per_window, burst, period, the longest pause honoured.
# Returns {tokens (a number as text), fleet waiting interactive, standard, batch, seconds to
# the next slot (a number as text)}.
SPARE = (
    NUM
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_ms = math.floor(now * 1000)
local per_window = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local longest = tonumber(ARGV[4])
local interval = period / per_window
local fleet = {0, 0, 0}
local fields = redis.call('HGETALL', KEYS[3])
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 2) == 'r:' then
    local r = {}
    for n in string.gmatch(fields[i + 1], '%-?%d+') do r[#r + 1] = tonumber(n) end
    if #r == 8 and r[8] >= now_ms then
      for c = 1, 3 do fleet[c] = fleet[c] + math.max(0, r[c]) end
    end
  end
end
local tat = num(redis.call('HGET', KEYS[1], 'tat'), now)
local paused = num(redis.call('HGET', KEYS[1], 'paused'), 0)
if tat < now then tat = now end
if tat > now + longest + burst * interval then tat = now + longest + burst * interval end
local tokens = 0
local sent = redis.call('ZCOUNT', KEYS[2], now - period, '+inf')
if paused <= now then
  tokens = math.min(burst, (now + burst * interval - tat) / interval)
  tokens = math.max(0, math.min(tokens, per_window - sent))
end
local wait = math.max(0, tat - (burst - 1) * interval - now, paused - now)
if sent >= per_window then
  local oldest = redis.call('ZRANGEBYSCORE', KEYS[2], now - period, '+inf', 'WITHSCORES',
    'LIMIT', sent - per_window, 1)
  if #oldest == 2 then wait = math.max(wait, tonumber(oldest[2]) + period - now) end
end
return {tostring(tokens), fleet[1], fleet[2], fleet[3], tostring(wait)}
"""
)
