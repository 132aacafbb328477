-- Kind 4, concurrency: a sorted set of leases (member: lease id, score: when
-- it expires, ms), renewed by renew.lua while the exchange lives; expired
-- leases are dropped before counting. a = max, b = retry_after (us).
-- Slots are given back by their lease, so there is no refund or reconcile.
KINDS[4] = {
  evaluate = function(key, a, b)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
    local v = counted(a, redis.call('ZCARD', key), now + b, now + b)
    if v[1] == 1 then v[5] = now end
    return v, nil
  end,
  record = function(key, a, b, s)
    redis.call('ZADD', key, now_ms + lease_ms, lease_id)
    redis.call('PEXPIRE', key, lease_ms * 2)
  end,
}
