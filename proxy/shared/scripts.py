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

# GCRA for pace and burst plus a sliding log for the hard cap per window, in one script.
# ARGV: per_window, burst, period (window + margin, seconds), a unique member for the log,
# the longest pause this replica honours (budget.retry_after_max).
# Returns {1, "0"} when a slot was taken, else {0, "<seconds to wait>"}.
TAKE = (
    NUM
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
redis.call('HSET', KEYS[1], 'tat', tostring(tat + interval), 'format', '1')
redis.call('ZADD', KEYS[2], now, ARGV[4])
return {1, '0'}
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
