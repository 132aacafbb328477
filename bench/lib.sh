# Shared by the bench scripts (sourced, not run): the tools they need, a
# scratch folder and the processes they start (both cleaned up on exit),
# free ports on 127.0.0.1, and waiting for a port to open.
#
# need_tools CMD:PACKAGE...  installs the Debian packages of missing commands
# work                       the scratch folder
# pids+=($!)                 processes killed on exit
# free_port, wait_port PORT
# cpu_ticks PID              user and system clock ticks of PID and its children

need_tools() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (Debian packages)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

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

# "user system": clock ticks (getconf CLK_TCK per second) spent by PID and its
# direct children (nginx's workers), all threads, so far.
cpu_ticks() {
  local user=0 sys=0 p u s
  for p in "$1" $(pgrep -P "$1" || true); do
    [ -r "/proc/$p/stat" ] || continue
    read -r u s < <(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12, $13}')
    user=$((user + u)); sys=$((sys + s))
  done
  echo "$user $sys"
}

# upstream_nginx PORT BODY: nginx on CPU 0 answering every request with 200
# and the JSON BODY (as written: nginx variables such as $request_id stay).
upstream_nginx() {
  mkdir -p "$work/up"
  cat > "$work/up/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $work/up/pid; error_log /dev/null crit;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$1; keepalive_requests 1000000;
  location / { default_type application/json; return 200 '$2'; } } }
NGINX
  taskset -c 0 nginx -p "$work/up" -c "$work/up/nginx.conf" & pids+=($!)
}

# bench_keys FILE: a keys file of bench-key-0 ... bench-key-9999 on plan "bench".
bench_keys() {
  python3 - "$1" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(10000):
        f.write(f'[[keys]]\nkey = "bench-key-{i}"\nplan = "bench"\n\n')
PY
}

# wrk_run URL SCRIPT: wrk on CPU 1 (one thread, 64 connections, DURATION
# seconds) with the Lua SCRIPT; prints "req/s p99_ms non2xx".
wrk_run() {
  taskset -c 1 wrk -t1 -c64 -d"${DURATION}s" --latency -s "$2" "$1" 2>/dev/null |
    awk 'function ms(v){ if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
         /Requests\/sec/ {rps=$2} /^ +99%/ {p99=ms($2)} /Non-2xx/ {bad=$5}
         END {printf "%s %.3f %s\n", rps, p99, (bad==""?0:bad)}'
}

# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
