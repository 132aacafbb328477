
redis.register_function('turnstile_decide', function(keys, args)
  KEYS, ARGV = keys, args
  return decide()
end)
