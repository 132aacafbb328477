-- Kind 3, token buckets (GCRA): a string holding the theoretical arrival
-- time (us). a = burst, b = interval (us) between two tokens.
KINDS[3] = {
  evaluate = function(key, a, b, u)
    local tat = tonumber(redis.call('GET', key)) or 0
    if tat < now then tat = now end
    local nxt, tol = tat + b * u, b * a
    if nxt <= now + tol then
      local remaining = math.floor((now + tol - nxt) / b)
      return {1, a, a - remaining, remaining, nxt, now}, nxt
    end
    return {0, a, a, 0, tat, nxt - tol}, nxt
  end,
  record = function(key, a, b, nxt, u)
    redis.call('SET', key, nxt)
    redis.call('PEXPIREAT', key, math.ceil(nxt / 1000))
  end,
  refund = function(key, a, b, at, u)
    local tat = tonumber(redis.call('GET', key))
    if tat then redis.call('SET', key, tat - b * u, 'KEEPTTL') end
  end,
  charge = function(key, a, b, at, u)
    local tat = tonumber(redis.call('GET', key))
    if tat then
      tat = tat + b * u
      redis.call('SET', key, tat)
      redis.call('PEXPIREAT', key, math.ceil(tat / 1000))
    end
  end,
  reconcile = function(key, a, b, n, at)
    local tat = tonumber(redis.call('GET', key)) or 0
    if tat < now then tat = now end
    tat = tat + n * b
    redis.call('SET', key, tat)
    redis.call('PEXPIREAT', key, math.ceil(tat / 1000))
  end,
}
