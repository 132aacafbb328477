#!/usr/bin/env bash
# Redis mode vs memory mode, measured in the same run on this machine:
# the bundled mock upstream, turnstile (release) in each mode with the same
# policy (minute + daily limits, never reached, 10,000 keys), wrk with 64
# keep-alive connections, runs interleaved and repeated. Loopback only;
# every run is bounded in time; everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
REPEAT=${REPEAT:-3}
for tool in wrk redis-server; do
  command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install -y wrk redis-server" >&2; exit 1; }
done
cargo build --release --quiet --bin turnstile

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

up=$(free_port); redis=$(free_port); mem=$(free_port); red=$(free_port)
./target/release/turnstile example-api --listen 127.0.0.1:$up >/dev/null & pids+=($!)
redis-server --port "$redis" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & pids+=($!)
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
RUST_LOG=warn ./target/release/turnstile --config "$work/memory.toml" 2>/dev/null & pids+=($!)
RUST_LOG=warn ./target/release/turnstile --config "$work/redis.toml" 2>/dev/null & pids+=($!)
wait_port "$mem"; wait_port "$red"

run() { # port -> "req/s p50 p99"
  wrk -t1 -c64 -d"$DURATION" --latency -s bench/keys.lua "http://127.0.0.1:$1/v1/jobs/1" |
    awk '/Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} END {print rps, p50, p99}'
}
printf '%-8s %-3s %12s %10s %10s\n' mode run req/s p50 p99
declare -A total
for r in $(seq "$REPEAT"); do
  for mode in memory redis; do
    port=$mem; [ "$mode" = redis ] && port=$red
    read -r rps p50 p99 < <(run "$port")
    printf '%-8s %-3s %12s %10s %10s\n' "$mode" "$r" "$rps" "$p50" "$p99"
    total[$mode]=$(python3 -c "print(${total[$mode]:-0} + $rps)")
  done
done
python3 -c "print('redis / memory req/s: %.2f' % (${total[redis]} / ${total[memory]}))"
