-- One capacity pool shared by every instance (docs/capacity.md, "Across
-- instances"). KEYS[1]: the pool's base key, `<prefix>{cap:<name>}`; every
-- key below shares its hash tag. ARGV[1] the operation, ARGV[2] max,
-- ARGV[3] the lease of an in-flight slot (ms), ARGV[4] the number of plans,
-- then name, weight, reserve for each; the operation's own arguments after.
--
--   :held     ZSET  slot member -> expiry (ms): in-flight slots ('s|..',
--                   renewed by their instance), granted ones ('g|<waiter>'),
--                   jobs ('j|<id>', expiring max_duration after submission)
--   :hp       HASH  slot member -> plan;  :byplan HASH plan -> slots held
--   :jobs     HASH  job id -> owner (the caller whose poll may end it)
--   :q:<plan> ZSET  waiter -> tag within the plan (ties: arrival order)
--   :sub:<plan> HASH subject -> its last tag within the plan
--   :wait     HASH  waiter -> deadline (ms) TAB plan
--   :grant    HASH  waiter -> slot member granted, not yet claimed
--   :v        HASH  V (virtual time across plans), F:<plan> its next finish
--                   tag while it waits, L:<plan> its last, S:<plan> the tag
--                   last served within it
--   :seq      the waiter counter;  :wake  channel: a waiter was granted a slot
--
-- The order is the memory backend's (src/capacity/fair.rs): plans by
-- weighted finish tags, subjects by tags within a plan, FIFO within one.
local t = redis.call('TIME')
local now_ms = math.floor(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000)
local base = KEYS[1]
local held, hp, byplan = base .. ':held', base .. ':hp', base .. ':byplan'
local jobs, wait, grant, v = base .. ':jobs', base .. ':wait', base .. ':grant', base .. ':v'
local op, max, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local plans, n = {}, tonumber(ARGV[4])
for i = 0, n - 1 do
  plans[i + 1] = { name = ARGV[5 + 3 * i], weight = tonumber(ARGV[6 + 3 * i]),
                   reserve = tonumber(ARGV[7 + 3 * i]) }
end
local a = 5 + 3 * n -- the operation's first argument

local function num(x) return tonumber(x or '0') or 0 end
local function weight(p)
  for _, q in ipairs(plans) do if q.name == p then return q.weight end end
  return 1
end

local function drop_member(m)
  if redis.call('ZREM', held, m) == 0 then return false end
  local p = redis.call('HGET', hp, m)
  if p then
    redis.call('HINCRBY', byplan, p, -1)
    redis.call('HDEL', hp, m)
  end
  return true
end

local function take(m, p, ttl)
  redis.call('ZADD', held, now_ms + ttl, m)
  redis.call('HSET', hp, m, p)
  redis.call('HINCRBY', byplan, p, 1)
end

-- Slots whose lease or job ran out.
local function purge()
  local gone = redis.call('ZRANGEBYSCORE', held, '-inf', now_ms)
  for _, m in ipairs(gone) do
    drop_member(m)
    if string.sub(m, 1, 2) == 'j|' then redis.call('HDEL', jobs, string.sub(m, 3)) end
  end
end

local function may_take(p, in_use)
  local kept = 0
  for _, q in ipairs(plans) do
    if q.name ~= p and q.reserve > 0 then
      kept = kept + math.max(0, q.reserve - num(redis.call('HGET', byplan, q.name)))
    end
  end
  return in_use + kept < max
end

-- A plan's queue emptied: its subjects' tags no longer matter.
local function idle(p)
  redis.call('HDEL', v, 'F:' .. p)
  redis.call('DEL', base .. ':sub:' .. p)
end

-- Free slots to waiters, in fair order.
local function dispatch()
  while true do
    local in_use = redis.call('ZCARD', held)
    if in_use >= max then return end
    local best, bestf = nil, nil
    for _, q in ipairs(plans) do
      if redis.call('ZCARD', base .. ':q:' .. q.name) > 0 and may_take(q.name, in_use) then
        local f = num(redis.call('HGET', v, 'F:' .. q.name))
        if best == nil or f < bestf then best, bestf = q.name, f end
      end
    end
    if best == nil then return end
    local qk = base .. ':q:' .. best
    local head = redis.call('ZRANGE', qk, 0, 0, 'WITHSCORES')
    local w = head[1]
    redis.call('ZREM', qk, w)
    local info = redis.call('HGET', wait, w)
    redis.call('HDEL', wait, w)
    local deadline = info and tonumber(string.match(info, '^(%d+)')) or 0
    if deadline > now_ms then
      redis.call('HSET', v, 'S:' .. best, head[2], 'V', bestf, 'L:' .. best, bestf)
      local m = 'g|' .. w
      take(m, best, lease)
      redis.call('HSET', grant, w, m)
      redis.call('PUBLISH', base .. ':wake', w)
    end
    if redis.call('ZCARD', qk) == 0 then
      idle(best)
    elseif deadline > now_ms then
      redis.call('HSET', v, 'F:' .. best, bestf + 1 / weight(best))
    end
  end
end

local function leave_queue(w)
  local info = redis.call('HGET', wait, w)
  if not info then return end
  local p = string.match(info, '\t(.*)$')
  redis.call('HDEL', wait, w)
  local qk = base .. ':q:' .. p
  redis.call('ZREM', qk, w)
  if redis.call('ZCARD', qk) == 0 then idle(p) end
end

local function figures(extra)
  local out = { redis.call('ZCARD', held), redis.call('HLEN', jobs) }
  for _, q in ipairs(plans) do
    out[#out + 1] = redis.call('ZCARD', base .. ':q:' .. q.name)
  end
  if extra then out[#out + 1] = extra end
  return out
end

purge()

if op == 'acquire' then
  -- plan, subject, member, max_wait (ms), max_queue
  local p, subject, m = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local max_wait, max_queue = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  dispatch()
  if may_take(p, redis.call('ZCARD', held)) then
    take(m, p, lease)
    return { 1 }
  end
  local waiting = redis.call('HLEN', wait)
  if waiting >= max_queue and max_wait > 0 then
    -- Full: drop waiters whose time ran out before refusing.
    local all = redis.call('HGETALL', wait)
    for i = 1, #all, 2 do
      if tonumber(string.match(all[i + 1], '^(%d+)')) <= now_ms then leave_queue(all[i]) end
    end
    waiting = redis.call('HLEN', wait)
  end
  if max_wait <= 0 or waiting >= max_queue then return { 0, waiting } end
  local qk, sub = base .. ':q:' .. p, base .. ':sub:' .. p
  if redis.call('ZCARD', qk) == 0 then
    local start = math.max(num(redis.call('HGET', v, 'V')), num(redis.call('HGET', v, 'L:' .. p)))
    redis.call('HSET', v, 'F:' .. p, start + 1 / weight(p))
  end
  local tag = math.max(num(redis.call('HGET', v, 'S:' .. p)), num(redis.call('HGET', sub, subject))) + 1
  redis.call('HSET', sub, subject, tag)
  local w = string.format('%016x', redis.call('INCR', base .. ':seq'))
  redis.call('ZADD', qk, tag, w)
  redis.call('HSET', wait, w, (now_ms + max_wait) .. '\t' .. p)
  return { 2, w }
elseif op == 'claim' then
  -- waiter: granted (1, member), still waiting (2), or gone (0)
  local w = ARGV[a]
  local m = redis.call('HGET', grant, w)
  if m then
    redis.call('HDEL', grant, w)
    redis.call('ZADD', held, 'XX', now_ms + lease, m)
    return { 1, m }
  end
  dispatch()
  m = redis.call('HGET', grant, w)
  if m then
    redis.call('HDEL', grant, w)
    return { 1, m }
  end
  if redis.call('HEXISTS', wait, w) == 1 then return { 2 } end
  return { 0 }
elseif op == 'leave' then
  local w = ARGV[a]
  local m = redis.call('HGET', grant, w)
  if m then
    redis.call('HDEL', grant, w)
    drop_member(m)
  else
    leave_queue(w)
  end
  dispatch()
  return 1
elseif op == 'release' then
  local r = drop_member(ARGV[a]) and 1 or 0
  dispatch()
  return r
elseif op == 'bind' then
  -- member, job id, owner, max_duration (ms)
  local m, id = ARGV[a], ARGV[a + 1]
  local p = redis.call('HGET', hp, m)
  if not p or not drop_member(m) then return 0 end
  -- The same id twice holds one slot, not two.
  drop_member('j|' .. id)
  take('j|' .. id, p, tonumber(ARGV[a + 3]))
  redis.call('HSET', jobs, id, ARGV[a + 2])
  dispatch()
  return 1
elseif op == 'end' then
  -- job id, owner ('' : whoever holds it)
  local id, owner = ARGV[a], ARGV[a + 1]
  local o = redis.call('HGET', jobs, id)
  if not o or (owner ~= '' and owner ~= o) then return 0 end
  redis.call('HDEL', jobs, id)
  drop_member('j|' .. id)
  dispatch()
  return 1
elseif op == 'renew' then
  for i = a, #ARGV do redis.call('ZADD', held, 'XX', now_ms + lease, ARGV[i]) end
  return 1
end
-- 'usage': in use, jobs, waiting by plan (after handing out what is free)
dispatch()
return figures()
