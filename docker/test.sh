#!/usr/bin/env bash
# Container tests (README, "Docker"): builds the real Dockerfile on this
# machine's Docker engine, over local stand-ins of its base images where no
# registry can be reached (docker/standins.sh), then
#   1. runs the image with a mounted config and snapshot folder: 200s then a
#      429 with the full header set, SIGHUP after editing the config changes
#      the limit, `docker stop` drains an open stream and writes the
#      snapshot, the restarted container keeps the daily count, and the
#      image's health check reports healthy;
#   2. brings up docker/compose.yaml (the sidecar) and goes through it;
#   3. brings up docker/compose.scale-out.yaml: both replicas together admit
#      exactly N for one key; a replica cut off from Redis follows on_error
#      while the other keeps enforcing; reconnected, it counts in Redis again.
# Traffic goes to 127.0.0.1 only (ports are published there). Every
# container, network, volume and the test image are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  {
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "!! docker/test.sh: no Docker engine answers (docker info failed)."
    echo "!! The container tests did NOT run."
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  } >&2
  [[ "${CI:-}" == "true" ]] && exit 1
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  echo "docker/test.sh: neither 'docker compose' nor docker-compose is installed" >&2
  exit 1
fi

run="ts$$"
# The admin API's token, passed to every container the way the compose files do.
TURNSTILE_ADMIN_TOKEN="test-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
export TURNSTILE_ADMIN_TOKEN
image="turnstile:test-$run"
net="$run-net"
api="$run-api"
proxy="$run-proxy"
work="$(mktemp -d)"
failed=0

cleanup() {
  local status=$?
  if [[ $status -ne 0 ]]; then
    for c in "$proxy" "$api"; do
      docker logs --tail 40 "$c" 2>&1 | sed "s/^/[$c] /" >&2 || true
    done
  fi
  docker rm -f -v "$proxy" "$api" >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
  for project in "$run-sidecar" "$run-scale"; do
    for file in docker/compose.yaml docker/compose.scale-out.yaml; do
      TURNSTILE_IMAGE="$image" "${compose[@]}" -p "$project" -f "$file" down -v --remove-orphans >/dev/null 2>&1 || true
    done
  done
  docker rmi "$image" >/dev/null 2>&1 || true
  rm -rf "$work"
  exit $status
}
trap cleanup EXIT

pass() { echo "ok - $*"; }
fail() { echo "FAIL - $*" >&2; exit 1; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# request METHOD URL [curl args...]: sets $status; headers in $work/h, body in $work/b.
request() {
  local method="$1" url="$2"
  shift 2
  status="$(curl -sS -m 10 -X "$method" -o "$work/b" -D "$work/h" -w '%{http_code}' "$@" "$url" || echo 000)"
}
header() { grep -i "^$1:" "$work/h" | head -n 1 | cut -d: -f2- | tr -d '\r' | sed 's/^ *//'; }
expect_header() {
  local got
  got="$(header "$1")"
  [[ "$got" == "$2" ]] || fail "$3: $1 is '$got', expected '$2'"
}
body_has() { grep -qF -- "$1" "$work/b" || fail "$2: body lacks $1: $(cat "$work/b")"; }

wait_healthy() {
  local container="$1" state
  for _ in $(seq 1 60); do
    state="$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$container")"
    case "$state" in
      "running healthy") return 0 ;;
      exited*|dead*) fail "$container exited: $(docker logs --tail 20 "$container" 2>&1)" ;;
    esac
    sleep 1
  done
  fail "$container not healthy after 60 s ($state)"
}

# wait_for URL STATUS [curl args...]: polls (up to 30 s) until URL answers STATUS.
wait_for() {
  local url="$1" want="$2"
  shift 2
  for _ in $(seq 1 60); do
    request GET "$url" "$@"
    [[ "$status" == "$want" ]] && return 0
    sleep 0.5
  done
  fail "$url still answers $status, not $want"
}

echo "== base images"
bash docker/standins.sh

