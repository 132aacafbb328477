-- Shared by the decide, refund and reconcile scripts, which are assembled at
-- build time as: this prelude, one fragment per limit kind (kinds/*.lua,
-- each registering KINDS[its kind number]), then the script's own body.
--
-- A kind fragment registers a table of functions:
--   evaluate(key, a, b, u) -> verdict, state   looks without counting
--   record(key, a, b, state, u)                counts an admitted request
--   refund(key, a, b, at, u)                   takes back u counted at `at` (optional)
--   charge(key, a, b, at, u)                   counts u more for a request admitted at `at` (optional)
--   reconcile(key, a, b, n, at)                adds n admitted elsewhere at `at` (optional)
-- a and b are the kind's two numbers (LimitKind::redis_args); u is what the
-- request counts (1, or its cost; slot kinds ignore it). A verdict is
-- {admitted, limit, used, remaining, reset_at_us, retry_at_us}.
--
-- The same code is also a Redis Function library (library.lua): its
-- top level then runs once, at FUNCTION LOAD, so the state of one call
-- lives in the locals below, set by begin() at the start of every call.
local SEC = 1000000
-- Redis's clock for this call (us, ms).
local now, now_ms = 0, 0
-- Set by decide.lua for the kinds that hold slots.
local lease_id, lease_ms = '', 0
-- Jobs whose max_duration passed, found while deciding (kinds/jobs.lua).
local jobs_expired = 0
local KINDS = {}
-- The ledger's state for this call (see ledger_open below).
local LEDGER, ORIGIN, LCTX, CTX, LAST = false, nil, {}, nil, {0, 0}
-- The type of an event giving credits back (settle.lua: credits.settled).
local GIVEN_BACK = 'credits.refunded'

-- Starts a call: reads the clock, forgets the previous call's state.
local function begin()
  local t = redis.call('TIME')
  now = tonumber(t[1]) * SEC + tonumber(t[2])
  now_ms = math.floor(now / 1000)
  lease_id, lease_ms, jobs_expired = '', 0, 0
  LEDGER, ORIGIN, LCTX, CTX, LAST = false, nil, {}, nil, {0, 0}
  GIVEN_BACK = 'credits.refunded'
end

-- A counting verdict for a request of `units` (default 1): room while
-- used + units <= limit.
local function counted(limit, used, reset_at, retry_at, units)
  units = units or 1
  if used + units <= limit then
    return {1, limit, used + units, limit - used - units, reset_at, now}
  end
  return {0, limit, used, 0, reset_at, retry_at}
end

-- The ledger (docs/ledger.md). When it is on, the script's last key is the
-- ledger's stream (LEDGER) and every change of a credits balance, every
-- job start and end and the first refusal of a quota window is appended to
-- it by the script that makes the change (ledger_open reads its
-- arguments). ORIGIN: the exchange, {request id, route, key fingerprint}
-- or nil; LCTX: per check, {key, subject, counter id, grant, alert
-- levels}; CTX: the check being changed (set before calling a kind's
-- functions); LAST: the stream id of the last event appended, {ms, seq}.

-- Reads the ledger's arguments: n checks, from ARGV[base]: request id
-- ('' for none), route, key fingerprint, then per check: subject,
-- counter id, grant, alert levels ('l1,l2,...').
local function ledger_open(n, base)
  if #KEYS <= n then return end
  LEDGER = KEYS[n + 1]
  if ARGV[base] ~= '' then ORIGIN = {ARGV[base], ARGV[base + 1], ARGV[base + 2]} end
  for i = 1, n do
    local j = base + 3 + (i - 1) * 4
    LCTX[i] = {KEYS[i], ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]}
  end
end

-- Appends an event of type t for the check in CTX; `more`: extra fields.
local function note(t, amount, balance, more)
  if not LEDGER or not CTX then return end
  -- Whole numbers as digits (Redis would write large ones as 1.7e+15).
  local f = {'t', t, 's', CTX[2], 'c', CTX[3], 'g', CTX[4], 'a', string.format('%d', amount), 'k', CTX[1]}
  if balance then
    f[#f + 1] = 'b'
    f[#f + 1] = string.format('%d', balance)
  end
  if ORIGIN then
    f[#f + 1] = 'r'
    f[#f + 1] = ORIGIN[1]
    f[#f + 1] = 'o'
    f[#f + 1] = ORIGIN[2]
    f[#f + 1] = 'f'
    f[#f + 1] = ORIGIN[3]
  end
  if more then
    for _, v in ipairs(more) do f[#f + 1] = v end
  end
  local id = redis.call('XADD', LEDGER, '*', unpack(f))
  local ms, seq = string.match(id, '(%d+)-(%d+)')
  LAST = {tonumber(ms), tonumber(seq)}
end

-- A quota refused a request: noted once per subject until it admits again
-- (field x of the counter's hash: that time, us).
local function quota_exhausted(key, v)
  if not LEDGER then return end
  local x = tonumber(redis.call('HGET', key, 'x'))
  if x and now < x then return end
  redis.call('HSET', key, 'x', v[6])
  if redis.call('PTTL', key) < 0 then redis.call('PEXPIREAT', key, math.ceil(v[6] / 1000)) end
  note('quota.exhausted', 0, nil, {'u', string.format('%d', v[6])})
end
