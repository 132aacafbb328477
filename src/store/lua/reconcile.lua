-- Adds the counts an instance's `local` fallback took while Redis was
-- unreachable, so an outage does not hand out a second quota.
-- KEYS[1]: the counter key. ARGV: kind, a, b (as in decide.lua), n (how many
-- were admitted locally), age (microseconds since the last local admission,
-- by the instance's clock: Redis's own clock places it, whatever the skew).
-- Fixed windows get the counts only while the window they were taken in is
-- still current; rolling windows get them at the second they were taken (or
-- later, never earlier); buckets have their theoretical arrival time pushed
-- back by n intervals. Limits are not checked: the requests were admitted.
local SEC = 1000000
local key = KEYS[1]
local kind, b = tonumber(ARGV[1]), tonumber(ARGV[3])
local n, age = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * SEC + tonumber(t[2])
local at = now - age
if kind == 1 then
  local w = tonumber(redis.call('HGET', key, 'w'))
  local c = tonumber(redis.call('HGET', key, 'c')) or 0
  if w and w <= at and (b == 0 or at < w + b * SEC) then
    redis.call('HSET', key, 'c', c + n)
  elseif b > 0 then
    local start = at - (at % (b * SEC))
    if start + b * SEC > now and (not w or w < start) then
      redis.call('HSET', key, 'w', start, 'c', n)
      redis.call('PEXPIREAT', key, math.ceil((start + b * SEC) / 1000))
    end
  end
elseif kind == 2 then
  local sec = math.floor(at / SEC)
  if (sec + 1 + b) * SEC > now then
    local meta = redis.call('HMGET', key, 't', 'h', 'n')
    local total, h, nn = tonumber(meta[1]) or 0, tonumber(meta[2]) or 0, tonumber(meta[3]) or 0
    local last_sec, last_cnt = -1, 0
    if h < nn then
      local e = redis.call('HGET', key, 'i' .. (nn - 1))
      local s, cnt = string.match(e, '(%d+):(%d+)')
      last_sec, last_cnt = tonumber(s), tonumber(cnt)
    end
    if last_sec >= sec then
      redis.call('HSET', key, 'i' .. (nn - 1), last_sec .. ':' .. (last_cnt + n))
      sec = last_sec
    else
      redis.call('HSET', key, 'i' .. nn, sec .. ':' .. n)
      nn = nn + 1
    end
    redis.call('HSET', key, 't', total + n, 'h', h, 'n', nn)
    redis.call('PEXPIREAT', key, (sec + 1 + b) * 1000)
  end
elseif kind == 3 then
  local tat = tonumber(redis.call('GET', key)) or 0
  if tat < now then tat = now end
  tat = tat + n * b
  redis.call('SET', key, tat)
  redis.call('PEXPIREAT', key, math.ceil(tat / 1000))
end
return 1
