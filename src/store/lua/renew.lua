-- Extends one held concurrency lease: KEYS[1] the slot set, ARGV[1] the lease
-- id, ARGV[2] the lease in ms. A lease that already expired is not revived.
local t = redis.call('TIME')
local now_ms = math.floor(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000)
local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return renewed
