-- Concurrency slots given back, and the records of holds.

-- A hold's record: its slot keys, each as '<length>:<key>' (keys may hold any
-- byte), written by the replica.
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
