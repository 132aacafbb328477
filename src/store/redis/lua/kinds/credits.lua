-- Kind 6, credits balances: a hash {w = refill period start (us), s =
-- credits spent in it}; absent, or of an older period: nothing spent, the
-- balance is the grant. a = grant, b = refill seconds (0: the calendar
-- month; CREDITS_NEVER: no refill, the key never expires).
local CREDITS_NEVER = 1000000000000

-- Spent in the period containing `at`, and that period's bounds.
local function credits_spent(key, b, at)
  local start, fin = window_bounds(b, at)
  local cur = redis.call('HMGET', key, 'w', 's')
  local spent = 0
  if tonumber(cur[1]) == start then spent = tonumber(cur[2]) or 0 end
  return spent, start, fin
end

local function credits_expire(key, b, fin)
  if b >= CREDITS_NEVER then
    redis.call('PERSIST', key)
  else
    redis.call('PEXPIREAT', key, math.ceil(fin / 1000))
  end
end

KINDS[6] = {
  evaluate = function(key, a, b, u)
    local spent, start, fin = credits_spent(key, b, now)
    local balance = a - spent
    local reset = fin
    if b >= CREDITS_NEVER then reset = 0 end
    local s = {start, fin, spent}
    if u <= balance then
      return {1, a, spent + u, balance - u, reset, now}, s
    end
    return {0, a, spent, balance, reset, fin}, s
  end,
  record = function(key, a, b, s, u)
    redis.call('HSET', key, 'w', s[1], 's', s[3] + u)
    credits_expire(key, b, s[2])
  end,
  -- Spending of the period `at` was in, while it is the one held
  -- (window_add and window_reconcile: kinds/fixed.lua).
  refund = function(key, a, b, at, u)
    window_add(key, b, at, 's', -u)
  end,
  charge = function(key, a, b, at, u)
    window_add(key, b, at, 's', u)
  end,
  -- Spent by the local fallback while Redis was unreachable.
  reconcile = function(key, a, b, n, at)
    window_reconcile(key, b, n, at, 's', function(fin)
      credits_expire(key, b, fin)
    end)
  end,
}
