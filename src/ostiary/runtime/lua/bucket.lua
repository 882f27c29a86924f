-- The bucket math of ostiary/protocol/limits.py, operation for operation. Every
-- value is an integer below 2^53, so doubles compute it exactly.

local function floor_div(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local function ceil_div(a, b)
  return -floor_div(-a, b)
end

local function deficit_at(per_ms, window_ms, deficit, stamp, now)
  if deficit <= 0 then
    return 0
  end
  local elapsed = now - stamp
  if elapsed <= 0 then
    return deficit
  end
  local refill = per_ms * math.min(elapsed, 2 * window_ms)
  if refill < deficit then
    return deficit - refill
  end
  return 0
end

local function load_deficit(key, per_ms, window_ms, now)
  local state = redis.call('HMGET', key, 'd', 't')
  if not state[1] then
    return 0
  end
  return deficit_at(per_ms, window_ms, tonumber(state[1]), tonumber(state[2]), now)
end

-- A full bucket is no bucket: it expires once refilled (plus a second of slack).
local function store_deficit(key, deficit, per_ms, now)
  if deficit <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'd', string.format('%.0f', deficit), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', key, ceil_div(deficit, per_ms) + 1000)
end

local function clock(arg)
  local now = tonumber(arg)
  if now then
    return now
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Concurrency counters are hashes of replica -> count. A replica whose holds hash
-- (its lease) has expired is dead: its counts are dropped here.
local function live_count(key, holds_prefix)
  local fields = redis.call('HGETALL', key)
  local total = 0
  for i = 1, #fields, 2 do
    if redis.call('EXISTS', holds_prefix .. fields[i] .. '}') == 1 then
      total = total + tonumber(fields[i + 1])
    else
      redis.call('HDEL', key, fields[i])
    end
  end
  return total
end
