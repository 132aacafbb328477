#!/usr/bin/env bash
# Redis mode vs memory mode, measured in the same run on this machine:
# the bundled mock upstream, turnstile (release) in each mode with the same
# policy (minute + daily limits, never reached, 10,000 keys), wrk with 64
# keep-alive connections, runs interleaved and repeated. Loopback only;
# every run is bounded in time; everything started is stopped on exit.
#
# BASELINE=/path/to/another/build adds that build in Redis mode ("baseline",
# its own key prefix, the same redis-server), interleaved with the others.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
REPEAT=${REPEAT:-3}
. bench/lib.sh
need_tools wrk:wrk redis-server:redis-server
cargo build --release --quiet --bin turnstile

up=$(free_port); redis=$(free_port); mem=$(free_port); red=$(free_port)
./target/release/turnstile example-api --listen 127.0.0.1:$up >/dev/null & pids+=($!)
redis-server --port "$redis" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & pids+=($!); redis_pid=$!
wait_port "$up"; wait_port "$redis"

policy() {
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
[upstream]
url = "http://127.0.0.1:$up"
$2
[[routes]]
name = "job"
path = "/v1/jobs/{id}"
[plans.bench]
[[plans.bench.limits]]
name = "minute"
requests = 1000000
window = "1m"
[[plans.bench.limits]]
name = "daily"
requests = 100000000
window = "1d"
TOML
}
policy "$mem" "" > "$work/memory.toml"
policy "$red" "[store]
backend = \"redis\"
url = \"redis://127.0.0.1:$redis\"
timeout = \"200ms\"" > "$work/redis.toml"
RUST_LOG=warn ./target/release/turnstile --config "$work/memory.toml" 2>/dev/null & pids+=($!); mem_pid=$!
RUST_LOG=warn ./target/release/turnstile --config "$work/redis.toml" 2>/dev/null & pids+=($!); red_pid=$!
wait_port "$mem"; wait_port "$red"
modes="memory redis"
if [ -n "${BASELINE:-}" ]; then
  base=$(free_port)
  policy "$base" "[store]
backend = \"redis\"
url = \"redis://127.0.0.1:$redis\"
prefix = \"baseline:\"
timeout = \"200ms\"" > "$work/baseline.toml"
  RUST_LOG=warn "$BASELINE" --config "$work/baseline.toml" 2>/dev/null & pids+=($!); base_pid=$!
  wait_port "$base"
  modes="memory redis baseline"
fi

hz=$(getconf CLK_TCK)
ticks() { cpu_ticks "$1" | awk '{print $1 + $2}'; }
run() { # port turnstile-pid -> "req/s p50 p99 turnstile-CPU-us redis-CPU-us" (CPU per request)
  local t0 r0 t1 r1
  t0=$(ticks "$2"); r0=$(ticks "$redis_pid")
  wrk -t1 -c64 -d"$DURATION" --latency -s bench/keys.lua "http://127.0.0.1:$1/v1/jobs/1" > "$work/wrk.out"
  t1=$(ticks "$2"); r1=$(ticks "$redis_pid")
  awk -v t="$((t1 - t0))" -v r="$((r1 - r0))" -v hz="$hz" \
    '/requests in/ {n=$1} /Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2}
     END {n=(n>0?n:1); printf "%s %s %s %.2f %.2f\n", rps, p50, p99, t*1e6/hz/n, r*1e6/hz/n}' "$work/wrk.out"
}
printf '%-8s %-3s %12s %10s %10s %14s %12s\n' mode run req/s p50 p99 'turnstile CPU' 'redis CPU'
declare -A total
for r in $(seq "$REPEAT"); do
  for mode in $modes; do
    port=$mem pid=$mem_pid; [ "$mode" = redis ] && port=$red pid=$red_pid
    [ "$mode" = baseline ] && port=$base pid=$base_pid
    read -r rps p50 p99 tcpu rcpu < <(run "$port" "$pid")
    printf '%-8s %-3s %12s %10s %10s %11s us %9s us\n' "$mode" "$r" "$rps" "$p50" "$p99" "$tcpu" "$rcpu"
    total[$mode]=$(python3 -c "print(${total[$mode]:-0} + $rps)")
  done
done
python3 -c "print('redis / memory req/s: %.2f' % (${total[redis]} / ${total[memory]}))"
[ -n "${BASELINE:-}" ] && python3 -c "print('redis / baseline (redis) req/s: %.2f' % (${total[redis]} / ${total[baseline]}))"
echo "(CPU per request: the turnstile process and redis-server; $(nproc) cores, every process sharing them)"
