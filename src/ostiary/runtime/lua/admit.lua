-- Admission across every layer at once, or none.
-- KEYS: n bucket keys, m concurrency keys, this replica's holds hash.
-- ARGV: now_ms ('' = Redis' clock), replica, hold id, lease ms, holds key prefix,
--       n, m, then per bucket capacity per_token per_ms full window_ms cost,
--       then per concurrency key its limit.
-- Returns {allowed, now, exhausted, full_slot, retry_ms, never, deficits...}
-- (indices 0-based, -1 for none).
local now = clock(ARGV[1])
local n, m = tonumber(ARGV[6]), tonumber(ARGV[7])
local deficits, specs = {}, {}
for i = 1, n do
  local b = 7 + (i - 1) * 6
  local spec = {
    capacity = tonumber(ARGV[b + 1]), per_token = tonumber(ARGV[b + 2]),
    per_ms = tonumber(ARGV[b + 3]), full = tonumber(ARGV[b + 4]),
    window_ms = tonumber(ARGV[b + 5]), cost = tonumber(ARGV[b + 6]),
  }
  specs[i] = spec
  deficits[i] = load_deficit(KEYS[i], spec.per_ms, spec.window_ms, now)
end

local function answer(allowed, exhausted, full_slot, retry, never)
  local out = {allowed, now, exhausted, full_slot, retry, never}
  for i = 1, n do
    out[6 + i] = deficits[i]
  end
  return out
end

local worst, worst_wait = -1, 0
for i = 1, n do
  local spec = specs[i]
  if spec.cost > spec.capacity then
    return answer(0, i - 1, -1, -1, 1)
  end
  local excess = deficits[i] + spec.cost * spec.per_token - spec.full
  if excess > 0 then
    local wait = ceil_div(excess, spec.per_ms)
    if wait > worst_wait then
      worst, worst_wait = i - 1, wait
    end
  end
end
if worst >= 0 then
  return answer(0, worst, -1, worst_wait, 0)
end
local limits_at = 7 + n * 6
for j = 1, m do
  if live_count(KEYS[n + j], ARGV[5]) >= tonumber(ARGV[limits_at + j]) then
    return answer(0, -1, j - 1, -1, 0)
  end
end

for i = 1, n do
  local spec = specs[i]
  deficits[i] = deficits[i] + spec.cost * spec.per_token
  store_deficit(KEYS[i], deficits[i], spec.per_ms, now)
end
local replica = ARGV[2]
for j = 1, m do
  redis.call('HINCRBY', KEYS[n + j], replica, 1)
end
local holds = KEYS[n + m + 1]
local slot_keys = {}
for j = 1, m do
  slot_keys[j] = KEYS[n + j]
end
-- The hold remembers its slots, so that a hold this replica lost track of (its
-- reply lost) can be released by the heartbeat without being told them.
redis.call('HSET', holds, ARGV[3], m == 0 and '[]' or cjson.encode(slot_keys))
redis.call('PEXPIRE', holds, tonumber(ARGV[4]))
return answer(1, -1, -1, -1, 0)
