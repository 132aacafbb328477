-- wrk script: round-robin over 10,000 API keys in X-Api-Key.
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", wrk.path, { ["X-Api-Key"] = "bench-key-" .. (i % 10000) })
end
