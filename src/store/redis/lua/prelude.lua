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
local SEC = 1000000
local t = redis.call('TIME')
local now = tonumber(t[1]) * SEC + tonumber(t[2])
local now_ms = math.floor(now / 1000)
-- Set by decide.lua for the kinds that hold slots.
local lease_id, lease_ms = '', 0
-- Jobs whose max_duration passed, found while deciding (kinds/jobs.lua).
local jobs_expired = 0
local KINDS = {}

-- A counting verdict for a request of `units` (default 1): room while
-- used + units <= limit.
local function counted(limit, used, reset_at, retry_at, units)
  units = units or 1
  if used + units <= limit then
    return {1, limit, used + units, limit - used - units, reset_at, now}
  end
  return {0, limit, used, 0, reset_at, retry_at}
end
