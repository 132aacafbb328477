#!lua name=turnstile
-- The decision as a Redis Function library (Redis 7): FUNCTION LOAD once,
-- then FCALL, so the prelude and the kinds are defined once rather than on
-- every call (an EVALSHA script runs its whole text each time). Assembled
-- as: this head, the prelude, the kinds, decide.lua, library.lua. KEYS and
-- ARGV are the call's (a function receives them as arguments).
local KEYS, ARGV = {}, {}
