-- Reads or changes one credits balance (kinds/credits.lua) atomically.
-- KEYS[1]: the counter key. ARGV: op ('read', 'add' or 'set'), n, a, b (as
-- in decide.lua), then the ledger's arguments (prelude.lua). Returns the
-- balance after the change.
begin()
local op, n, a, b = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
ledger_open(1, 5)
CTX = LCTX[1]
local spent, start, fin, w, held = credits_spent(KEYS[1], b, now)
if op == 'read' then return a - spent end
credits_refilled(a, start, w, held)
local before = a - spent
if op == 'add' then
  spent = spent - n
elseif op == 'set' then
  spent = a - n
end
redis.call('HSET', KEYS[1], 'w', start, 's', spent)
credits_expire(KEYS[1], b, fin)
if op == 'add' then
  note('credits.added', a - spent - before, a - spent)
else
  note('credits.set', a - spent - before, a - spent)
end
credits_alerts(KEYS[1], start, before, a - spent)
return a - spent
