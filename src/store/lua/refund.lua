-- Takes back one request admitted at ARGV[1] (microseconds, the decision's
-- "now"); then per check: kind, a, b as in decide.lua. Concurrency slots are
-- released by their lease instead.
local SEC = 1000000
local at = tonumber(ARGV[1])
for i = 1, #KEYS do
  local key = KEYS[i]
  local base = 1 + (i - 1) * 3
  local kind, b = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 3])
  if kind == 1 then
    local c = tonumber(redis.call('HGET', key, 'c'))
    local w = tonumber(redis.call('HGET', key, 'w'))
    -- Only while the window the request was counted in is still current.
    if c and c > 0 and w and w <= at and (b == 0 or at < w + b * SEC) then
      redis.call('HSET', key, 'c', c - 1)
    end
  elseif kind == 2 then
    local sec = math.floor(at / SEC)
    local meta = redis.call('HMGET', key, 't', 'h', 'n')
    local total, h, n = tonumber(meta[1]) or 0, tonumber(meta[2]) or 0, tonumber(meta[3]) or 0
    for k = n - 1, h, -1 do
      local e = redis.call('HGET', key, 'i' .. k)
      local s, cnt = string.match(e, '(%d+):(%d+)')
      if tonumber(s) == sec and tonumber(cnt) > 0 then
        redis.call('HSET', key, 'i' .. k, s .. ':' .. (tonumber(cnt) - 1), 't', total - 1)
        break
      end
    end
  elseif kind == 3 then
    local tat = tonumber(redis.call('GET', key))
    if tat then redis.call('SET', key, tat - b, 'KEEPTTL') end
  end
end
return 1
