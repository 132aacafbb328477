-- Job bookkeeping on one jobs counter (see kinds/jobs.lua).
-- KEYS[1]: the counter; with the ledger, KEYS[2] its stream. ARGV[1]:
-- 'bind' or 'end'; ARGV[2]: the job id; bind: ARGV[3] the pending member it
-- replaces, ARGV[4] max_duration (ms); end: ARGV[3] how it ended. With the
-- ledger, ARGV[5..9]: subject, counter id, request id, route, key
-- fingerprint (for its event). Returns 1 if something changed (end: the
-- job was held).
local t = redis.call('TIME')
local now_ms = math.floor(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000)
local key, job = KEYS[1], 'j:' .. ARGV[2]

local function note(kind, more)
  if not KEYS[2] then return end
  local f = {'t', kind, 's', ARGV[5], 'c', ARGV[6], 'g', 0, 'a', 0, 'k', key, 'j', ARGV[2]}
  if ARGV[7] ~= '' then
    for _, v in ipairs({'r', ARGV[7], 'o', ARGV[8], 'f', ARGV[9]}) do f[#f + 1] = v end
  end
  for _, v in ipairs(more) do f[#f + 1] = v end
  redis.call('XADD', KEYS[2], '*', unpack(f))
end

if ARGV[1] == 'bind' then
  local dur = tonumber(ARGV[4])
  redis.call('ZREM', key, ARGV[3])
  local new = redis.call('ZADD', key, now_ms + dur, job)
  local ttl = redis.call('PTTL', key)
  if ttl < dur + 1000 then redis.call('PEXPIRE', key, dur + 1000) end
  if new == 1 then note('job.started', {}) end
  return 1
end
local ended = redis.call('ZREM', key, job)
if ended == 1 then note('job.ended', {'h', ARGV[3]}) end
return ended
