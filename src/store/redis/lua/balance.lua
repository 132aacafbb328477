-- Reads or changes one credits balance (kinds/credits.lua) atomically.
-- KEYS[1]: the counter key. ARGV: op ('read', 'add' or 'set'), n, a, b (as
-- in decide.lua). Returns the balance after the change.
local op, n, a, b = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local spent, start, fin = credits_spent(KEYS[1], b, now)
if op == 'add' then
  spent = spent - n
elseif op == 'set' then
  spent = a - n
end
if op ~= 'read' then
  redis.call('HSET', KEYS[1], 'w', start, 's', spent)
  credits_expire(KEYS[1], b, fin)
end
return a - spent
