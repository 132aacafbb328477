#!/usr/bin/env bash
# Runs turnstile on the bundled example: the mock generation API on
# 127.0.0.1:9000 and turnstile on 127.0.0.1:8080 with config/turnstile.toml.
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin turnstile
./target/release/turnstile example-api --listen 127.0.0.1:9000 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT
./target/release/turnstile --config config/turnstile.toml "$@"
