#!/usr/bin/env bash
# turnstile against nginx and HAProxy doing the same job, measured in one run.
#
# A fast upstream (nginx returning 200) alone, nginx (proxy_pass + limit_req +
# limit_conn keyed on X-Api-Key), HAProxy (stick table), and turnstile
# (release; 1 worker thread, and a 2-worker variant). Each proxy and the
# upstream share CPU 0; wrk runs on CPU 1 with 64 keep-alive connections.
# Runs are interleaved and repeated; the table shows medians.
#
# Scenarios:
#   admit   minute + daily + concurrency limits, 10,000 keys, never reached
#   refuse  every request refused with 429 (one key over its limit)
#   cold    1,000,000 distinct keys (cold counters)
#
# Usage: bench/run.sh [--smoke]   (--smoke: 1 run of 1 s each, for CI)
# BASELINE=/path/to/an/older/turnstile adds it as a target ("baseline", 1
# worker), to measure a change against the build before it in the same run.
# Traffic goes to 127.0.0.1 only; every run is bounded; everything started
# here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
REPEAT=${REPEAT:-3}
SCENARIOS=${SCENARIOS:-admit refuse cold}
if [ "${1:-}" = "--smoke" ]; then DURATION=1s; REPEAT=1; fi

. bench/lib.sh
need_tools nginx:nginx-light haproxy:haproxy wrk:wrk
cargo build --release --quiet --bin turnstile


up=$(free_port); ngx=$(free_port); hap=$(free_port); ts1=$(free_port); ts2=$(free_port); base=$(free_port)
BASELINE=${BASELINE:-}
targets="upstream nginx haproxy turnstile turnstile-2w${BASELINE:+ baseline}"

# The fast upstream: nginx answering 200 itself.
mkdir -p "$work/up" "$work/ngx"
cat > "$work/up/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $work/up/pid; error_log /dev/null crit;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$up; keepalive_requests 1000000;
  location / { return 200 '{"ok":true}'; } } }
NGINX
taskset -c 0 nginx -p "$work/up" -c "$work/up/nginx.conf" & pids+=($!); up_pid=$!

