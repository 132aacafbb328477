-- Settles a request admitted at ARGV[1] (microseconds) whose cost turned
-- out ARGV[2] units more (ARGV[2] = 1) or fewer (ARGV[2] = -1) than its
-- estimate; ARGV[3] is how many units, ARGV[4] the number of checks. Then
-- per check: kind number, a, b as in decide.lua; then the ledger's
-- arguments (prelude.lua). Unchecked: the upstream already did the work.
begin()
local at, sign, units, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
GIVEN_BACK = 'credits.settled'
ledger_open(n, 5 + n * 3)
for i = 1, n do
  local base = 4 + (i - 1) * 3
  local kind = KINDS[tonumber(ARGV[base + 1])]
  local a, b = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  CTX = LCTX[i]
  if sign > 0 and kind.charge then
    kind.charge(KEYS[i], a, b, at, units)
  elseif sign < 0 and kind.refund then
    kind.refund(KEYS[i], a, b, at, units)
  end
end
return 1
