#!/usr/bin/env bash
# What each pipeline feature costs on the admit path, measured in one run.
#
# The same turnstile build, one worker on CPU 0 (with the upstream, nginx
# answering {"id":"<its request id>"}), wrk on CPU 1, POSTing a JSON body
# that names a model (bench/post.lua), 10,000 keys round-robin, no limit
# ever reached. One config per feature, each the baseline plus that feature:
#
#   windows  minute + daily limits (the baseline)
#   jobs     + a jobs limit: every request takes a pending slot, runs its
#            exchange as its own task, has its answer read for the id, binds it
#   priced   + cost by model from the JSON body, a credits balance, and the
#            daily limit counting cost: the body is read and parsed to price
#   when     + a json: condition on the route: the body is read and parsed to route
#   access   + [log] access = true, JSON lines written (to /dev/null) by the
#            writer thread, which shares CPU 0 with the worker
#   runtime  the baseline with the same 10,000 keys as runtime keys
#            ([identity] key_store, a SQLite file made here) instead of the
#            keys file: what a runtime key costs on the request path
#
# windows and when run with a 1 KB and a 16 KB body: the difference between
# their extra costs is what reading and parsing a body costs per KB. Runs are
# interleaved and repeated; the table shows medians.
#
# Usage: bench/features.sh   (DURATION, REPEAT as for bench/run.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8s}
REPEAT=${REPEAT:-3}
. bench/lib.sh
need_tools nginx:nginx-light wrk:wrk
cargo build --release --quiet --bin turnstile
up=$(free_port)

upstream_nginx "$up" '{"id":"$request_id"}'

conf() { # port, extra route lines, daily's extra line, extra limits
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
$4
TOML
}
bench_keys "$work/keys.toml"
# The same keys as runtime keys: the table turnstile's SQLite store reads.
python3 - "$work/keys.db" <<'PY'
import hashlib, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("CREATE TABLE keys (digest BLOB PRIMARY KEY, account TEXT NOT NULL, plan TEXT NOT NULL, name TEXT, created INTEGER NOT NULL, expires_at INTEGER, revoked INTEGER NOT NULL DEFAULT 0)")
db.executemany("INSERT INTO keys VALUES (?, ?, 'bench', NULL, 0, NULL, 0)",
               [(hashlib.sha256(f"bench-key-{i}".encode()).digest(), f"acct-{i}") for i in range(10000)])
db.commit()
PY
: > "$work/empty-keys.toml"
declare -A port
for c in windows jobs priced when access runtime; do port[$c]=$(free_port); done
conf "${port[windows]}" "" "" "" > "$work/windows.toml"
conf "${port[jobs]}" 'job = { id = "json:/id" }' "" '[[plans.bench.limits]]
name = "jobs"
kind = "jobs"
max = 1000000' > "$work/jobs.toml"
conf "${port[priced]}" 'cost = { by = "json:/model", prices = { "flux-pro" = 8, "veo-3" = 40 }, default = 2 }' 'count = "cost"' '[[plans.bench.limits]]
name = "credits"
kind = "credits"
grant = 4000000000' > "$work/priced.toml"
conf "${port[when]}" 'when = { "json:/model" = ["flux-pro", "veo-3"] }' "" "" > "$work/when.toml"
conf "${port[access]}" "" "" "" | sed 's/^\[server\]$/[log]\naccess = true\n[server]/' > "$work/access.toml"
conf "${port[runtime]}" "" "" "" | sed 's/^keys_file = "keys.toml"$/keys_file = "empty-keys.toml"\nkey_store = "keys.db"/' > "$work/runtime.toml"
declare -A pid
for c in windows jobs priced when runtime; do
  RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/$c.toml" & pids+=($!); pid[$c]=$!
done
RUST_LOG=info taskset -c 0 ./target/release/turnstile --threads 1 --log-format json --config "$work/access.toml" >/dev/null 2>&1 & pids+=($!); pid[access]=$!
for p in $up "${port[@]}"; do wait_port "$p"; done
# PERF=file [PERF_TARGET=windows|jobs|priced|when]: record a profile of one target under load instead.
if [ -n "${PERF:-}" ]; then
  target=${PERF_TARGET:-jobs}
  taskset -c 1 wrk -t1 -c64 -d10s -s bench/post.lua "http://127.0.0.1:${port[$target]}/v1/videos" >/dev/null &
  perf record -g -o "$PERF" -p "${pid[$target]}" -- sleep 6 >/dev/null 2>&1
  wait
  exit 0
fi

measure() { # port, body bytes -> "rps p99_ms non2xx"
  BODY_BYTES=$2 taskset -c 1 wrk -t1 -c64 -d"$DURATION" --latency -s bench/post.lua "http://127.0.0.1:$1/v1/videos" 2>/dev/null |
    awk 'function ms(v){ if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
         /Requests\/sec/ {rps=$2} /^ +99%/ {p99=ms($2)} /Non-2xx/ {bad=$5}
         END {printf "%s %.3f %s\n", rps, p99, (bad==""?0:bad)}'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
runs="windows:1024 jobs:1024 priced:1024 when:1024 access:1024 runtime:1024 windows:16384 when:16384"
for c in windows jobs priced when access runtime; do BODY_BYTES=1024 taskset -c 1 wrk -t1 -c8 -d1s -s bench/post.lua "http://127.0.0.1:${port[$c]}/" >/dev/null 2>&1; done
: > "$work/results"
for _ in $(seq "$REPEAT"); do
  for run in $runs; do
    c=${run%%:*} size=${run##*:}
    echo "$c@$size $(measure "${port[$c]}" "$size")" >> "$work/results"
  done
done
printf '\n%-14s %10s %9s %8s\n' config 'req/s' 'p99 ms' 'non-2xx'
declare -A rps
for run in $runs; do
  key="${run%%:*}@${run##*:}"
  r=$(awk -v c="$key" '$1==c {print $2}' "$work/results" | median)
  p=$(awk -v c="$key" '$1==c {print $3}' "$work/results" | median)
  b=$(awk -v c="$key" '$1==c {print $4}' "$work/results" | median)
  printf '%-14s %10.0f %9.3f %8.0f\n' "$key" "$r" "$p" "$b"
  rps[$key]=$r
done
python3 - "${rps[windows@1024]}" "${rps[jobs@1024]}" "${rps[priced@1024]}" "${rps[when@1024]}" "${rps[windows@16384]}" "${rps[when@16384]}" "${rps[access@1024]}" "${rps[runtime@1024]}" <<'PY'
import sys
w1, j1, p1, c1, w16, c16, a1, r1 = map(float, sys.argv[1:])
print(f"runtime / windows: {r1 / w1:.2f}x (the same keys as runtime keys instead of the keys file)")
print(f"access / windows: {a1 / w1:.2f}x (one JSON access line per request)")
print(f"jobs / windows:   {j1 / w1:.2f}x the requests per second (1 KB body)")
print(f"priced / windows: {p1 / w1:.2f}x (cost by model from the body, credits, daily counting cost)")
print(f"when / windows:   {c1 / w1:.2f}x with a 1 KB body, {c16 / w16:.2f}x with 16 KB")
extra1 = 1e6 / c1 - 1e6 / w1
extra16 = 1e6 / c16 - 1e6 / w16
print(f"a json: condition costs {extra1:.1f} us per request at 1 KB, {extra16:.1f} us at 16 KB: {(extra16 - extra1) / 15:.2f} us per extra KB")
PY
echo "($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); wrk -t1 -c64, $DURATION x $REPEAT, medians)"
