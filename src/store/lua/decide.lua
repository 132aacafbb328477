-- Decides every limit of one request atomically, on the Redis server's clock.
-- KEYS[i]: the counter key of check i (all keys share one hash tag).
-- ARGV: dry_run (1 = evaluate only), lease id, lease ms, then per check:
--   kind (1 fixed, 2 rolling, 3 bucket, 4 concurrency), a, b
--   fixed/rolling: a = requests, b = window seconds (fixed: 0 = calendar month)
--   bucket: a = burst, b = interval in microseconds
--   concurrency: a = max, b = retry_after in microseconds
-- Returns: all_admitted, now_us, then per check:
--   admitted, limit, used, remaining, reset_at_us, retry_at_us
local SEC = 1000000
local dry = ARGV[1] == '1'
local lease_id = ARGV[2]
local lease_ms = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * SEC + tonumber(t[2])
local now_ms = math.floor(now / 1000)

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

local function window_bounds(secs)
  if secs > 0 then
    local len = secs * SEC
    local start = now - (now % len)
    return start, start + len
  end
  local y, m = civil_from_days(math.floor(now / SEC / 86400))
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * 86400 * SEC, days_from_civil(ny, nm, 1) * 86400 * SEC
end

-- A counting verdict: room while used < limit.
local function counted(limit, used, reset_at, retry_at)
  if used < limit then
    return {1, limit, used + 1, limit - used - 1, reset_at, now}
  end
  return {0, limit, used, 0, reset_at, retry_at}
end

-- Rolling windows: a hash with total t, head index h, next index n, and
-- entries i<k> = "second:count", oldest first.
local function rolling_entry(key, k)
  local e = redis.call('HGET', key, 'i' .. k)
  local sec, cnt = string.match(e, '(%d+):(%d+)')
  return tonumber(sec), tonumber(cnt)
end

local function rolling_prune(key, w)
  local meta = redis.call('HMGET', key, 't', 'h', 'n')
  local total, h, n = tonumber(meta[1]) or 0, tonumber(meta[2]) or 0, tonumber(meta[3]) or 0
  local changed = false
  while h < n do
    local sec, cnt = rolling_entry(key, h)
    if (sec + 1 + w) * SEC > now then break end
    redis.call('HDEL', key, 'i' .. h)
    total = total - cnt
    h = h + 1
    changed = true
  end
  if changed then redis.call('HSET', key, 't', total, 'h', h, 'n', n) end
  return total, h, n
end

local verdicts = {}
local state = {}
local all = 1
for i = 1, #KEYS do
  local key = KEYS[i]
  local base = 3 + (i - 1) * 3
  local kind, a, b = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local v
  if kind == 1 then
    local start, fin = window_bounds(b)
    local cur = redis.call('HMGET', key, 'w', 'c')
    local used = 0
    if tonumber(cur[1]) == start then used = tonumber(cur[2]) or 0 end
    v = counted(a, used, fin, fin)
    state[i] = {start, fin, used}
  elseif kind == 2 then
    local total, h, n = rolling_prune(key, b)
    local oldest = math.floor(now / SEC)
    if h < n then oldest = rolling_entry(key, h) end
    local retry = now
    if total >= a then
      local need, left, k = total + 1 - a, 0, h
      while k < n do
        local sec, cnt = rolling_entry(key, k)
        left = left + cnt
        retry = (sec + 1 + b) * SEC
        if left >= need then break end
        k = k + 1
      end
    end
    v = counted(a, total, (oldest + 1 + b) * SEC, retry)
    state[i] = {total, h, n}
  elseif kind == 3 then
    local tat = tonumber(redis.call('GET', key)) or 0
    if tat < now then tat = now end
    local nxt, tol = tat + b, b * a
    if nxt <= now + tol then
      local remaining = math.floor((now + tol - nxt) / b)
      v = {1, a, a - remaining, remaining, nxt, now}
    else
      v = {0, a, a, 0, tat, nxt - tol}
    end
    state[i] = {nxt}
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
    local in_flight = redis.call('ZCARD', key)
    v = counted(a, in_flight, now + b, now + b)
    if v[1] == 1 then v[5] = now end
  end
  if v[1] == 0 then all = 0 end
  verdicts[i] = v
end

if all == 1 and not dry then
  for i = 1, #KEYS do
    local key = KEYS[i]
    local base = 3 + (i - 1) * 3
    local kind, b = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 3])
    local s = state[i]
    if kind == 1 then
      redis.call('HSET', key, 'w', s[1], 'c', s[3] + 1)
      redis.call('PEXPIREAT', key, math.ceil(s[2] / 1000))
    elseif kind == 2 then
      local total, h, n = s[1], s[2], s[3]
      local sec = math.floor(now / SEC)
      local last_sec, last_cnt = -1, 0
      if h < n then last_sec, last_cnt = rolling_entry(key, n - 1) end
      if last_sec == sec then
        redis.call('HSET', key, 'i' .. (n - 1), sec .. ':' .. (last_cnt + 1))
      else
        redis.call('HSET', key, 'i' .. n, sec .. ':1')
        n = n + 1
      end
      redis.call('HSET', key, 't', total + 1, 'h', h, 'n', n)
      redis.call('PEXPIREAT', key, (sec + 1 + b) * 1000)
    elseif kind == 3 then
      redis.call('SET', key, s[1])
      redis.call('PEXPIREAT', key, math.ceil(s[1] / 1000))
    else
      redis.call('ZADD', key, now_ms + lease_ms, lease_id)
      redis.call('PEXPIRE', key, lease_ms * 2)
    end
  end
end

local out = {all, now}
for i = 1, #KEYS do
  for j = 1, 6 do out[#out + 1] = verdicts[i][j] end
end
return out
