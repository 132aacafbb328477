#!/usr/bin/env bash
# What the ledger costs on the admit path of a credits route, in one run:
# three turnstile instances of one build (no ledger, durable = "interval",
# durable = "sync"), each one worker on CPU 0, nginx upstream on CPU 0, wrk
# on CPU 1; a credits balance per key over 10,000 keys (every request is
# one credits.charged event). The runs are interleaved and repeated; then
# the commits (flushes) per second of the sync instance under load, the
# bytes per event on disk, and the time to rebuild balances from a ledger
# of 1,000,000 events (examples/ledger_rebuild).
#
# With STORE=redis the three instances keep their balances in one
# redis-server (each under its own key prefix, so each ledger has its own
# stream), also on CPU 0; the figures after the table are then skipped.
#
# Usage: bench/ledger.sh   (DURATION in seconds, REPEAT, EVENTS, STORE)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
REPEAT=${REPEAT:-3}
EVENTS=${EVENTS:-1000000}
STORE=${STORE:-memory}
. bench/lib.sh
need_tools nginx:nginx-light wrk:wrk
if [ "$STORE" = redis ]; then
  need_tools redis-server:redis-server
  redis=$(free_port)
  taskset -c 0 redis-server --port "$redis" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & pids+=($!)
  wait_port "$redis"
fi
cargo build --release --quiet --bin turnstile --example ledger_rebuild
up=$(free_port)
upstream_nginx "$up" '{"ok":true}'
bench_keys "$work/keys.toml"

declare -A port admin
for mode in none interval sync; do
  port[$mode]=$(free_port) admin[$mode]=$(free_port)
  mkdir -p "$work/$mode"
  cp "$work/keys.toml" "$work/$mode/"
  ledger=""
  if [ "$mode" != none ]; then
    ledger=$'[ledger]\npath = "ledger.db"\ndurable = "'"$mode"$'"'
  fi
  store=""
  if [ "$STORE" = redis ]; then
    store=$'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:'"$redis"$'"\nprefix = "'"$mode"$':"\ntimeout = "200ms"'
  fi
  cat > "$work/$mode/t.toml" <<TOML
$store
[server]
listen = "127.0.0.1:${port[$mode]}"
[upstream]
url = "http://127.0.0.1:$up"
[admin]
listen = "127.0.0.1:${admin[$mode]}"
[identity]
sources = ["header:x-api-key"]
keys_file = "keys.toml"
$ledger
[[routes]]
name = "paid"
path = "/paid"
[plans.bench]
[[plans.bench.limits]]
name = "credits"
kind = "credits"
grant = 1000000000
TOML
  RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/$mode/t.toml" & pids+=($!)
done
wait_port "$up"
for mode in none interval sync; do wait_port "${port[$mode]}"; wait_port "${admin[$mode]}"; done

commits() { curl -s "127.0.0.1:${admin[sync]}/metrics" | awk '/^turnstile_ledger_commits_total/ {print $2}'; }
for mode in none interval sync; do DURATION=1 wrk_run "http://127.0.0.1:${port[$mode]}/paid" bench/keys.lua >/dev/null; done
: > "$work/results"
for _ in $(seq "$REPEAT"); do
  for mode in none interval sync; do
    before=$(commits)
    line=$(wrk_run "http://127.0.0.1:${port[$mode]}/paid" bench/keys.lua)
    after=$(commits)
    echo "$mode $line $(( (${after%.*} - ${before%.*}) / DURATION ))" >> "$work/results"
  done
done
printf '\n%-9s %10s %9s %8s\n' ledger 'req/s' 'p99 ms' 'refused'
declare -A rps
for mode in none interval sync; do
  r=$(awk -v c="$mode" '$1==c {print $2}' "$work/results" | median)
  p=$(awk -v c="$mode" '$1==c {print $3}' "$work/results" | median)
  b=$(awk -v c="$mode" '$1==c {print $4}' "$work/results" | median)
  printf '%-9s %10.0f %9.3f %8.0f\n' "$mode" "$r" "$p" "$b"
  rps[$mode]=$r
done
fsyncs=$(awk '$1=="sync" {print $5}' "$work/results" | median)
python3 - "${rps[none]}" "${rps[interval]}" "${rps[sync]}" "$fsyncs" <<'PY'
import sys
none, interval, sync, fsyncs = map(float, sys.argv[1:])
print(f"interval / none: {interval / none:.3f}x   sync / none: {sync / none:.3f}x the requests per second")
print(f"sync under load: {fsyncs:.0f} commits (flushes) per second, {sync / max(fsyncs, 1):.0f} events per flush")
PY
[ "$STORE" = redis ] && exit 0
for mode in interval sync; do kill -TERM "$(pgrep -f "$work/$mode/t.toml")" 2>/dev/null || true; done
sleep 1
python3 - "$work/sync/ledger.db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
n = c.execute("select count(*) from events").fetchone()[0]
pages, size = c.execute("pragma page_count").fetchone()[0], c.execute("pragma page_size").fetchone()[0]
body = c.execute("select avg(length(body)) from events").fetchone()[0]
print(f"on disk: {n} events, {pages * size / n:.0f} bytes per event (its JSON {body:.0f} bytes)")
PY
./target/release/examples/ledger_rebuild "$EVENTS" "$work/rebuild.db"
