-- Admission across every layer at once, or none.
-- KEYS: n bucket keys, m concurrency keys, this replica's holds hash.
-- ARGV[1], numbers: now_ms (negative: Redis' clock), n, m, record (1: keep a record
--   of the hold, 0: it has nothing to settle, 2: keep one, and this admission is
--   sent again after a connection broke: if the hold is recorded already, the first
--   sending admitted it, and it is not counted again), never (the 0-based index of the
--   first charge whose cost exceeds its capacity, or -1), then per bucket per_ms
--   span full debit (its cost in units), then per concurrency key its limit.
-- ARGV[2..]: hold id, the hold's record (its slot keys, each as '<length>:<key>'),
--   replica, lease ms, holds key prefix.
-- Returns {1, deficits...} when admitted, else {0, exhausted, full_slot, retry_ms,
-- never, deficits...} (indices 0-based, -1 for none).

-- Concurrency counters are hashes of replica -> count. A replica whose holds hash
-- (its lease) has expired is dead: its counts are dropped here. alive caches each
-- replica's verdict for the script; this replica's own is found by renewing its
-- lease (PEXPIRE answers whether the hash exists), which the admission does anyway.
local function live_count(key, alive, replica, holds, lease_ms, holds_prefix)
  local fields = redis.call('HGETALL', key)
  local total = 0
  for i = 1, #fields, 2 do
    local owner = fields[i]
    local live = alive[owner]
    if live == nil then
      if owner == replica then
        live = redis.call('PEXPIRE', holds, lease_ms) == 1
      else
        live = redis.call('EXISTS', holds_prefix .. owner .. '}') == 1
      end
      alive[owner] = live
    end
    if live then
      total = total + tonumber(fields[i + 1])
    else
      redis.call('HDEL', key, owner)
    end
  end
  return total
end

local v = numbers(ARGV[1])
local n, m = v[2], v[3]
local now = n > 0 and clock(v[1]) or 0
local deficits, expiries = load_buckets(n, now, v, 6, 4)

if v[4] == 2 and redis.call('HEXISTS', KEYS[n + m + 1], ARGV[2]) == 1 then
  local out = {1}
  for i = 1, n do
    out[1 + i] = deficits[i]
  end
  return out
end

local function refuse(exhausted, full_slot, retry, never)
  local out = {0, exhausted, full_slot, retry, never}
  for i = 1, n do
    out[5 + i] = deficits[i]
  end
  return out
end

if v[5] >= 0 then
  return refuse(v[5], -1, -1, 1)
end
local worst, worst_wait = -1, 0
for i = 1, n do
  local b = 2 + i * 4 -- per_ms, span, full, debit
  local excess = deficits[i] + v[b + 3] - v[b + 2]
  if excess > 0 then
    local wait = ceil_div(excess, v[b])
    if wait > worst_wait then
      worst, worst_wait = i - 1, wait
    end
  end
end
if worst >= 0 then
  return refuse(worst, -1, worst_wait, 0)
end
local replica, holds = ARGV[4], KEYS[n + m + 1]
local alive = {}
local limits_at = 5 + n * 4
for j = 1, m do
  if live_count(KEYS[n + j], alive, replica, holds, ARGV[5], ARGV[6]) >= v[limits_at + j] then
    return refuse(-1, j - 1, -1, 0)
  end
end

local out = {1}
for i = 1, n do
  local b = 2 + i * 4
  local deficit = deficits[i] + v[b + 3]
  store_deficit(KEYS[i], deficit, v[b], now, expiries[i])
  out[1 + i] = deficit
end
for j = 1, m do
  redis.call('HINCRBY', KEYS[n + j], replica, '1')
end
if v[4] >= 1 then
  -- The hold remembers its slots, so that a hold this replica lost track of (its
  -- reply lost) can be released by the heartbeat without being told them.
  redis.call('HSET', holds, ARGV[2], ARGV[3])
  if not alive[replica] then -- not renewed above (or the hash was gone)
    redis.call('PEXPIRE', holds, ARGV[5])
  end
end
return out
