-- Decides every limit of one request atomically, on the Redis server's clock.
-- KEYS[i]: the counter key of check i (all keys share one hash tag).
-- ARGV: dry_run (1 = evaluate only), lease id, lease ms, then per check:
--   kind number, a, b (see the kind fragments), units, shadow (1: its
--   refusal does not refuse the request; it is counted all the same).
-- Returns: all_admitted, now_us, jobs expired, then per check the six
-- verdict numbers.
local dry = ARGV[1] == '1'
lease_id = ARGV[2]
lease_ms = tonumber(ARGV[3])

local function check(i)
  local base = 3 + (i - 1) * 5
  return KINDS[tonumber(ARGV[base + 1])], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]),
    tonumber(ARGV[base + 4]), ARGV[base + 5] == '1'
end

local verdicts, state, all = {}, {}, 1
for i = 1, #KEYS do
  local kind, a, b, u, shadow = check(i)
  local v, s = kind.evaluate(KEYS[i], a, b, u)
  if v[1] == 0 and not shadow then all = 0 end
  verdicts[i], state[i] = v, s
end

if all == 1 and not dry then
  for i = 1, #KEYS do
    local kind, a, b, u = check(i)
    kind.record(KEYS[i], a, b, state[i], u)
  end
end

local out = {all, now, jobs_expired}
for i = 1, #KEYS do
  for j = 1, 6 do out[#out + 1] = verdicts[i][j] end
end
return out
