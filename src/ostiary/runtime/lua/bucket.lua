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

-- A bucket is 16 bytes, its deficit and its stamp (absent: full). The deficits at
-- now of KEYS[1..n], read in one MGET; bucket i's per_ms and span are
-- v[at + (i - 1) * stride] and the number after it.
local function load_deficits(n, now, v, at, stride)
  local deficits = {}
  if n == 0 then
    return deficits
  end
  local states = redis.call('MGET', unpack(KEYS, 1, n))
  for i = 1, n do
    local state = states[i]
    if state then
      local deficit, stamp = struct.unpack('<dd', state)
      local b = at + (i - 1) * stride
      deficits[i] = deficit_at(v[b], v[b + 1], deficit, stamp, now)
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
  redis.call('SET', key, struct.pack('<dd', deficit, now), 'PX', ceil_div(deficit, per_ms) + 1000)
end

-- now_ms as given (tests), or Redis' own clock when negative.
local function clock(now)
  if now >= 0 then
    return now
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
