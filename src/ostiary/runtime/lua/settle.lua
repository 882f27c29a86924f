-- The end of an admitted request: token buckets get real usage, slots come back.
-- KEYS: k token bucket keys, m concurrency keys, this replica's holds hash.
-- ARGV: now_ms ('' = Redis' clock), replica, hold id, k, m, then per bucket
--       capacity per_token per_ms full window_ms reserved actual.
-- Returns 1 if the hold was still leased, else 0 and nothing changes: the hold was
-- settled already (a retry), never admitted, or its lease expired and its slots
-- were reclaimed (its reservation then counts as used).
if redis.call('HDEL', KEYS[#KEYS], ARGV[3]) == 0 then
  return 0
end
local k, m = tonumber(ARGV[4]), tonumber(ARGV[5])
local per_ms, window_ms = {}, {}
for i = 1, k do
  local b = 5 + (i - 1) * 7
  per_ms[i], window_ms[i] = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 5])
end
local now = k > 0 and clock(ARGV[1]) or 0
local deficits = load_deficits(k, now, per_ms, window_ms)
for i = 1, k do
  local b = 5 + (i - 1) * 7
  local capacity, per_token = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local reserved, actual = tonumber(ARGV[b + 6]), tonumber(ARGV[b + 7])
  local deficit = deficits[i]
  if actual <= reserved then
    local credit = math.min(reserved - actual, capacity) * per_token
    if credit < deficit then
      deficit = deficit - credit
    else
      deficit = 0
    end
  else
    deficit = math.min(deficit + math.min(actual - reserved, capacity) * per_token,
      2 * tonumber(ARGV[b + 4]))
  end
  store_deficit(KEYS[i], deficit, per_ms[i], now)
end
local replica = ARGV[2]
for j = 1, m do
  give_back(KEYS[k + j], replica)
end
return 1
