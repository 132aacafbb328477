-- wrk script: POST a JSON body of BODY_BYTES (default 1024) naming a model,
-- round-robin over 10,000 API keys in X-Api-Key.
local size = tonumber(os.getenv("BODY_BYTES") or "1024")
local head = '{"model":"flux-pro","n":1,"prompt":"'
local tail = '"}'
local body = head .. string.rep("a", math.max(0, size - #head - #tail)) .. tail
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", wrk.path, {
    ["X-Api-Key"] = "bench-key-" .. (i % 10000),
    ["Content-Type"] = "application/json",
  }, body)
end
