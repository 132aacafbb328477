-- wrk script: 1,000,000 distinct API keys (cold counters).
local i = math.random(0, 999999)
request = function()
  i = (i + 7919) % 1000000
  return wrk.format("GET", wrk.path, { ["X-Api-Key"] = "cold-key-" .. i })
end
