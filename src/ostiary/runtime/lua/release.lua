-- Release holds this replica no longer knows of (an admission whose reply was
-- lost, a settlement it could not keep): their slots come back; their token
-- reservations stay debited, which errs on the safe side.
-- KEYS: this replica's holds hash. ARGV: replica, then hold ids.
-- Returns how many holds were released (those already gone are skipped).
local holds, replica = KEYS[1], ARGV[1]
local released = 0
for i = 2, #ARGV do
  local record = redis.call('HGET', holds, ARGV[i])
  if record then
    redis.call('HDEL', holds, ARGV[i])
    for _, key in ipairs(decode_keys(record)) do
      give_back(key, replica)
    end
    released = released + 1
  end
end
return released
