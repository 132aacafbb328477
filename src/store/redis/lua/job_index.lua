-- The job index: job id -> the counters holding it, for ending a job by
-- its id alone. KEYS[1]: `<prefix>job:<hash of the id>`. ARGV[1] 'add'
-- (ARGV[2] '<counter key>\t<subject label>', ARGV[3] the job's
-- max_duration in ms) or 'take' (returns the holders and forgets them).
if ARGV[1] == 'add' then
  redis.call('SADD', KEYS[1], ARGV[2])
  local ttl = tonumber(ARGV[3]) + 1000
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
  return 1
end
local holders = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return holders