echo "== docker build (the real Dockerfile)"
start=$(date +%s)
docker build -t "$image" . >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; fail "docker build"; }
echo "built in $(( $(date +%s) - start )) s"
size="$(docker image inspect -f '{{.Size}}' "$image")"
(( size < 50000000 )) || fail "image is $size bytes, over 50 MB"
pass "image size $(( size / 1000000 )) MB (< 50 MB)"
[[ "$(docker image inspect -f '{{.Config.User}}' "$image")" == "65532:65532" ]] || fail "image does not run as 65532"
pass "runs as the non-root user 65532"

echo "== one container: limits, reload, drain, snapshot, restart, health"
docker network create "$net" >/dev/null
docker run -d --name "$api" --network "$net" --network-alias api --no-healthcheck \
  "$image" example-api --listen 0.0.0.0:8000 >/dev/null

mkdir -p "$work/config" "$work/data"
chown 65532:65532 "$work/data"
write_config() {
  cat >"$work/config/turnstile.toml" <<TOML
[server]
listen = "0.0.0.0:8080"
unmatched = "forward"
shutdown_grace = "8s"

[upstream]
url = "http://api:8000"

[identity]
keys_file = "keys.toml"
default_plan = "free"

[headers]
ietf = true

[store]
snapshot = "/var/lib/turnstile/counters.bin"
snapshot_interval = "1h"   # only the shutdown writes it during this test

[admin]
listen = "0.0.0.0:9090"
token_env = "TURNSTILE_ADMIN_TOKEN"

[[routes]]
name = "generate"
method = "POST"
path = "/v1/images/generations"

[plans.free]
[[plans.free.limits]]
name = "daily"
routes = ["generate"]
requests = $1
window = "1d"
TOML
}
write_config 3
cat >"$work/config/keys.toml" <<'TOML'
[[keys]]
key = "docker-test-key"
account = "acme"
plan = "free"
TOML

docker run -d --name "$proxy" --network "$net" \
  -e TURNSTILE_ADMIN_TOKEN \
  -p 127.0.0.1::8080 -p 127.0.0.1::9090 \
  -v "$work/config:/etc/turnstile:ro" -v "$work/data:/var/lib/turnstile" \
  "$image" >/dev/null
port="$(docker port "$proxy" 8080/tcp | head -n 1 | sed 's/.*://')"
admin="$(docker port "$proxy" 9090/tcp | head -n 1 | sed 's/.*://')"
wait_healthy "$proxy"
pass "health check reports healthy"

url="http://127.0.0.1:$port/v1/images/generations"
key=(-H "Authorization: Bearer docker-test-key")
midnight=$(( ($(date -u +%s) / 86400 + 1) * 86400 ))
for n in 1 2 3; do
  request POST "$url" "${key[@]}"
  [[ "$status" == 200 ]] || fail "request $n: $status $(cat "$work/b")"
  expect_header x-ratelimit-limit 3 "request $n"
  expect_header x-ratelimit-remaining $((3 - n)) "request $n"
  expect_header x-ratelimit-reset "$midnight" "request $n"
  expect_header ratelimit-policy '"daily";q=3;w=86400' "request $n"
  body_has '"account":"acme"' "request $n"
done
pass "3 requests admitted with X-RateLimit-* and RateLimit-Policy"
request POST "$url" "${key[@]}"
[[ "$status" == 429 ]] || fail "4th request: $status"
expect_header x-ratelimit-limit 3 "429"
expect_header x-ratelimit-remaining 0 "429"
expect_header x-ratelimit-reset "$midnight" "429"
expect_header x-ratelimit-type daily "429"
expect_header content-type application/json "429"
retry="$(header retry-after)"
(( retry >= 1 && retry <= 86400 )) || fail "Retry-After is '$retry'"
body_has '"error":"rate_limited"' "429"
body_has '"count":3,"limit":3,"remaining":0' "429"
pass "4th request refused: 429, Retry-After $retry, X-RateLimit-Type daily, JSON body"

