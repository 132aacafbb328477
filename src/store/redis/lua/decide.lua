-- Decides every limit of one request atomically, on the Redis server's clock.
-- KEYS[i]: the counter key of check i (all keys share one hash tag); with
-- the ledger, then its stream.
-- ARGV: dry_run (1 = evaluate only), lease id, lease ms, the number of
-- checks, the deadline (us, Redis's clock; 0: none), then per check: kind
-- number, a, b (see the kind fragments), units, shadow (1: its refusal
-- does not refuse the request; it is counted all the same); then the
-- ledger's arguments (prelude.lua).
-- Past its deadline (Redis was paused or too busy: the instance stopped
-- waiting and decided without it) it counts nothing and returns "-1".
-- Returns one string of integers, each after a space: all_admitted,
-- now_us, jobs expired, the stream id of the last event written (ms, seq;
-- 0 0 for none), then per check the six verdict numbers. (One bulk string
-- rather than an array of 5 + 6n integers: the client reads one value,
-- and reading RESP values one by one was most of its cost per decision.)
-- decide() is called by the script (`return decide()`) or by the function
-- library (library.lua).

-- Check i's kind, numbers, units and whether it is a shadow.
local function check(i)
  local base = 5 + (i - 1) * 5
  return KINDS[tonumber(ARGV[base + 1])], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]),
    tonumber(ARGV[base + 4]), ARGV[base + 5] == '1'
end

-- "%d" formats per reply length (16-digit microseconds stay exact,
-- which tostring's "%.14g" would not keep).
local FORMATS = {}
local function reply(out)
  local n = #out
  local f = FORMATS[n]
  if not f then
    f = string.rep(' %d', n)
    FORMATS[n] = f
  end
  return string.format(f, unpack(out))
end

local function decide()
  begin()
  local dry = ARGV[1] == '1'
  lease_id = ARGV[2]
  lease_ms = tonumber(ARGV[3])
  local n = tonumber(ARGV[4])
  local deadline = tonumber(ARGV[5])
  if deadline > 0 and now > deadline then return '-1' end
  ledger_open(n, 6 + n * 5)

  local verdicts, state, all = {}, {}, 1
  for i = 1, n do
    local kind, a, b, u, shadow = check(i)
    CTX = LCTX[i]
    local v, s = kind.evaluate(KEYS[i], a, b, u)
    if v[1] == 0 and not shadow then all = 0 end
    verdicts[i], state[i] = v, s
  end

  if not dry then
    for i = 1, n do
      local kind, a, b, u, shadow = check(i)
      CTX = LCTX[i]
      if all == 1 then
        kind.record(KEYS[i], a, b, state[i], u)
      elseif verdicts[i][1] == 0 and not shadow and kind.exhausted then
        kind.exhausted(KEYS[i], verdicts[i])
      end
    end
  end

  local out = {all, now, jobs_expired, LAST[1], LAST[2]}
  for i = 1, n do
    for j = 1, 6 do out[#out + 1] = verdicts[i][j] end
  end
  return reply(out)
end
