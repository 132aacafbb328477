-- Job bookkeeping on one jobs counter (see kinds/jobs.lua).
-- KEYS[1]: the counter. ARGV[1]: 'bind' or 'end'; ARGV[2]: the job id;
-- bind: ARGV[3] the pending member it replaces, ARGV[4] max_duration (ms).
-- Returns 1 if something changed (end: the job was held).
local t = redis.call('TIME')
local now_ms = math.floor(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000)
local key, job = KEYS[1], 'j:' .. ARGV[2]
if ARGV[1] == 'bind' then
  local dur = tonumber(ARGV[4])
  redis.call('ZREM', key, ARGV[3])
  redis.call('ZADD', key, now_ms + dur, job)
  local ttl = redis.call('PTTL', key)
  if ttl < dur + 1000 then redis.call('PEXPIRE', key, dur + 1000) end
  return 1
end
return redis.call('ZREM', key, job)
