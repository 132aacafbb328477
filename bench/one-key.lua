-- wrk script: every request with the same API key (the refuse path).
request = function()
  return wrk.format("GET", wrk.path, { ["X-Api-Key"] = "bench-key-refused" })
end
