#!/usr/bin/env bash
# What a media-duration check costs a 20 MB upload, measured in one run.
#
# The same turnstile build twice, one worker on CPU 0, nginx as upstream
# (answering 200 and discarding the body), the client on CPU 1: "plain"
# forwards a 20 MB MP3 upload as it streams; "checked" has
# max_duration_by_type = { "audio/*" = "600m" }, so the body is held, its
# duration read (every frame header counted), then forwarded. Uploads one
# at a time (latency) and 4 at once (memory: the process's peak RSS).
#
# The probe alone (no I/O) is timed first with examples/media_probe.rs.
# The uploads alternate between the two targets within one client, and the
# medians are compared (every process shares two cores: noise is large).
#
# Usage: bench/media.sh   (UPLOADS, default 40 per target)
set -euo pipefail
cd "$(dirname "$0")/.."
UPLOADS=${UPLOADS:-40}
. bench/lib.sh
need_tools nginx:nginx-light ffmpeg:ffmpeg
cargo build --release --quiet --bin turnstile --example media_probe
up=$(free_port); plain=$(free_port); checked=$(free_port)
ffmpeg -loglevel error -y -f lavfi -i sine=frequency=440:duration=1250 -c:a libmp3lame -b:a 128k "$work/upload.mp3"
mkdir -p "$work/up"
cat > "$work/up/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $work/up/pid; error_log /dev/null crit;
events { worker_connections 1024; }
http { access_log off; client_max_body_size 64m; client_body_buffer_size 64m;
  server { listen 127.0.0.1:$up; keepalive_requests 1000000;
  location / { default_type application/json; return 200 '{"ok":true}'; } } }
NGINX
taskset -c 0 nginx -p "$work/up" -c "$work/up/nginx.conf" & pids+=($!)
conf() { # port, extra route line
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
max_body = "30MB"
[upstream]
url = "http://127.0.0.1:$up"
[identity]
sources = ["header:x-api-key"]
[[routes]]
name = "upload"
path = "/*"
$2
[plans.bench]
[[plans.bench.limits]]
name = "minute"
requests = 100000000
window = "1m"
TOML
}
conf "$plain" "" > "$work/plain.toml"
conf "$checked" 'max_duration_by_type = { "audio/*" = "600m" }' > "$work/checked.toml"
RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/plain.toml" & pids+=($!); plain_pid=$!
RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/checked.toml" & pids+=($!); checked_pid=$!
for p in $up $plain $checked; do wait_port "$p"; done
cat > "$work/client.py" <<'PY'
import http.client, sys, threading, time
ports, path, n, parallel = [int(p) for p in sys.argv[1].split(",")], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
body = open(path, "rb").read()
times = {p: [] for p in ports}
bad = {p: 0 for p in ports}
def run(count):
    conns = {p: http.client.HTTPConnection("127.0.0.1", p, timeout=60) for p in ports}
    for _ in range(count):
        for p in ports:
            t = time.perf_counter()
            conns[p].request("POST", "/v1/aud2video", body=body, headers={"X-Api-Key": "k", "Content-Type": "audio/mpeg"})
            r = conns[p].getresponse(); r.read()
            times[p].append(time.perf_counter() - t)
            if r.status != 200: bad[p] += 1
threads = [threading.Thread(target=run, args=(max(1, n // parallel),)) for _ in range(parallel)]
for t in threads: t.start()
for t in threads: t.join()
for p in ports:
    ts = sorted(times[p])
    print(f"{ts[len(ts)//2]*1000:.1f} {bad[p]}")
PY
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
size=$(stat -c %s "$work/upload.mp3")
./target/release/examples/media_probe "$work/upload.mp3" 20
python3 "$work/client.py" "$plain,$checked" "$work/upload.mp3" 2 1 >/dev/null   # warm-up
mapfile -t lines < <(taskset -c 1 python3 "$work/client.py" "$plain,$checked" "$work/upload.mp3" "$UPLOADS" 1)
read -r ms_plain bad_plain <<<"${lines[0]}"
read -r ms_checked bad_checked <<<"${lines[1]}"
# Memory: fresh processes, then 4 uploads at once (twice), peak RSS.
kill "$plain_pid" "$checked_pid"; wait "$plain_pid" "$checked_pid" 2>/dev/null || true
RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/plain.toml" & pids+=($!); plain_pid=$!
RUST_LOG=off taskset -c 0 ./target/release/turnstile --threads 1 --config "$work/checked.toml" & pids+=($!); checked_pid=$!
for p in $plain $checked; do wait_port "$p"; done
taskset -c 1 python3 "$work/client.py" "$plain" "$work/upload.mp3" 8 4 >/dev/null
taskset -c 1 python3 "$work/client.py" "$checked" "$work/upload.mp3" 8 4 >/dev/null
printf '\n%-8s %10s %8s %22s\n' config 'median ms' 'non-200' 'peak RSS, 4 at once'
printf '%-8s %10s %8s %18s MiB\n' plain "$ms_plain" "$bad_plain" "$(( $(hwm "$plain_pid") / 1024 ))"
printf '%-8s %10s %8s %18s MiB\n' checked "$ms_checked" "$bad_checked" "$(( $(hwm "$checked_pid") / 1024 ))"
python3 -c "print('checked / plain: %.2fx the time per %.1f MB upload (%+.1f ms)' % ($ms_checked / $ms_plain, $size / 1e6, $ms_checked - $ms_plain))"
echo "($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $UPLOADS uploads per target, alternating, one at a time, medians; then 4 at once on fresh processes for the peak RSS)"
