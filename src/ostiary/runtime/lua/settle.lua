-- The end of an admitted request: token buckets get real usage, slots come back.
-- KEYS: k token bucket keys, m concurrency keys, this replica's holds hash.
-- ARGV[1], numbers: now_ms (negative: Redis' clock), k, m, then per bucket per_ms
--   span capacity per_token full reserved actual.
-- ARGV[2..]: replica, hold id.
-- Returns 1 if the hold was still leased, else 0 and nothing changes: the hold was
-- settled already (a retry), never admitted, or its lease expired and its slots
-- were reclaimed (its reservation then counts as used).
if redis.call('HDEL', KEYS[#KEYS], ARGV[3]) == 0 then
  return 0
end
local v = numbers(ARGV[1])
local k, m = v[2], v[3]
local now = k > 0 and clock(v[1]) or 0
local deficits, expiries = load_buckets(k, now, v, 4, 7)
for i = 1, k do
  local b = 4 + (i - 1) * 7
  local capacity, per_token, reserved, actual = v[b + 2], v[b + 3], v[b + 5], v[b + 6]
  local deficit = deficits[i]
  if actual <= reserved then
    local credit = math.min(reserved - actual, capacity) * per_token
    if credit < deficit then
      deficit = deficit - credit
    else
      deficit = 0
    end
  else
    deficit = math.min(deficit + math.min(actual - reserved, capacity) * per_token, 2 * v[b + 4])
  end
  store_deficit(KEYS[i], deficit, v[b], now, expiries[i])
end
local replica = ARGV[2]
for j = 1, m do
  give_back(KEYS[k + j], replica)
end
return 1
