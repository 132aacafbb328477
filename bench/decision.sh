#!/usr/bin/env bash
# What a decision costs, beside the proxy path for the same limits, in one run.
#
# One turnstile build, one worker on CPU 0 (with nginx as the upstream of
# the proxy path), the load generator on CPU 1; minute + daily limits over
# 10,000 keys, never reached. Three paths, interleaved and repeated:
#
#   proxy  wrk → turnstile's proxy → nginx (the request forwarded)
#   http   wrk → [decision] listen, Traefik's convention (X-Forwarded-Method
#          and X-Forwarded-Uri), answered 200 with the headers
#   grpc   examples/rls_load (tonic, 4 HTTP/2 connections × 16 streams) →
#          [decision] grpc_listen, Envoy's ShouldRateLimit
#
# REDIS=1: the redis backend, redis-server on CPU 0 too (what a fleet pays).
#
# Usage: bench/decision.sh   (DURATION in seconds, REPEAT, REDIS)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
REPEAT=${REPEAT:-3}
. bench/lib.sh
need_tools nginx:nginx-light wrk:wrk
[ -n "${REDIS:-}" ] && need_tools redis-server:redis-server
cargo build --release --quiet --bin turnstile --example rls_load
up=$(free_port) proxy=$(free_port) http=$(free_port) grpc=$(free_port)

upstream_nginx "$up" '{"ok":true}'

store=""
if [ -n "${REDIS:-}" ]; then
  redis=$(free_port)
  taskset -c 0 redis-server --port "$redis" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & pids+=($!)
  wait_port "$redis"
  store=$'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:'"$redis"$'"\ntimeout = "2s"'
fi
cat > "$work/t.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy"
[upstream]
url = "http://127.0.0.1:$up"
[decision]
listen = "127.0.0.1:$http"
grpc_listen = "127.0.0.1:$grpc"
[decision.envoy]
domain = "bench"
$store
[identity]
sources = ["header:x-api-key"]
keys_file = "keys.toml"
[[routes]]
name = "submit"
path = "/*"
[plans.bench]
[[plans.bench.limits]]
name = "minute"
requests = 100000000
window = "1m"
[[plans.bench.limits]]
name = "daily"
requests = 1000000000
window = "1d"
TOML
bench_keys "$work/keys.toml"
cat > "$work/forward-auth.lua" <<'LUA'
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/", { ["X-Api-Key"] = "bench-key-" .. (i % 10000),
    ["X-Forwarded-Method"] = "POST", ["X-Forwarded-Uri"] = "/v1/videos" })
end
LUA
RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/t.toml" & pids+=($!)
for p in $up $proxy $http $grpc; do wait_port "$p"; done

measure() {
  case $1 in
    proxy) wrk_run "http://127.0.0.1:$proxy/v1/videos" bench/keys.lua ;;
    http) wrk_run "http://127.0.0.1:$http/" "$work/forward-auth.lua" ;;
    grpc) taskset -c 1 ./target/release/examples/rls_load "127.0.0.1:$grpc" 10000 4 16 "$DURATION" ;;
  esac
}
for path in proxy http grpc; do DURATION=1 measure "$path" >/dev/null; done
: > "$work/results"
for _ in $(seq "$REPEAT"); do
  for path in proxy http grpc; do echo "$path $(measure "$path")" >> "$work/results"; done
done
printf '\n%-8s %10s %9s %8s\n' path 'req/s' 'p99 ms' 'refused'
declare -A rps
for path in proxy http grpc; do
  r=$(awk -v c="$path" '$1==c {print $2}' "$work/results" | median)
  p=$(awk -v c="$path" '$1==c {print $3}' "$work/results" | median)
  b=$(awk -v c="$path" '$1==c {print $4}' "$work/results" | median)
  printf '%-8s %10.0f %9.3f %8.0f\n' "$path" "$r" "$p" "$b"
  rps[$path]=$r
done
python3 - "${rps[proxy]}" "${rps[http]}" "${rps[grpc]}" <<'PY'
import sys
proxy, http, grpc = map(float, sys.argv[1:])
print(f"http decision / proxy: {http / proxy:.2f}x the requests per second")
print(f"grpc decision / proxy: {grpc / proxy:.2f}x")
PY
[ -n "${REDIS:-}" ] && echo "redis backend: redis-server shares CPU 0"
echo "($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); turnstile on one core, load on the other; ${DURATION}s x $REPEAT, medians)"
