-- Kind 6, credits balances: a hash {w = refill period start (us), s =
-- credits spent in it; with the ledger, f = the alerts fired in period fw};
-- absent, or of an older period: nothing spent, the balance is the grant.
-- a = grant, b = refill seconds (0: the calendar month; CREDITS_NEVER: no
-- refill, the key never expires).
local CREDITS_NEVER = 1000000000000

-- Spent in the period containing `at`, that period's bounds, and the
-- period and spending the hash held.
local function credits_spent(key, b, at)
  local start, fin = window_bounds(b, at)
  local cur = redis.call('HMGET', key, 'w', 's')
  local w, held = tonumber(cur[1]), tonumber(cur[2]) or 0
  local spent = 0
  if w == start then spent = held end
  return spent, start, fin, w, held
end

local function credits_expire(key, b, fin)
  if b >= CREDITS_NEVER then
    redis.call('PERSIST', key)
  elseif LEDGER then
    -- Kept a period longer, so the refill is seen (and written).
    redis.call('PEXPIREAT', key, math.ceil((2 * fin - window_bounds(b, fin - 1)) / 1000))
  else
    redis.call('PEXPIREAT', key, math.ceil(fin / 1000))
  end
end

-- A change that finds the hash of an earlier period: the refill first.
local function credits_refilled(a, start, w, held)
  if LEDGER and w and w ~= start and held ~= 0 then
    note('credits.refilled', held, a)
  end
end

-- The low-balance alerts a fall from `before` to `after` crosses, each
-- once per refill period (the levels are the check's, in CTX).
local function credits_alerts(key, start, before, after)
  local levels = CTX and CTX[5]
  if not LEDGER or not levels or levels == '' or after >= before then return end
  local cur = redis.call('HMGET', key, 'f', 'fw')
  local mask = 0
  if tonumber(cur[2]) == start then mask = tonumber(cur[1]) or 0 end
  local fired, i = mask, 0
  for level in string.gmatch(levels, '[^,]+') do
    local flag = bit.lshift(1, i)
    local l = tonumber(level)
    if after <= l and before > l and bit.band(fired, flag) == 0 then
      fired = bit.bor(fired, flag)
      note('credits.low', 0, after, {'x', i})
    end
    i = i + 1
  end
  if fired ~= mask then redis.call('HSET', key, 'f', fired, 'fw', start) end
end

-- Settles or refunds n units of a request admitted at `at`, while its
-- period is the one held; written as event type t.
local function credits_change(key, a, b, at, n, t)
  if window_add(key, b, at, 's', n) and LEDGER then
    local spent = tonumber(redis.call('HGET', key, 's')) or 0
    note(t, -n, a - spent)
    if n > 0 then credits_alerts(key, window_bounds(b, at), a - spent + n, a - spent) end
  end
end

KINDS[6] = {
  evaluate = function(key, a, b, u)
    local spent, start, fin, w, held = credits_spent(key, b, now)
    local balance = a - spent
    local reset = fin
    if b >= CREDITS_NEVER then reset = 0 end
    local s = {start, fin, spent, w, held}
    if u <= balance then
      return {1, a, spent + u, balance - u, reset, now}, s
    end
    return {0, a, spent, balance, reset, fin}, s
  end,
  -- The period's hash got its expiry when the period began: within it,
  -- charging is one call.
  record = function(key, a, b, s, u)
    credits_refilled(a, s[1], s[4], s[5])
    if s[4] == s[1] then
      redis.call('HSET', key, 's', s[3] + u)
    else
      redis.call('HSET', key, 'w', s[1], 's', s[3] + u)
      credits_expire(key, b, s[2])
    end
    if LEDGER and u ~= 0 then
      note('credits.charged', -u, a - s[3] - u)
      credits_alerts(key, s[1], a - s[3], a - s[3] - u)
    end
  end,
  -- Spending of the period `at` was in, while it is the one held
  -- (window_add and window_reconcile: kinds/fixed.lua).
  refund = function(key, a, b, at, u)
    credits_change(key, a, b, at, -u, GIVEN_BACK)
  end,
  charge = function(key, a, b, at, u)
    credits_change(key, a, b, at, u, 'credits.settled')
  end,
  -- Spent by the local fallback while Redis was unreachable: one charge
  -- for all of it.
  reconcile = function(key, a, b, n, at)
    local added = window_reconcile(key, b, n, at, 's', function(fin)
      credits_expire(key, b, fin)
    end)
    if added and LEDGER then
      local spent = tonumber(redis.call('HGET', key, 's')) or 0
      note('credits.charged', -n, a - spent)
    end
  end,
}
