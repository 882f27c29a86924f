-- The bucket math of ostiary/protocol/limits.py, operation for operation. Every
-- value is an integer below 2^53, so doubles compute it exactly.
--
-- Numbers cross the wire in ARGV[1], and buckets are stored, as little-endian
-- doubles (struct), not decimal strings: parsing decimals (strtod) and printing
-- them cost Redis more than all the rest of an admission's Lua.

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

-- span: the longest refill that counts, twice the window.
local function deficit_at(per_ms, span, deficit, stamp, now)
  if deficit <= 0 then
    return 0
  end
  local elapsed = now - stamp
  if elapsed <= 0 then
    return deficit
  end
  local refill = per_ms * math.min(elapsed, span)
  if refill < deficit then
    return deficit - refill
  end
  return 0
end

-- The script's numbers (ARGV[1]), in a table.
local function numbers(packed)
  return {struct.unpack('<' .. string.rep('d', #packed / 8), packed)}
end

-- A bucket is 24 bytes: its deficit, its stamp, and when its key expires, on the
-- script's clock (absent: full). The deficits at now of KEYS[1..n], read in one
-- MGET, and the expiries; bucket i's per_ms and span are v[at + (i - 1) * stride]
-- and the number after it.
local function load_buckets(n, now, v, at, stride)
  local deficits, expiries = {}, {}
  if n == 0 then
    return deficits, expiries
  end
  local states = redis.call('MGET', unpack(KEYS, 1, n))
  for i = 1, n do
    local state = states[i]
    if state then
      local deficit, stamp, expiry = struct.unpack('<ddd', state)
      local b = at + (i - 1) * stride
      deficits[i], expiries[i] = deficit_at(v[b], v[b + 1], deficit, stamp, now), expiry
    else
      deficits[i], expiries[i] = 0, 0
    end
  end
  return deficits, expiries
end

-- A full bucket is no bucket: its key lives until the bucket is full again, plus a
-- second of slack (never less: an early expiry would forget a deficit). Setting an
-- expiry costs Redis as much again as the write, so a key is given one second more
-- than that, and rewritten without touching its expiry (KEEPTTL) while the one it
-- has (expiry) is enough: a busy bucket has its expiry set about once a second.
local function store_deficit(key, deficit, per_ms, now, expiry)
  if deficit <= 0 then
    redis.call('DEL', key)
    return
  end
  local need = now + ceil_div(deficit, per_ms) + 1000
  if expiry >= need then
    redis.call('SET', key, struct.pack('<ddd', deficit, now, expiry), 'KEEPTTL')
  else
    redis.call('SET', key, struct.pack('<ddd', deficit, now, need + 1000), 'PX', need + 1000 - now)
  end
end

-- now_ms as given (tests), or Redis' own clock when negative.
local function clock(now)
  if now >= 0 then
    return now
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
