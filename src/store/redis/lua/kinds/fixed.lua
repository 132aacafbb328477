-- Kind 1, fixed windows: a hash {w = window start (us), c = count}.
-- a = requests, b = window seconds (0: the calendar month, UTC).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end

-- Start and end of the window containing `at`.
local function window_bounds(secs, at)
  if secs > 0 then
    local len = secs * SEC
    local start = at - (at % len)
    return start, start + len
  end
  local y, m = civil_from_days(math.floor(at / SEC / 86400))
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * 86400 * SEC, days_from_civil(ny, nm, 1) * 86400 * SEC
end

-- Adds n to `field` of a window hash ({w = window start, field = n}) for
-- the window containing `at`, while it is the one held.
local function window_add(key, b, at, field, n)
  local w = tonumber(redis.call('HGET', key, 'w'))
  if w and w == window_bounds(b, at) then
    redis.call('HINCRBY', key, field, n)
    return true
  end
  return false
end

-- Adds n taken elsewhere at `at` (the local fallback) to `field`, while
-- that window is still current; `expire(fin)` sets the expiry of a window
-- it starts.
local function window_reconcile(key, b, n, at, field, expire)
  local start, fin = window_bounds(b, at)
  if fin <= now then return false end
  local w = tonumber(redis.call('HGET', key, 'w'))
  if w == start then
    redis.call('HINCRBY', key, field, n)
  elseif not w or w < start then
    redis.call('HSET', key, 'w', start, field, n)
    expire(fin)
  else
    return false
  end
  return true
end

KINDS[1] = {
  evaluate = function(key, a, b, u)
    local start, fin = window_bounds(b, now)
    local cur = redis.call('HMGET', key, 'w', 'c')
    local used, held = 0, tonumber(cur[1]) == start
    if held then used = tonumber(cur[2]) or 0 end
    return counted(a, used, fin, fin, u), {start, fin, used, held}
  end,
  -- The window's hash got its expiry when the window began: within it,
  -- counting is one call.
  record = function(key, a, b, s, u)
    if s[4] then
      redis.call('HSET', key, 'c', s[3] + u)
    else
      redis.call('HSET', key, 'w', s[1], 'c', s[3] + u)
      redis.call('PEXPIREAT', key, math.ceil(s[2] / 1000))
    end
  end,
  -- Only while the window the request was counted in is still current.
  refund = function(key, a, b, at, u)
    local c = tonumber(redis.call('HGET', key, 'c'))
    local w = tonumber(redis.call('HGET', key, 'w'))
    if c and c > 0 and w and w == window_bounds(b, at) then
      redis.call('HSET', key, 'c', math.max(0, c - u))
    end
  end,
  charge = function(key, a, b, at, u)
    window_add(key, b, at, 'c', u)
  end,
  -- Added to the window they were taken in, while it is still current.
  reconcile = function(key, a, b, n, at)
    window_reconcile(key, b, n, at, 'c', function(fin)
      redis.call('PEXPIREAT', key, math.ceil(fin / 1000))
    end)
  end,
  exhausted = quota_exhausted,
}
