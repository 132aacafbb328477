#!/usr/bin/env python3
"""redis-server's CPU per decision, measured where it is spent.

Starts a redis-server of its own (loopback, no persistence), loads
turnstile's decision code the way turnstile does (an EVALSHA script, or
the function library with FCALL when the server has Redis Functions), and
sends N decisions with three limits (minute + daily fixed windows and a
concurrency limit, over 10,000 keys) pipelined 64 at a time, as the
instance's one multiplexed connection does under load. Each concurrency
lease is released (ZREM) as a finished request's would be. Prints
`INFO commandstats`' microseconds per call of each command.

    python3 bench/redis-script.py [--n 50000] [--mode script|function|both]

Needs redis-server and the `redis` Python package.
"""

import argparse
import os
import random
import socket
import subprocess
import tempfile
import time

import redis

LUA = os.path.join(os.path.dirname(__file__), "..", "src", "store", "redis", "lua")
KINDS = ["fixed", "rolling", "bucket", "concurrency", "jobs", "credits"]


def read(name):
    with open(os.path.join(LUA, name)) as f:
        return f.read()


def script(body):
    """As `with_kinds!` assembles it."""
    return read("prelude.lua") + "".join(read(f"kinds/{k}.lua") for k in KINDS) + read(body)


def library():
    """As `library!` assembles it (src/store/redis/mod.rs)."""
    return read("library_head.lua") + script("decide.lua") + read("library.lua")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decide_args(key_i, lease):
    # dry_run, lease id, lease ms, checks, deadline, then per check:
    # kind, a, b, units, shadow (fixed 1m, fixed 1d, concurrency).
    return [0, lease, 30000, 3, 0,
            1, 1000000, 60, 1, 0,
            1, 100000000, 86400, 1, 0,
            4, 1000000, 1000000, 1, 0]


def run(r, mode, n, keys):
    r.config_resetstat()
    if mode == "script":
        sha = r.script_load(script("decide.lua") + "return decide()\n")
    else:
        r.function_load(library(), replace=True)
    t0 = time.time()
    sent = 0
    while sent < n:
        pipe = r.pipeline(transaction=False)
        batch = []
        for _ in range(min(64, n - sent)):
            i = random.randrange(keys)
            tag = f"{i:016x}"
            ks = [f"turnstile:{{{tag}}}:k{tag}:{c:016x}" for c in (1, 2, 3)]
            lease = f"bench:{sent}"
            args = decide_args(i, lease)
            if mode == "script":
                pipe.evalsha(sha, 3, *ks, *args)
            else:
                pipe.fcall("turnstile_decide", 3, *ks, *args)
            batch.append((ks[2], lease))
            sent += 1
        pipe.execute()
        pipe = r.pipeline(transaction=False)
        for key, lease in batch:
            pipe.zrem(key, lease)
        pipe.execute()
    took = time.time() - t0
    stats = r.info("commandstats")
    name = "cmdstat_evalsha" if mode == "script" else "cmdstat_fcall"
    s = stats.get(name, {})
    z = stats.get("cmdstat_zrem", {})
    print(f"{mode}: {n} decisions in {took:.1f} s; {name[8:]} {s.get('usec_per_call')} us per call "
          f"(calls {s.get('calls')}), zrem {z.get('usec_per_call')} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--mode", default="both")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=d, stdout=subprocess.DEVNULL)
        try:
            r = redis.Redis(port=port)
            for _ in range(100):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            modes = ["script", "function"] if a.mode == "both" else [a.mode]
            for _ in range(a.rounds):
                for m in modes:
                    run(r, m, a.n, a.keys)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
