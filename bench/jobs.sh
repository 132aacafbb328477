#!/usr/bin/env bash
# What a jobs limit costs on the admit path, measured in one run.
#
# The same turnstile build twice, one worker on CPU 0 (with the upstream),
# wrk on CPU 1: "windows" has minute + daily limits on a submission route;
# "jobs" has the same plus a jobs limit, so every admitted request takes a
# pending slot, runs its exchange as its own task, has its JSON answer read
# for the job id and binds it (the upstream, nginx, answers
# {"id":"<its request id>"}). 10,000 keys round-robin; the cap is never
# reached. Runs are interleaved and repeated; the table shows medians.
#
# Usage: bench/jobs.sh   (DURATION, REPEAT as for bench/run.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8s}
REPEAT=${REPEAT:-3}
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet --bin turnstile
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
up=$(free_port); windows=$(free_port); jobs=$(free_port)

mkdir -p "$work/up"
cat > "$work/up/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $work/up/pid; error_log /dev/null crit;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$up; keepalive_requests 1000000;
  location / { default_type application/json; return 200 '{"id":"\$request_id"}'; } } }
NGINX
taskset -c 0 nginx -p "$work/up" -c "$work/up/nginx.conf" & pids+=($!)

conf() { # port, extra route line, extra limit
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
[upstream]
url = "http://127.0.0.1:$up"
[identity]
sources = ["header:x-api-key"]
keys_file = "keys.toml"
[[routes]]
name = "submit"
path = "/*"
$2
[plans.bench]
[[plans.bench.limits]]
name = "minute"
requests = 100000000
window = "1m"
[[plans.bench.limits]]
name = "daily"
requests = 1000000000
window = "1d"
$3
TOML
}
python3 - "$work/keys.toml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(10000):
        f.write(f'[[keys]]\nkey = "bench-key-{i}"\nplan = "bench"\n\n')
PY
conf "$windows" "" "" > "$work/windows.toml"
conf "$jobs" 'job = { id = "json:/id" }' '[[plans.bench.limits]]
name = "jobs"
kind = "jobs"
max = 1000000' > "$work/jobs.toml"
RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/windows.toml" & pids+=($!)
RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/jobs.toml" & pids+=($!)
for p in $up $windows $jobs; do wait_port "$p"; done
# PERF=file [PERF_TARGET=windows|jobs]: record a profile of one target under load instead.
if [ -n "${PERF:-}" ]; then
  if [ "${PERF_TARGET:-jobs}" = windows ]; then port=$windows pid=${pids[1]}; else port=$jobs pid=${pids[2]}; fi
  taskset -c 1 wrk -t1 -c64 -d10s -s bench/keys.lua "http://127.0.0.1:$port/v1/videos" >/dev/null &
  perf record -g -o "$PERF" -p "$pid" -- sleep 6 >/dev/null 2>&1
  wait
  exit 0
fi

measure() { # port -> "rps p99_ms"
  taskset -c 1 wrk -t1 -c64 -d"$DURATION" --latency -s bench/keys.lua "http://127.0.0.1:$1/v1/videos" 2>/dev/null |
    awk 'function ms(v){ if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
         /Requests\/sec/ {rps=$2} /^ +99%/ {p99=ms($2)} /Non-2xx/ {bad=$5}
         END {printf "%s %.3f %s\n", rps, p99, (bad==""?0:bad)}'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for p in $windows $jobs; do taskset -c 1 wrk -t1 -c8 -d1s -s bench/keys.lua "http://127.0.0.1:$p/" >/dev/null 2>&1; done
: > "$work/results"
for _ in $(seq "$REPEAT"); do
  echo "windows $(measure "$windows")" >> "$work/results"
  echo "jobs $(measure "$jobs")" >> "$work/results"
done
printf '\n%-8s %10s %9s %8s\n' config 'req/s' 'p99 ms' 'non-2xx'
for c in windows jobs; do
  rps=$(awk -v c=$c '$1==c {print $2}' "$work/results" | median)
  p99=$(awk -v c=$c '$1==c {print $3}' "$work/results" | median)
  bad=$(awk -v c=$c '$1==c {print $4}' "$work/results" | median)
  printf '%-8s %10.0f %9.3f %8.0f\n' "$c" "$rps" "$p99" "$bad"
  eval "rps_$c=$rps"
done
python3 -c "print('jobs / windows: %.2fx the requests per second' % ($rps_jobs / $rps_windows))"
echo "($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); wrk -t1 -c64, $DURATION x $REPEAT, medians)"