# nginx with the equivalent policy (per-key rate limit + concurrent cap).
nginx_conf() { # rate, burst ("" for none)
  local burst=""
  [ -n "$2" ] && burst="burst=$2"
  cat <<NGINX
worker_processes 1; daemon off; pid $work/ngx/pid; error_log /dev/null crit;
events { worker_connections 4096; }
http { access_log off;
  limit_req_zone \$http_x_api_key zone=minute:64m rate=$1;
  limit_conn_zone \$http_x_api_key zone=conc:64m;
  limit_req_status 429; limit_conn_status 429;
  upstream backend { server 127.0.0.1:$up; keepalive 64; }
  server { listen 127.0.0.1:$ngx; keepalive_requests 1000000;
    location / { limit_req zone=minute $burst nodelay; limit_conn conc 10000;
      proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NGINX
}

haproxy_conf() { # max requests per 60 s
  cat <<HAP
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$hap
  stick-table type string len 64 size 2m expire 24h store http_req_rate(60s),conn_cur
  http-request track-sc0 req.hdr(X-Api-Key)
  http-request deny deny_status 429 if { sc_http_req_rate(0) gt $1 }
  default_backend be
backend be
  http-reuse always
  server up 127.0.0.1:$up
HAP
}

turnstile_conf() { # port, minute requests, keys file line
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
[upstream]
url = "http://127.0.0.1:$up"
[identity]
sources = ["header:x-api-key"]
$3
[[routes]]
name = "api"
path = "/*"
[plans.bench]
[[plans.bench.limits]]
name = "minute"
requests = $2
window = "1m"
[[plans.bench.limits]]
name = "daily"
requests = 1000000000
window = "1d"
[[plans.bench.limits]]
name = "concurrent"
kind = "concurrency"
max = 10000
TOML
}
python3 - "$work/keys.toml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(10000):
        f.write(f'[[keys]]\nkey = "bench-key-{i}"\nplan = "bench"\n\n')
    f.write('[[keys]]\nkey = "bench-key-refused"\nplan = "bench"\n')
PY

start_proxies() { # scenario
  local minute=100000000 rate="100000000r/m" burst=100000000 hap_max=100000000 keys="keys_file = \"keys.toml\""
  if [ "$1" = refuse ]; then minute=1; rate="1r/m"; burst=""; hap_max=1; fi
  if [ "$1" = cold ]; then keys='default_plan = "bench"'; fi
  nginx_conf "$rate" "$burst" > "$work/ngx/nginx.conf"
  haproxy_conf "$hap_max" > "$work/haproxy.cfg"
  turnstile_conf "$ts1" "$minute" "$keys" > "$work/t1.toml"
  turnstile_conf "$ts2" "$minute" "$keys" > "$work/t2.toml"
  taskset -c 0 nginx -p "$work/ngx" -c "$work/ngx/nginx.conf" & proxy_pids=($!)
  taskset -c 0 haproxy -q -f "$work/haproxy.cfg" & proxy_pids+=($!)
  RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/t1.toml" & proxy_pids+=($!)
  RUST_LOG=off taskset -c 0,1 ./target/release/turnstile --threads 2 --config "$work/t2.toml" & proxy_pids+=($!)
  local ports="$ngx $hap $ts1 $ts2"
  if [ -n "$BASELINE" ]; then
    turnstile_conf "$base" "$minute" "$keys" > "$work/tb.toml"
    RUST_LOG=off taskset -c 0 "$BASELINE" --threads 1 --config "$work/tb.toml" & proxy_pids+=($!)
    ports="$ports $base"
  fi
  for p in $ports; do wait_port "$p"; done
}
stop_proxies() { for p in "${proxy_pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${proxy_pids[@]}"; do wait "$p" 2>/dev/null || true; done; }

wait_port "$up"
hz=$(getconf CLK_TCK)
measure() { # port lua pid -> "rps p50_ms p99_ms non2xx cpu_us user_us" (CPU per request, pid and children)
  local before after
  before=$(cpu_ticks "$3")
  taskset -c 1 wrk -t1 -c64 -d"$DURATION" --latency -s "$2" "http://127.0.0.1:$1/v1/jobs/1" 2>/dev/null > "$work/wrk.out"
  after=$(cpu_ticks "$3")
  awk -v b="$before" -v a="$after" -v hz="$hz" \
    'function ms(v){ if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
     BEGIN {split(b, B, " "); split(a, A, " ")}
     /requests in/ {n=$1} /Requests\/sec/ {rps=$2} /^ +50%/ {p50=ms($2)} /^ +99%/ {p99=ms($2)} /Non-2xx/ {bad=$5}
     END {u=(A[1]-B[1])*1e6/hz; s=(A[2]-B[2])*1e6/hz; n=(n>0?n:1)
          printf "%s %.3f %.3f %s %.2f %.2f\n", rps, p50, p99, (bad==""?0:bad), (u+s)/n, u/n}' "$work/wrk.out"
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

results="$work/results"
: > "$results"
for scenario in $SCENARIOS; do
  start_proxies "$scenario"
  lua=bench/keys.lua
  [ "$scenario" = refuse ] && lua=bench/one-key.lua
  [ "$scenario" = cold ] && lua=bench/keys-1m.lua
  # Warm-up: first requests of every target (and the refuse path's one admission).
  for p in $up $ngx $hap $ts1 $ts2 ${BASELINE:+$base}; do taskset -c 1 wrk -t1 -c8 -d1s -s "$lua" "http://127.0.0.1:$p/" >/dev/null 2>&1; done
  for r in $(seq "$REPEAT"); do
    for target in $targets; do
      case $target in
        upstream) p=$up pid=$up_pid;; nginx) p=$ngx pid=${proxy_pids[0]};; haproxy) p=$hap pid=${proxy_pids[1]};;
        turnstile) p=$ts1 pid=${proxy_pids[2]};; turnstile-2w) p=$ts2 pid=${proxy_pids[3]};; baseline) p=$base pid=${proxy_pids[4]};;
      esac
      [ "$scenario" = refuse ] && [ "$target" = upstream ] && continue
      echo "$scenario $target $(measure "$p" "$lua" "$pid")" >> "$results"
    done
  done
  stop_proxies
done

printf '\n%-8s %-13s %10s %9s %9s %8s %8s %8s   %s\n' scenario target 'req/s' 'p50 ms' 'p99 ms' 'non-2xx' 'CPU us' 'user us' 'turnstile (1 worker) vs this: req/s, CPU/request'
for scenario in $SCENARIOS; do
  ts_rps=$(awk -v s="$scenario" '$1==s && $2=="turnstile" {print $3}' "$results" | median)
  ts_cpu=$(awk -v s="$scenario" '$1==s && $2=="turnstile" {print $7}' "$results" | median)
  for target in $targets; do
    rows=$(awk -v s="$scenario" -v t="$target" '$1==s && $2==t' "$results")
    [ -z "$rows" ] && continue
    rps=$(echo "$rows" | awk '{print $3}' | median)
    p50=$(echo "$rows" | awk '{print $4}' | median)
    p99=$(echo "$rows" | awk '{print $5}' | median)
    bad=$(echo "$rows" | awk '{print $6}' | median)
    cpu=$(echo "$rows" | awk '{print $7}' | median)
    user=$(echo "$rows" | awk '{print $8}' | median)
    ratio=$(python3 -c "print('%.2fx  %.2fx' % ($ts_rps / $rps, $ts_cpu / $cpu) if $rps > 0 and $cpu > 0 else '-')")
    printf '%-8s %-13s %10.0f %9.3f %9.3f %8.0f %8.2f %8.2f   %s\n' "$scenario" "$target" "$rps" "$p50" "$p99" "$bad" "$cpu" "$user" "$ratio"
  done
done
echo "($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); wrk -t1 -c64, $DURATION x $REPEAT, medians)"
