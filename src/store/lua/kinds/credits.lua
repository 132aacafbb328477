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

-- Adds `u` to what was spent at `at`, while its period is the one held.
local function credits_add_spent(key, b, at, u)
  local start = window_bounds(b, at)
  if tonumber(redis.call('HGET', key, 'w')) == start then
    redis.call('HINCRBY', key, 's', u)
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
  refund = function(key, a, b, at, u)
    credits_add_spent(key, b, at, -u)
  end,
  charge = function(key, a, b, at, u)
    credits_add_spent(key, b, at, u)
  end,
  -- Spent by the local fallback while Redis was unreachable.
  reconcile = function(key, a, b, n, at)
    local start, fin = window_bounds(b, at)
    if fin <= now then return end
    local w = tonumber(redis.call('HGET', key, 'w'))
    if w == start then
      redis.call('HINCRBY', key, 's', n)
    elseif not w or w < start then
      redis.call('HSET', key, 'w', start, 's', n)
      credits_expire(key, b, fin)
    end
  end,
}