# Reload: edit the mounted config, send SIGHUP.
write_config 5
docker kill -s HUP "$proxy" >/dev/null
for _ in $(seq 1 20); do
  request GET "http://127.0.0.1:$admin/v1/usage?key=docker-test-key" -H "Authorization: Bearer $TURNSTILE_ADMIN_TOKEN"
  grep -qF '"limit":5' "$work/b" && break
  sleep 0.25
done
grep -qF '"limit":5' "$work/b" || fail "SIGHUP did not apply the edited limit: $(cat "$work/b")"
request POST "$url" "${key[@]}"
[[ "$status" == 200 ]] || fail "after the reload: $status"
expect_header x-ratelimit-limit 5 "after the reload"
expect_header x-ratelimit-remaining 1 "after the reload"
pass "docker kill -s HUP applied the edited limit (5), the count (4) was kept"
request POST "$url" "${key[@]}"
[[ "$status" == 200 ]] || fail "5th request: $status"

# Drain: an event stream is open when docker stop sends SIGTERM.
curl -sSN -m 20 "http://127.0.0.1:$port/v1/events" >"$work/events" 2>&1 &
stream=$!
for _ in $(seq 1 40); do
  grep -q progress "$work/events" && break
  sleep 0.1
done
grep -q progress "$work/events" || fail "the event stream did not start"
docker stop "$proxy" >/dev/null
wait "$stream" || fail "the open stream was cut by docker stop: $(cat "$work/events")"
[[ "$(grep -c 'event: progress' "$work/events")" == 5 ]] || fail "stream incomplete: $(cat "$work/events")"
[[ "$(docker inspect -f '{{.State.ExitCode}}' "$proxy")" == 0 ]] || fail "exit code $(docker inspect -f '{{.State.ExitCode}}' "$proxy")"
[[ -s "$work/data/counters.bin" ]] || fail "no snapshot in the mounted folder"
pass "docker stop drained the open stream (5/5 events), exited 0, wrote the snapshot"

docker start "$proxy" >/dev/null
port="$(docker port "$proxy" 8080/tcp | head -n 1 | sed 's/.*://')"
url="http://127.0.0.1:$port/v1/images/generations"
wait_healthy "$proxy"
request POST "$url" "${key[@]}"
[[ "$status" == 429 ]] || fail "after the restart: $status (the daily count was lost)"
expect_header x-ratelimit-limit 5 "after the restart"
body_has '"count":5,"limit":5' "after the restart"
pass "the restarted container kept the daily count (5 of 5: 429) and is healthy"
docker rm -f -v "$proxy" "$api" >/dev/null
docker network rm "$net" >/dev/null

echo "== docker/compose.yaml (sidecar)"
p="$(free_port)"
export TURNSTILE_IMAGE="$image" TURNSTILE_PUBLISH="127.0.0.1:$p"
"${compose[@]}" -p "$run-sidecar" -f docker/compose.yaml up -d --no-build >"$work/compose.log" 2>&1 \
  || { cat "$work/compose.log" >&2; fail "compose up (sidecar)"; }
wait_for "http://127.0.0.1:$p/health" 200
request POST "http://127.0.0.1:$p/v1/images/generations" -H "Authorization: Bearer demo-free-key"
[[ "$status" == 200 ]] || fail "sidecar: $status $(cat "$work/b")"
expect_header x-ratelimit-limit 3 "sidecar"
expect_header x-ratelimit-daily-limit 20 "sidecar"
body_has '"account":"demo","plan":"free"' "sidecar"
[[ -z "$("${compose[@]}" -p "$run-sidecar" -f docker/compose.yaml port turnstile 9090 2>/dev/null | tr -d ':0\n')" ]] \
  || fail "sidecar: the admin port is published"
