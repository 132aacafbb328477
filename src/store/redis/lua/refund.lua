-- Takes back a request admitted at ARGV[1] (microseconds, the decision's
-- "now"); ARGV[2] the number of checks, then per check: kind number, a, b,
-- units as in decide.lua; then the ledger's arguments (prelude.lua). Kinds
-- without a refund (concurrency, jobs: their lease gives the slot back)
-- are skipped.
begin()
local at, n = tonumber(ARGV[1]), tonumber(ARGV[2])
ledger_open(n, 3 + n * 4)
for i = 1, n do
  local base = 2 + (i - 1) * 4
  local kind = KINDS[tonumber(ARGV[base + 1])]
  CTX = LCTX[i]
  if kind.refund then
    kind.refund(KEYS[i], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), at, tonumber(ARGV[base + 4]))
  end
end
return 1
