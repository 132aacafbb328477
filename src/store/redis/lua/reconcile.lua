-- Adds the counts an instance's `local` fallback took while Redis was
-- unreachable, so an outage does not hand out a second quota.
-- KEYS[1]: the counter key. ARGV: kind number, a, b (as in decide.lua), n
-- (how many were admitted locally), age (microseconds since the last local
-- admission, by the instance's clock: Redis's own clock places it, whatever
-- the skew), then the ledger's arguments (prelude.lua). Limits are not
-- checked: the requests were admitted.
begin()
local kind = KINDS[tonumber(ARGV[1])]
ledger_open(1, 6)
CTX = LCTX[1]
if kind.reconcile then
  kind.reconcile(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), now - tonumber(ARGV[5]))
end
return 1
