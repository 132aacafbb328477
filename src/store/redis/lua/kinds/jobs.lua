-- Kind 5, jobs: a sorted set scored by expiry (ms). Members are pending
-- submissions ('<lease id>:j', renewed by renew.lua like concurrency
-- leases) and jobs ('j:<id>', expiring max_duration after submission;
-- job.lua turns a pending member into a job and ends one). a = max,
-- b = retry_after (us). Expired jobs are counted in `jobs_expired`.
local function keep_at_least(key, ms)
  local ttl = redis.call('PTTL', key)
  if ttl < ms then redis.call('PEXPIRE', key, ms) end
end

KINDS[5] = {
  evaluate = function(key, a, b)
    local gone = redis.call('ZRANGEBYSCORE', key, '-inf', now_ms)
    if #gone > 0 then
      for _, m in ipairs(gone) do
        if string.sub(m, 1, 2) == 'j:' then
          jobs_expired = jobs_expired + 1
          local was = ORIGIN
          ORIGIN = nil
          note('job.ended', 0, nil, {'j', string.sub(m, 3), 'h', 'expired'})
          ORIGIN = was
        end
      end
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
    end
    local v = counted(a, redis.call('ZCARD', key), now + b, now + b)
    if v[1] == 1 then v[5] = now end
    return v, nil
  end,
  record = function(key, a, b, s)
    redis.call('ZADD', key, now_ms + lease_ms, lease_id .. ':j')
    keep_at_least(key, lease_ms * 2)
  end,
}
