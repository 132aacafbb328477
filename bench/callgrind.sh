#!/usr/bin/env bash
# Instructions per request, counted by callgrind: repeatable where timings
# are not (they do not depend on what else shares the cores).
#
# turnstile (--threads 1) with minute + daily + concurrency limits for one
# key, the bundled example API as upstream, a keep-alive Python client.
# Each scenario runs twice, with 200 and 2,200 requests; the difference in
# instructions divided by 2,000 is the cost of one request, start-up and
# shutdown cancelled out.
#
#   admit   every request forwarded
#   refuse  every request refused with 429 (one request a minute allowed)
#
# Usage: bench/callgrind.sh [BIN]   (default target/release/turnstile;
# BASELINE=/path/to/another/build adds its figures and the ratio;
# EXTRA_TOML="..." is appended to both configs, e.g. a [telemetry] table;
# STORE=redis counts in a redis-server started for the run: turnstile's
# own instructions per request in Redis mode)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need_tools valgrind:valgrind
BIN=${1:-target/release/turnstile}
[ "$BIN" = target/release/turnstile ] && cargo build --release --quiet --bin turnstile
BIN=$(realpath "$BIN")
BASELINE=${BASELINE:+$(realpath "$BASELINE")}
up=$(free_port) port=$(free_port)
"$BIN" example-api --listen "127.0.0.1:$up" >/dev/null 2>&1 & pids+=($!)
wait_port "$up"
STORE_TOML=
if [ "${STORE:-memory}" = redis ]; then
  need_tools redis-server:redis-server
  redis=$(free_port)
  redis-server --port "$redis" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & pids+=($!)
  wait_port "$redis"
  # A timeout far above callgrind's slowdown: no call may fall back.
  STORE_TOML=$(printf '[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:%s"\ntimeout = "10s"' "$redis")
fi

cat > "$work/client.py" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("GET", "/v1/jobs/1", headers={"X-Api-Key": "bench-key"})
    c.getresponse().read()
PY
printf '[[keys]]\nkey = "bench-key"\nplan = "bench"\n' > "$work/keys.toml"
conf() { # minute limit
  cat <<TOML
[server]
listen = "127.0.0.1:$port"
[upstream]
url = "http://127.0.0.1:$up"
[identity]
keys_file = "keys.toml"
[[routes]]
name = "status"
path = "/v1/jobs/{id}"
[plans.bench]
[[plans.bench.limits]]
name = "minute"
requests = $1
window = "1m"
[[plans.bench.limits]]
name = "daily"
requests = 100000000
window = "1d"
[[plans.bench.limits]]
name = "conc"
kind = "concurrency"
max = 64
$STORE_TOML
${EXTRA_TOML:-}
TOML
}
conf 100000000 > "$work/admit.toml"
conf 1 > "$work/refuse.toml"

count() { # bin, config, requests -> instructions
  local out="$work/cg.$RANDOM"
  (cd "$work" && RUST_LOG=off exec valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$1" --config "$2" --threads 1 >/dev/null 2>&1) &
  local vg=$!
  wait_port "$port"
  python3 "$work/client.py" "$port" "$3"
  kill -INT "$vg"; wait "$vg" || true
  awk '/^summary:/ {print $2}' "$out"
}
per_request() { # bin, config
  local small big
  small=$(count "$1" "$2" 200)
  big=$(count "$1" "$2" 2200)
  echo $(( (big - small) / 2000 ))
}
printf '%-8s %14s' scenario 'instr/request'
[ -n "$BASELINE" ] && printf ' %14s %7s' baseline ratio
echo
for s in admit refuse; do
  n=$(per_request "$BIN" "$work/$s.toml")
  printf '%-8s %14s' "$s" "$n"
  if [ -n "$BASELINE" ]; then
    b=$(per_request "$BASELINE" "$work/$s.toml")
    printf ' %14s %7s' "$b" "$(python3 -c "print(f'{$n/$b:.3f}x')")"
  fi
  echo
done
