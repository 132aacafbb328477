-- Extends one held lease or pending submission: KEYS[1] the slot set,
-- ARGV[1] the member, ARGV[2] the lease in ms. A lease that already expired
-- is not revived; a key holding longer-lived jobs keeps its expiry.
local t = redis.call('TIME')
local now_ms = math.floor(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now_ms + lease, ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease * 2 then
  redis.call('PEXPIRE', KEYS[1], lease * 2)
end
return renewed
