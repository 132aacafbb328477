#!/usr/bin/env bash
# What a capacity pool costs on the admit path, and how fast a freed slot
# reaches the next waiter, in one run.
#
# Admit path: one turnstile build, one worker on CPU 0 with nginx as the
# upstream, wrk on CPU 1; minute + daily limits over 10,000 keys, never
# reached. Two routes, interleaved and repeated: `plain` (the limits only)
# and `pooled` (the same limits and a [[capacity]] pool so large that no
# request waits: the cost of taking and giving back a slot).
# REDIS=1: the redis backend, redis-server on CPU 0 too.
#
# Wake-up: examples/capacity_wakeup, 200 rounds of "a slot freed, the next
# waiter holds it": in memory, through Redis on one instance, and across
# two instances (two stores on one Redis).
#
# Usage: bench/capacity.sh   (DURATION in seconds, REPEAT, REDIS)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
REPEAT=${REPEAT:-3}
. bench/lib.sh
need_tools nginx:nginx-light wrk:wrk redis-server:redis-server
cargo build --release --quiet --bin turnstile --example capacity_wakeup
up=$(free_port) proxy=$(free_port) redis=$(free_port)

upstream_nginx "$up" '{"ok":true}'
taskset -c 0 redis-server --port "$redis" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & pids+=($!)
wait_port "$redis"
store=""
if [ -n "${REDIS:-}" ]; then
  store=$'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:'"$redis"$'"\ntimeout = "2s"'
fi
cat > "$work/t.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy"
[upstream]
url = "http://127.0.0.1:$up"
$store
[identity]
sources = ["header:x-api-key"]
keys_file = "keys.toml"
[[routes]]
name = "plain"
path = "/plain"
[[routes]]
name = "pooled"
path = "/pooled"
[[capacity]]
name = "gpu"
max = 1000000
routes = ["pooled"]
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
RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/t.toml" & pids+=($!)
for p in $up $proxy; do wait_port "$p"; done

for route in plain pooled; do DURATION=1 wrk_run "http://127.0.0.1:$proxy/$route" bench/keys.lua >/dev/null; done
: > "$work/results"
for _ in $(seq "$REPEAT"); do
  for route in plain pooled; do echo "$route $(wrk_run "http://127.0.0.1:$proxy/$route" bench/keys.lua)" >> "$work/results"; done
done
printf '\n%-8s %10s %9s %8s\n' route 'req/s' 'p99 ms' 'refused'
declare -A rps
for route in plain pooled; do
  r=$(awk -v c="$route" '$1==c {print $2}' "$work/results" | median)
  p=$(awk -v c="$route" '$1==c {print $3}' "$work/results" | median)
  b=$(awk -v c="$route" '$1==c {print $4}' "$work/results" | median)
  printf '%-8s %10.0f %9.3f %8.0f\n' "$route" "$r" "$p" "$b"
  rps[$route]=$r
done
python3 -c "import sys; print(f'pooled / plain: {float(sys.argv[2]) / float(sys.argv[1]):.3f}x the requests per second')" "${rps[plain]}" "${rps[pooled]}"
echo "backend: ${REDIS:+redis (redis-server shares CPU 0)}${REDIS:-memory}"

printf '\n%-14s %9s %9s\n' wake-up 'p50 us' 'p99 us'
taskset -c 1 ./target/release/examples/capacity_wakeup 200 "redis://127.0.0.1:$redis" |
  awk '{printf "%-14s %9s %9s\n", $1, $2, $3}'
echo "($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); turnstile on one core, load on the other; ${DURATION}s x $REPEAT, medians)"
