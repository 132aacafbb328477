-- Kind 2, rolling windows: a hash with total t, head index h, next index n,
-- and entries i<k> = "second:count", oldest first. An admission in second s
-- counts until s + 1 + window. a = requests, b = window seconds.
local function rolling_entry(key, k)
  local e = redis.call('HGET', key, 'i' .. k)
  local sec, cnt = string.match(e, '(%d+):(%d+)')
  return tonumber(sec), tonumber(cnt)
end

local function rolling_meta(key)
  local meta = redis.call('HMGET', key, 't', 'h', 'n')
  return tonumber(meta[1]) or 0, tonumber(meta[2]) or 0, tonumber(meta[3]) or 0
end

local function rolling_prune(key, w)
  local total, h, n = rolling_meta(key)
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

-- Adds `count` admissions at second `sec` (or at the newest second held,
-- if that is later: entries stay oldest first).
local function rolling_add(key, b, sec, count)
  local total, h, n = rolling_meta(key)
  local last_sec, last_cnt = -1, 0
  if h < n then last_sec, last_cnt = rolling_entry(key, n - 1) end
  if last_sec >= sec then
    redis.call('HSET', key, 'i' .. (n - 1), last_sec .. ':' .. (last_cnt + count))
    sec = last_sec
  else
    redis.call('HSET', key, 'i' .. n, sec .. ':' .. count)
    n = n + 1
  end
  redis.call('HSET', key, 't', total + count, 'h', h, 'n', n)
  redis.call('PEXPIREAT', key, (sec + 1 + b) * 1000)
end

KINDS[2] = {
  evaluate = function(key, a, b, u)
    local total, h, n = rolling_prune(key, b)
    local oldest = math.floor(now / SEC)
    if h < n then oldest = rolling_entry(key, h) end
    local retry = now
    if u > a then
      retry = (math.floor(now / SEC) + 1 + b) * SEC
    elseif total + u > a then
      local need, left, k = total + u - a, 0, h
      while k < n do
        local sec, cnt = rolling_entry(key, k)
        left = left + cnt
        retry = (sec + 1 + b) * SEC
        if left >= need then break end
        k = k + 1
      end
    end
    return counted(a, total, (oldest + 1 + b) * SEC, retry, u), nil
  end,
  record = function(key, a, b, s, u)
    if u > 0 then rolling_add(key, b, math.floor(now / SEC), u) end
  end,
  refund = function(key, a, b, at, u)
    local sec = math.floor(at / SEC)
    local total, h, n = rolling_meta(key)
    for k = n - 1, h, -1 do
      local s, cnt = rolling_entry(key, k)
      if s == sec and cnt > 0 then
        local taken = math.min(cnt, u)
        redis.call('HSET', key, 'i' .. k, s .. ':' .. (cnt - taken), 't', total - taken)
        break
      end
    end
  end,
  charge = function(key, a, b, at, u)
    local sec = math.floor(at / SEC)
    local total, h, n = rolling_meta(key)
    for k = n - 1, h, -1 do
      local s, cnt = rolling_entry(key, k)
      if s == sec then
        redis.call('HSET', key, 'i' .. k, s .. ':' .. (cnt + u), 't', total + u)
        break
      end
    end
  end,
  reconcile = function(key, a, b, n, at)
    local sec = math.floor(at / SEC)
    if (sec + 1 + b) * SEC > now then rolling_add(key, b, sec, n) end
  end,
  exhausted = quota_exhausted,
}