wait_healthy "$("${compose[@]}" -p "$run-sidecar" -f docker/compose.yaml ps -q turnstile)"
pass "sidecar: 200 through turnstile to the example API, admin port not published, healthy"
"${compose[@]}" -p "$run-sidecar" -f docker/compose.yaml down -v >/dev/null 2>&1

echo "== docker/compose.scale-out.yaml (two replicas, one Redis)"
pa="$(free_port)"
pb="$(free_port)"
export TURNSTILE_A_PUBLISH="127.0.0.1:$pa" TURNSTILE_B_PUBLISH="127.0.0.1:$pb"
scale=("${compose[@]}" -p "$run-scale" -f docker/compose.scale-out.yaml)
"${scale[@]}" up -d --no-build >"$work/compose.log" 2>&1 || { cat "$work/compose.log" >&2; fail "compose up (scale-out)"; }
for p in "$pa" "$pb"; do
  wait_for "http://127.0.0.1:$p/v1/jobs/1" 200 -H "Authorization: Bearer demo-pro-key"
done
# 30 concurrent generations with one key, 15 through each replica: the
# daily limit is 10 across both.
for i in $(seq 1 30); do
  if (( i % 2 )); then echo "$pa"; else echo "$pb"; fi
done | xargs -P 10 -I{} curl -s -m 10 -o /dev/null -w '%{http_code}\n' -X POST \
  -H "Authorization: Bearer demo-free-key" "http://127.0.0.1:{}/v1/images/generations" >"$work/codes"
admitted="$(grep -c '^200$' "$work/codes" || true)"
refused="$(grep -c '^429$' "$work/codes" || true)"
[[ "$admitted" == 10 && "$refused" == 20 ]] || fail "scale-out: $admitted admitted, $refused refused (want 10 and 20): $(sort "$work/codes" | uniq -c | tr '\n' ' ')"
pass "scale-out: 30 concurrent requests over both replicas, exactly 10 admitted, 20 refused"

a="$("${scale[@]}" ps -q turnstile-a)"
store_net="$(docker inspect -f '{{range $name, $_ := .NetworkSettings.Networks}}{{println $name}}{{end}}' "$a" | grep '_store$')"
docker network disconnect "$store_net" "$a"
request POST "http://127.0.0.1:$pa/v1/images/generations" -H "Authorization: Bearer demo-free-key"
[[ "$status" == 200 ]] || fail "replica a without Redis: $status (on_error = local should admit on its own count)"
expect_header x-ratelimit-remaining 9 "replica a without Redis"
request POST "http://127.0.0.1:$pb/v1/images/generations" -H "Authorization: Bearer demo-free-key"
[[ "$status" == 429 ]] || fail "replica b kept Redis but answered $status"
pass "replica a cut off from Redis follows on_error = local (200, its own count); b still refuses (429)"

docker network connect "$store_net" "$a"
# Back on Redis, a refuses again (the shared count is 10 of 10). Its local
# count has 9 left, so a 429 within 8 tries can only come from Redis.
local_admitted=1
for _ in $(seq 1 8); do
  request POST "http://127.0.0.1:$pa/v1/images/generations" -H "Authorization: Bearer demo-free-key"
  [[ "$status" == 429 ]] && break
  [[ "$status" == 200 ]] && local_admitted=$((local_admitted + 1))
  sleep 1
done
[[ "$status" == 429 ]] || fail "replica a reconnected but still counts on its own ($status)"
# What a admitted on its own is added to Redis's count once it answers
# (within a second): the count is exact, 10 plus those.
sleep 2
request POST "http://127.0.0.1:$pa/v1/images/generations" -H "Authorization: Bearer demo-free-key"
[[ "$status" == 429 ]] || fail "replica a reconnected then answered $status"
body_has "\"count\":$((10 + local_admitted)),\"limit\":10" "replica a reconnected"
pass "replica a reconnected: counts in Redis again (429, 10 of 10 plus the $local_admitted it admitted on its own)"
"${scale[@]}" down -v >/dev/null 2>&1

echo "== docker/test.sh: all container tests passed"
