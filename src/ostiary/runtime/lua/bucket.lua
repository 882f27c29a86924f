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

-- A bucket is a string '<deficit>:<stamp>' (absent: full). The deficits at now of
-- KEYS[1..n], read in one MGET, given each bucket's per_ms and window_ms.
local function load_deficits(n, now, per_ms, window_ms)
  local deficits = {}
  if n == 0 then
    return deficits
  end
  local states = redis.call('MGET', unpack(KEYS, 1, n))
  for i = 1, n do
    local state = states[i]
    if state then
      local colon = string.find(state, ':', 1, true)
      deficits[i] = deficit_at(per_ms[i], window_ms[i], tonumber(string.sub(state, 1, colon - 1)),
        tonumber(string.sub(state, colon + 1)), now)
    else
      deficits[i] = 0
    end
  end
  return deficits
end

-- A full bucket is no bucket: it expires once refilled (plus a second of slack).
local function store_deficit(key, deficit, per_ms, now)
  if deficit <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('SET', key, string.format('%d:%d', deficit, now), 'PX', ceil_div(deficit, per_ms) + 1000)
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

-- A hold's record: its slot keys, each as '<length>:<key>' (keys may hold any byte).
local function encode_keys(first, last)
  local parts = {}
  for j = first, last do
    local key = KEYS[j]
    parts[#parts + 1] = #key .. ':' .. key
  end
  return table.concat(parts)
end

local function decode_keys(record)
  local keys, at = {}, 1
  while at <= #record do
    local colon = string.find(record, ':', at, true)
    local stop = colon + tonumber(string.sub(record, at, colon - 1))
    keys[#keys + 1] = string.sub(record, colon + 1, stop)
    at = stop + 1
  end
  return keys
end

local function give_back(key, replica)
  if redis.call('HINCRBY', key, replica, '-1') <= 0 then
    redis.call('HDEL', key, replica)
  end
end
