-- Takes back a request admitted at ARGV[1] (microseconds, the decision's
-- "now"); then per check: kind number, a, b, units as in decide.lua. Kinds
-- without a refund (concurrency, jobs: their lease gives the slot back) are
-- skipped.
local at = tonumber(ARGV[1])
for i = 1, #KEYS do
  local base = 1 + (i - 1) * 4
  local kind = KINDS[tonumber(ARGV[base + 1])]
  if kind.refund then
    kind.refund(KEYS[i], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), at, tonumber(ARGV[base + 4]))
  end
end
return 1
