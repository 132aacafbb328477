//! Distributed limits on real Redis (SPEC §8): several turnstile instances
//! sharing one Redis (and a 3-node Redis Cluster) enforce one exact limit;
//! each on_error mode while Redis is down; recovery; leases of a killed
//! instance. Needs `redis-server` and `redis-cli` (`apt-get install -y
//! redis-server`; .ci/run installs it). Every test starts its own servers on
//! free ports.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const EXACT: &str = r#"
[upstream]
url = "{upstream}"

[store]
backend = "redis"
url = "{redis}"
timeout = "2s"

[[routes]]
name = "fixed"
path = "/fixed"
[[routes]]
name = "rolling"
path = "/rolling"
[[routes]]
name = "bucket"
path = "/bucket"
[[routes]]
name = "slots"
path = "/hold"

[plans.p]
[[plans.p.limits]]
name = "daily"
routes = ["fixed"]
requests = 37
window = "1d"

[[plans.p.limits]]
name = "hourly"
kind = "rolling"
routes = ["rolling"]
requests = 41
window = "1h"

[[plans.p.limits]]
name = "burst"
kind = "bucket"
routes = ["bucket"]
rate = "1/h"
burst = 23

[[plans.p.limits]]
name = "slots"
kind = "concurrency"
routes = ["slots"]
max = 7
"#;

async fn instances(config: &str, up: &Upstream, n: usize) -> Vec<Proxy> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Proxy::start(config, up).await);
    }
    out
}

/// 300 parallel requests for one key, round-robin over the instances.
async fn storm(
    proxies: &[Proxy],
    path: &str,
    key: &'static str,
) -> Vec<tokio::task::JoinHandle<u16>> {
    spread(proxies, path, key, 300)
}

/// `n` parallel requests for one key, round-robin over the instances.
fn spread(
    proxies: &[Proxy],
    path: &str,
    key: &'static str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<u16>> {
    (0..n)
        .map(|i| {
            let url = proxies[i % proxies.len()].url(path);
            tokio::spawn(async move { call("GET", &url, Some(key)).await.status })
        })
        .collect()
}

async fn statuses(
    tasks: Vec<tokio::task::JoinHandle<u16>>,
) -> std::collections::HashMap<u16, usize> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    tally(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_admit_exactly_n_for_every_kind() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let proxies = instances(&EXACT.replace("{redis}", &redis.url()), &up, 3).await;
    for (path, n) in [("/fixed", 37), ("/rolling", 41), ("/bucket", 23)] {
        let counts = statuses(storm(&proxies, path, "shared-key").await).await;
        assert_eq!(counts.get(&200), Some(&n), "{path}: {counts:?}");
        assert_eq!(counts.get(&429), Some(&(300 - n)), "{path}: {counts:?}");
    }
    assert_eq!(up.hits(), 37 + 41 + 23);

    let before = up.hits();
    let held = storm(&proxies, "/hold", "shared-key").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while held.iter().filter(|t| t.is_finished()).count() < 293 {
        assert!(Instant::now() < deadline, "refusals did not come back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.hits() - before,
        7,
        "exactly 7 slots across the instances"
    );
    up.release(300);
    let counts = statuses(held).await;
    assert_eq!(
        (counts.get(&200), counts.get(&429)),
        (Some(&7), Some(&293)),
        "{counts:?}"
    );
    // Released leases free the slots at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let url = proxies[0].url("/hold?n=again");
        let t = tokio::spawn(async move { call("GET", &url, Some("shared-key")).await.status });
        let deadline_hit = Instant::now() + Duration::from_secs(5);
        while up.hits() - before < 8 && !t.is_finished() {
            assert!(Instant::now() < deadline_hit);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        up.release(1);
        if t.await.unwrap() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slots were not released");
    }
}

const MODES: &str = r#"
[upstream]
url = "{upstream}"

[store]
backend = "redis"
url = "{redis}"
timeout = "200ms"
on_error = "{mode}"

[[routes]]
name = "gen"
path = "/gen"

[plans.p]
[[plans.p.limits]]
name = "daily"
requests = 5
window = "1d"
"#;

/// A thousand requests at once for one key over two instances, with a
/// daily limit of 400 (and a minute limit never reached): exactly 400 are
/// admitted and reach the upstream, whichever instance each went to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_admit_exactly_n_of_a_thousand_at_once() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = format!(
        "[upstream]\nurl = \"{{upstream}}\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"5s\"\n\
         [[routes]]\nname = \"fixed\"\npath = \"/fixed\"\n[plans.p]\n\
         [[plans.p.limits]]\nname = \"daily\"\nrequests = 400\nwindow = \"1d\"\n\
         [[plans.p.limits]]\nname = \"minute\"\nrequests = 100000\nwindow = \"1m\"\n",
        redis.url()
    );
    let proxies = instances(&config, &up, 2).await;
    let counts = statuses(spread(&proxies, "/fixed", "shared-key", 1000)).await;
    assert_eq!(
        (counts.get(&200), counts.get(&429)),
        (Some(&400), Some(&600)),
        "{counts:?}"
    );
    assert_eq!(up.hits(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_follows_on_error_without_latency_pile_up_and_recovers() {
    let mut redis = Redis::persistent().await;
    let up = Upstream::start().await;
    let config = |mode: &str| {
        MODES
            .replace("{redis}", &redis.url())
            .replace("{mode}", mode)
    };
    let local = Proxy::start(&config("local"), &up).await;
    let allow = Proxy::start(&config("allow"), &up).await;
    let deny = Proxy::start(&config("deny"), &up).await;
    for p in [&local, &allow, &deny, &local, &allow] {
        assert_eq!(call("GET", &p.url("/gen"), Some("k")).await.status, 200);
    }
    // Five admitted in Redis: the shared limit is reached for every instance.
    assert_eq!(call("GET", &deny.url("/gen"), Some("k")).await.status, 429);

    redis.kill();
    // deny: 503 store_unavailable, fast after the first failure.
    let mut slow = 0;
    for _ in 0..50 {
        let started = Instant::now();
        let r = call("GET", &deny.url("/gen"), Some("k")).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"], "store_unavailable");
        slow += usize::from(started.elapsed() >= Duration::from_millis(150));
    }
    assert!(
        slow <= 3,
        "{slow} of 50 requests waited for the Redis timeout: no circuit breaker?"
    );
    // allow: forwarded without limits (and without rate-limit headers).
    for _ in 0..10 {
        let r = call("GET", &allow.url("/gen"), Some("k")).await;
        assert_eq!(r.status, 200);
        assert!(r.header("x-ratelimit-limit").is_none());
    }
    // local: the limit holds per instance, in memory.
    let local_statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(call("GET", &local.url("/gen"), Some("k")).await.status);
        }
        v
    };
    assert_eq!(
        tally(local_statuses),
        [(200, 5), (429, 3)].into_iter().collect()
    );

    // Redis comes back (with its data): every instance recovers without a restart.
    redis.restart().await;
    for p in [&deny, &allow] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = call("GET", &p.url("/gen"), Some("fresh-key")).await;
            if r.status == 200 && r.header("x-ratelimit-limit") == Some("5") {
                break;
            }
            assert!(Instant::now() < deadline, "no recovery: {}", r.status);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_of_a_killed_instance_come_back_within_the_lease() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\n[upstream]\nurl = \"{{upstream}}\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\nlease = \"1s\"\n[[routes]]\nname = \"slots\"\npath = \"/hold\"\n[plans.p]\n[[plans.p.limits]]\nname = \"slots\"\nkind = \"concurrency\"\nmax = 2\n",
        redis.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let doomed = Binary::start(dir.path(), &config, &up).await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = doomed.url("/hold");
            tokio::spawn(async move { call("GET", &url, Some("k")).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.hits() < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Renewed while alive: still held after more than one lease.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let survivor = Proxy::start(&config.replace("listen = \"127.0.0.1:{port}\"", ""), &up).await;
    assert_eq!(
        call("GET", &survivor.url("/hold"), Some("k")).await.status,
        429
    );

    doomed.signal("KILL");
    let killed_at = Instant::now();
    for h in held {
        let _ = h.await;
    }
    loop {
        let url = survivor.url("/hold?n=after");
        let t = tokio::spawn(async move { call("GET", &url, Some("k")).await.status });
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !t.is_finished() {
            up.release(1);
            assert_eq!(t.await.unwrap(), 200);
            break;
        }
        assert_eq!(t.await.unwrap(), 429);
        assert!(
            killed_at.elapsed() < Duration::from_secs(3),
            "slots not freed within the lease"
        );
    }
    let freed_after = killed_at.elapsed();
    assert!(
        freed_after <= Duration::from_millis(2000),
        "freed after {freed_after:?}, lease is 1 s"
    );
}

const CLUSTER: &str = r#"
[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"

[store]
backend = "redis"
url = "{redis}"
cluster = true
timeout = "2s"

[[routes]]
name = "gen"
path = "/gen"

[plans.p]
[[plans.p.limits]]
name = "account_daily"
per = "account"
requests = 15
window = "1d"

[[plans.p.limits]]
name = "key_daily"
requests = 10
window = "1d"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_redis_cluster_keeps_limits_exact() {
    require_redis();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        nodes.push(
            Redis::on_port(
                free_port(),
                dir,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ],
            )
            .await,
        );
    }
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let created = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(created.success(), "redis-cli --cluster create failed");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = Command::new("redis-cli")
            .args(["-p", &nodes[0].port.to_string(), "cluster", "info"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
            break;
        }
        assert!(Instant::now() < deadline, "cluster did not become ok");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let up = Upstream::start().await;
    let keys = "[[keys]]\nkey = \"key-a\"\naccount = \"acme\"\n\n[[keys]]\nkey = \"key-b\"\naccount = \"acme\"\n\n[[keys]]\nkey = \"key-c\"\naccount = \"other\"\n\n[[keys]]\nkey = \"key-d\"\naccount = \"third\"\n";
    let config = CLUSTER.replace("{redis}", &nodes[0].url());
    let mut proxies = Vec::new();
    for _ in 0..2 {
        proxies.push(Proxy::start_with(&config, &up, &[("keys.toml", keys)]).await);
    }
    // Per-account and per-key counters of one request in one script, across
    // accounts that live on different nodes.
    let mut tasks = Vec::new();
    for (i, key) in ["key-a", "key-b", "key-c", "key-d"]
        .iter()
        .cycle()
        .take(160)
        .enumerate()
    {
        let url = proxies[i % 2].url("/gen");
        let key = *key;
        tasks.push(tokio::spawn(async move {
            (key, call("GET", &url, Some(key)).await.status)
        }));
    }
    let mut admitted = std::collections::HashMap::<&str, usize>::new();
    for t in tasks {
        let (key, status) = t.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
        *admitted.entry(key).or_default() += usize::from(status == 200);
    }
    assert_eq!(admitted["key-a"] + admitted["key-b"], 15, "{admitted:?}");
    assert!(
        admitted["key-a"] <= 10 && admitted["key-b"] <= 10,
        "{admitted:?}"
    );
    assert_eq!(
        (admitted["key-c"], admitted["key-d"]),
        (10, 10),
        "{admitted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_usage_and_reset_read_and_write_redis() {
    let mut redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\n[upstream]\nurl = \"{{upstream}}\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"200ms\"\non_error = \"deny\"\n[admin]\nlisten = \"127.0.0.1:{{admin_port}}\"\n[[routes]]\nname = \"gen\"\npath = \"/gen\"\n[plans.p]\n[[plans.p.limits]]\nname = \"daily\"\nrequests = 5\nwindow = \"1d\"\n",
        redis.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let a = Binary::start(dir.path(), &config, &up).await;
    let dir_b = tempfile::tempdir().unwrap();
    let b = Binary::start(dir_b.path(), &config, &up).await;
    for node in [&a, &b, &a] {
        assert_eq!(call("GET", &node.url("/gen"), Some("k")).await.status, 200);
    }
    // Either instance reads the shared counter.
    let usage = call("GET", &b.admin("/v1/usage?key=k"), None).await.json();
    assert_eq!(usage["counters"][0]["used"], 3, "{usage}");
    let r = send(
        req("DELETE", &a.admin("/v1/usage?key=k"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["reset_counters"].as_u64()),
        (200, Some(1))
    );
    assert_eq!(
        call("GET", &b.url("/gen"), Some("k"))
            .await
            .h("x-ratelimit-remaining"),
        "4"
    );
    let ready = call("GET", &a.admin("/readyz"), None).await.json();
    assert_eq!(
        (
            ready["store"]["backend"].as_str(),
            ready["store"]["up"].as_bool()
        ),
        (Some("redis"), Some(true))
    );

    redis.kill();
    assert_eq!(call("GET", &a.url("/gen"), Some("k")).await.status, 503);
    let r = call("GET", &a.admin("/readyz"), None).await;
    assert_eq!(
        r.status, 503,
        "on_error = deny: out of rotation while Redis is down"
    );
    let metrics = call("GET", &a.admin("/metrics"), None).await.body;
    assert!(metrics.contains("turnstile_store_up 0"), "{metrics}");
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} failed");
}

/// Redis counts for key `k` as the admin API reads them (from Redis).
async fn redis_used(admin: &str) -> i64 {
    let r = call("GET", &format!("{admin}/v1/usage?key=k"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["counters"][0]["used"].as_i64().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_taken_by_the_local_fallback_are_added_to_redis_when_it_answers_again() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let admin_port = free_port();
    let config = MODES
        .replace("{redis}", &redis.url())
        .replace("{mode}", "local")
        .replace("requests = 5", "requests = 20")
        .replace(
            "[store]",
            &format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n[store]"),
        );
    let p = Proxy::start(&config, &up).await;
    let admin = format!("http://127.0.0.1:{admin_port}");
    for _ in 0..3 {
        assert_eq!(call("GET", &p.url("/gen"), Some("k")).await.status, 200);
    }
    assert_eq!(redis_used(&admin).await, 3);

    // Redis stalls (SIGSTOP): the local fallback admits four on its own.
    signal(&redis.child, "-STOP");
    for _ in 0..4 {
        assert_eq!(call("GET", &p.url("/gen"), Some("k")).await.status, 200);
    }
    signal(&redis.child, "-CONT");

    // Once the breaker lets a request through to Redis again, the four are
    // added: 3 + 1 + 4 = 8, not the 4 a forgetful fallback would leave. The
    // script that timed out when Redis stalled may also have run once Redis
    // resumed: 9 then (counted twice, never under-counted).
    // The admin usage call goes to Redis too: once it answers, the breaker is closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = call("GET", &format!("{admin}/v1/usage?key=k"), None).await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redis never came back: {}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call("GET", &p.url("/gen"), Some("k")).await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used = redis_used(&admin).await;
        if (8..=9).contains(&used) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redis holds {used} counts, expected 8 (3 + 1 + the fallback's 4)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_refused_while_streaming_gives_its_quota_back_in_redis() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = EXACT
        .replace("{redis}", &redis.url())
        .replace("[store]", "[server]\nbody_timeout = \"200ms\"\n\n[store]");
    let p = Proxy::start(&config, &up).await;
    for (path, limit) in [("/fixed", "37"), ("/rolling", "41"), ("/bucket", "23")] {
        // A body that stalls after its first bytes: admitted, counted, then
        // cut (408) before the upstream had it whole; the count is given back.
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer refund-key\r\nContent-Length: 50\r\n\r\n0123456789").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 408"), "{path}: {out}");
        let r = call("GET", &p.url(path), Some("refund-key")).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.h("x-ratelimit-limit"), limit, "{path}");
        let remaining: u32 = r.h("x-ratelimit-remaining").parse().unwrap();
        let full: u32 = limit.parse().unwrap();
        assert_eq!(
            remaining,
            full - 1,
            "{path}: the stalled request stayed counted"
        );
    }
}

const JOBS: &str = r#"
[upstream]
url = "{upstream}"

[store]
backend = "redis"
url = "{redis}"
timeout = "2s"

[[routes]]
name = "gen"
method = "POST"
path = "/gen"
job = { id = "json:/id" }

[[routes]]
name = "status"
method = "GET"
path = "/gen/status"
job_status = { id = "query:id", state = "json:/status", done = ["completed"] }

[plans.p]
[[plans.p.limits]]
name = "video-jobs"
kind = "jobs"
max = 3
routes = ["gen"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_shared_by_every_instance_and_expire_on_redis_time() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = JOBS.replace("{redis}", &redis.url());
    let mut nodes = instances(&config, &up, 2).await;
    // 30 submissions at once over both instances: exactly 3 jobs.
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let url = nodes[i % 2].url("/gen");
            tokio::spawn(async move { call("POST", &url, Some("k")).await.status })
        })
        .collect();
    assert_eq!(
        statuses(tasks).await,
        [(200, 3), (429, 27)].into_iter().collect()
    );
    assert_eq!(up.hits(), 3);
    let (a, b) = (&nodes[0], &nodes[1]);
    // A poll answered through B ends a job submitted through either.
    let ids: Vec<String> = (1..=3).map(|n| format!("job-{n}")).collect();
    let r = call(
        "GET",
        &b.url(&format!("/gen/status?id={}&state=completed", ids[0])),
        Some("k"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(call("POST", &a.url("/gen"), Some("k")).await.status, 200);
    assert_eq!(call("POST", &b.url("/gen"), Some("k")).await.status, 429);
    let a_started = a.app.store().jobs_in_progress();

    // Instance A goes away; the jobs it started stay in Redis until they end.
    nodes.remove(0);
    let b = &nodes[0];
    assert_eq!(call("POST", &b.url("/gen"), Some("k")).await.status, 429);

    // max_duration is counted on Redis's clock: move one job's expiry into
    // the past and the next decision frees its slot (and counts it expired).
    let keys = redis_cli(&redis, &["--scan", "--pattern", "*"]);
    // (The job index, `<prefix>job:<hash>`, and turnstile's marker are
    // beside the counter, whose key alone has a hash tag.)
    let key = keys.lines().find(|k| k.contains('{')).expect("a jobs key");
    let members = redis_cli(&redis, &["zrange", key, "0", "-1"]);
    assert_eq!(
        members.lines().filter(|m| m.starts_with("j:")).count(),
        3,
        "{members}"
    );
    assert_eq!(redis_cli(&redis, &["zadd", key, "XX", "1", "j:job-2"]), "0");
    assert_eq!(call("POST", &b.url("/gen"), Some("k")).await.status, 200);
    assert_eq!(b.app.store().jobs_expired(), 1);
    assert_eq!(call("POST", &b.url("/gen"), Some("k")).await.status, 429);
    // The jobs gauges of the instances add up to the jobs in progress.
    assert_eq!(a_started + b.app.store().jobs_in_progress(), 3);
}

const CREDITS: &str = r#"
[upstream]
url = "{upstream}"

[admin]
listen = "127.0.0.1:0"

[store]
backend = "redis"
url = "{redis}"
timeout = "2s"

[[routes]]
name = "flat"
path = "/flat"
cost = 10

[[routes]]
name = "billed"
path = "/bill"
cost = 10
settle = "header:x-credits-used"

[[routes]]
name = "refunded"
path = "/status/{code}"
cost = 10
refund_on = ["5xx"]

[plans.p]
[[plans.p.limits]]
name = "credits"
kind = "credits"
grant = 100
refill = "month"

[[plans.p.limits]]
name = "daily-spend"
window = "1d"
requests = 1000
count = "cost"

# Would refuse all but the first request of each minute: never enforced.
[[plans.p.limits]]
name = "watching"
window = "1m"
requests = 1
shadow = true
"#;

async fn shared_balance(p: &Proxy) -> i64 {
    let got = call("GET", &p.admin_url("/v1/credits?key=k"), None).await;
    assert_eq!(got.status, 200, "{}", got.body);
    got.json()["balance"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_credits_balance_is_never_overspent_across_two_instances() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = CREDITS.replace("{redis}", &redis.url());
    let nodes = instances(&config, &up, 2).await;
    let got = statuses(spread(&nodes, "/flat", "k", 30)).await;
    assert_eq!(got.get(&200), Some(&10), "{got:?}");
    assert_eq!(got.get(&402), Some(&20), "{got:?}");
    assert_eq!(up.hits(), 10);
    assert_eq!(shared_balance(&nodes[1]).await, 0);

    // A top-up through one instance is spent through the other.
    let set = send(
        req("POST", &nodes[0].admin_url("/v1/credits?key=k"))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                r#"{"set":50}"#,
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (set.status, set.json()["balance"].as_i64()),
        (200, Some(50))
    );
    assert_eq!(shared_balance(&nodes[1]).await, 50);
    // Settled in Redis: 10 reserved, 2 used.
    assert_eq!(
        call("GET", &nodes[1].url("/bill?used=2"), Some("k"))
            .await
            .status,
        200
    );
    assert_eq!(shared_balance(&nodes[0]).await, 48);
    // Refunded in Redis: credits and the cost-counting window.
    assert_eq!(
        call("GET", &nodes[0].url("/status/500"), Some("k"))
            .await
            .status,
        500
    );
    assert_eq!(shared_balance(&nodes[1]).await, 48);
    let usage = call("GET", &nodes[1].admin_url("/v1/usage?key=k"), None)
        .await
        .json();
    let daily = counter_named(&usage, "daily-spend");
    assert_eq!(daily["used"], 102, "{usage}");
    let credits = counter_named(&usage, "credits");
    assert_eq!(credits["balance"], 48, "{usage}");
    // The balance key carries its refill period: it expires at the month's end.
    let keys = redis_cli(&redis, &["--scan", "--pattern", "*"]);
    assert!(keys.lines().count() >= 2, "{keys}");
    // (turnstile's marker, a few bytes, is the one key kept for good.)
    for key in keys.lines().filter(|k| !k.contains("marker")) {
        let ttl: i64 = redis_cli(&redis, &["PTTL", key]).parse().unwrap();
        assert!(ttl > 0, "{key} expires (ttl {ttl})");
    }
}

const RUNTIME_KEYS: &str = r#"
[upstream]
url = "{upstream}"

[store]
backend = "redis"
url = "{redis}"
timeout = "2s"

[identity]
key_store = "redis"
max_keys_per_account = 3

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "gen"
path = "/gen"

[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 100
window = "1m"

[plans.pro]
[[plans.pro.limits]]
name = "pro-minute"
requests = 1000
window = "1m"
"#;

async fn admin_json(p: &Proxy, method: &str, path: &str, body: serde_json::Value) -> Got {
    send(
        req(method, &p.admin_url(path))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap(),
    )
    .await
}

/// Polls a request until it answers `status`; returns how long that took.
async fn until_status(url: &str, key: &str, status: u16) -> Duration {
    let started = Instant::now();
    loop {
        if call("GET", url, Some(key)).await.status == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not {status} within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A key created through instance A works through B within a second; a
/// revoke and a re-plan through B are in force on A within a second; the
/// cap holds across instances; a restarted instance loads the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_keys_are_shared_by_every_instance() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = RUNTIME_KEYS.replace("{redis}", &redis.url());
    let ps = instances(&config, &up, 2).await;
    let (a, b) = (&ps[0], &ps[1]);

    let made = admin_json(
        a,
        "POST",
        "/v1/keys",
        serde_json::json!({"account": "acme", "plan": "free"}),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let key = made.json()["key"].as_str().unwrap().to_owned();
    let fp = made.json()["fingerprint"].as_str().unwrap().to_owned();
    let seen = until_status(&b.url("/gen"), &key, 200).await;
    eprintln!("create on A -> admitted on B after {seen:?}");

    let replanned = admin_json(
        b,
        "PATCH",
        &format!("/v1/keys/{fp}"),
        serde_json::json!({"plan": "pro"}),
    )
    .await;
    assert_eq!(replanned.status, 200, "{}", replanned.body);
    let started = Instant::now();
    loop {
        if call("GET", &a.url("/gen"), Some(&key))
            .await
            .h("x-ratelimit-limit")
            == "1000"
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "re-plan not seen on A within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let revoked = admin_json(
        b,
        "PATCH",
        &format!("/v1/keys/{fp}"),
        serde_json::json!({"revoked": true}),
    )
    .await;
    assert_eq!(revoked.status, 200);
    let refused = until_status(&a.url("/gen"), &key, 401).await;
    eprintln!("revoke on B -> refused on A after {refused:?}");

    // The cap counts the account's keys on every instance: 3 at most, of
    // 8 creations spread over both.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let url = ps[i % 2].admin_url("/v1/keys");
            tokio::spawn(async move {
                send(
                    req("POST", &url)
                        .body(http_body_util::Full::new(bytes::Bytes::from(
                            r#"{"account":"bulk","plan":"free"}"#,
                        )))
                        .unwrap(),
                )
                .await
                .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let counted = tally(statuses);
    assert_eq!(
        (counted.get(&201), counted.get(&409)),
        (Some(&3), Some(&5)),
        "{counted:?}"
    );

    // A new instance reads the keys before it serves.
    let late = Proxy::start(&config, &up).await;
    let listed = admin_json(&late, "GET", "/v1/keys?account=bulk", serde_json::json!({})).await;
    assert_eq!(
        listed.json()["keys"].as_array().unwrap().len(),
        3,
        "{}",
        listed.body
    );
    assert_eq!(call("GET", &late.url("/gen"), Some(&key)).await.status, 401);
}

const DECIDING: &str = r#"
[upstream]
url = "{upstream}"

[decision]
listen = "127.0.0.1:0"

[store]
backend = "redis"
url = "{redis}"
timeout = "2s"

[[routes]]
name = "gen"
method = "POST"
path = "/gen"

[plans.p]
[[plans.p.limits]]
name = "daily"
requests = 29
window = "1d"
"#;

/// Two instances on one Redis deciding for one gateway: exactly the limit
/// across both, shared with their proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_deciding_for_one_gateway_are_exact_together() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let proxies = instances(&DECIDING.replace("{redis}", &redis.url()), &up, 2).await;
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let d = proxies[i % 2].decision.unwrap();
            tokio::spawn(async move {
                let r = req("GET", &format!("http://{d}/auth"))
                    .header("x-forwarded-method", "POST")
                    .header("x-forwarded-uri", "/gen")
                    .header("authorization", "Bearer shared-key")
                    .body(http_body_util::Full::new(hyper::body::Bytes::new()))
                    .unwrap();
                send(r).await.status
            })
        })
        .collect();
    let counts = statuses(tasks).await;
    assert_eq!(
        (counts.get(&200), counts.get(&429)),
        (Some(&29), Some(&271)),
        "{counts:?}"
    );
    // The proxies count on the same limit: nothing is left for them either.
    assert_eq!(
        call("POST", &proxies[1].url("/gen"), Some("shared-key"))
            .await
            .status,
        429
    );
    assert_eq!(up.hits(), 0);
}

const POOL: &str = r#"
[upstream]
url = "{upstream}"

[admin]
listen = "127.0.0.1:0"

[store]
backend = "redis"
url = "{redis}"
timeout = "2s"

[identity]
sources = ["bearer"]
keys_file = "keys.toml"

[[routes]]
name = "hold"
path = "/hold"

[[routes]]
name = "gen"
method = "POST"
path = "/gen"
job = { id = "json:/id" }

[[capacity]]
name = "gpu"
max = {max}
routes = ["hold", "gen"]
max_wait = "60s"
weights = { premium = 4 }

[plans.premium]
[[plans.premium.limits]]
name = "video-jobs"
kind = "jobs"
max = 5
routes = ["gen"]

[plans.free]
limits = []
"#;

const POOL_KEYS: &str = "[[keys]]\nkey = \"premium\"\nplan = \"premium\"\n\n[[keys]]\nkey = \"free\"\nplan = \"free\"\n";

async fn pool_instances(redis: &Redis, up: &Upstream, max: u32) -> (Proxy, Proxy) {
    let config = POOL
        .replace("{redis}", &redis.url())
        .replace("{max}", &max.to_string());
    let files = [("keys.toml", POOL_KEYS)];
    let a = Proxy::start_with(&config, up, &files).await;
    let b = Proxy::start_with(&config, up, &files).await;
    (a, b)
}

async fn pool_figures(p: &Proxy) -> serde_json::Value {
    let got = call("GET", &p.admin_url("/v1/capacity"), None).await;
    assert_eq!(got.status, 200, "{}", got.body);
    got.json()["pools"][0].clone()
}

async fn until_pool(p: &Proxy, what: &str, n: u64) {
    eventually_async(&format!("{what} {n}"), || async {
        pool_figures(p).await[what].as_u64() == Some(n)
    })
    .await;
}

fn hold_on(p: &Proxy, key: &'static str) -> tokio::task::JoinHandle<Got> {
    let url = p.url("/hold");
    tokio::spawn(async move { call("GET", &url, Some(key)).await })
}

#[tokio::test]
async fn one_capacity_pool_for_every_instance() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let (a, b) = pool_instances(&redis, &up, 3).await;
    // Twelve requests over both instances: never more than 3 upstream.
    let mut held = Vec::new();
    for i in 0..12 {
        held.push(hold_on(if i % 2 == 0 { &a } else { &b }, "free"));
    }
    eventually("three at the upstream", || up.hits() == 3).await;
    until_pool(&a, "waiting_total", 9).await;
    assert_eq!(pool_figures(&b).await["in_use"], 3, "B sees A's slots");
    for n in 4..=12 {
        up.release(1);
        eventually("the next forwarded", || up.hits() == n).await;
    }
    up.release(3);
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    assert_eq!(
        up.max_in_flight(),
        3,
        "the pool never exceeded max across instances"
    );
    until_pool(&a, "in_use", 0).await;
}

#[tokio::test]
async fn a_slot_freed_on_one_instance_goes_to_a_waiter_on_another_by_weight() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let (a, b) = pool_instances(&redis, &up, 1).await;
    let first = hold_on(&a, "free");
    eventually("the slot taken on A", || up.hits() == 1).await;
    // Free callers wait on A, premium ones (weight 4) on B.
    let mut waiters = Vec::new();
    for _ in 0..8 {
        waiters.push(hold_on(&a, "free"));
    }
    until_pool(&a, "waiting_total", 8).await;
    for _ in 0..8 {
        waiters.push(hold_on(&b, "premium"));
    }
    until_pool(&a, "waiting_total", 16).await;
    for n in 2..=11 {
        up.release(1);
        eventually("the next forwarded", || up.hits() == n).await;
    }
    let plans: Vec<String> = up.seen()[1..]
        .iter()
        .map(|s| s.headers["x-turnstile-plan"].to_str().unwrap().to_owned())
        .collect();
    let premium = plans.iter().filter(|p| *p == "premium").count();
    eprintln!("premium {premium} of 10 freed slots: {plans:?}");
    // 4:1 over ten freed slots: 8 premium, within one.
    assert!((7..=9).contains(&premium), "{plans:?}");
    up.release(100);
    for w in waiters {
        assert_eq!(w.await.unwrap().status, 200);
    }
    assert_eq!(first.await.unwrap().status, 200);
    until_pool(&b, "in_use", 0).await;
}

#[tokio::test]
async fn a_job_started_on_one_instance_is_ended_by_id_on_another() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let (a, b) = pool_instances(&redis, &up, 1).await;
    let submit = call("POST", &a.url("/gen"), Some("premium")).await;
    assert_eq!(
        (submit.status, submit.json()["id"].as_str()),
        (200, Some("job-1"))
    );
    assert_eq!(pool_figures(&b).await["in_use"], 1);
    let usage = call("GET", &b.admin_url("/v1/usage?key=premium"), None)
        .await
        .json();
    assert_eq!(usage["counters"][0]["in_progress"], 1, "{usage}");
    let end = req("POST", &b.admin_url("/v1/jobs/end"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"id":"job-1"}"#,
        )))
        .unwrap();
    let ended = send(end).await;
    assert_eq!(ended.status, 200, "{}", ended.body);
    let ended = ended.json();
    assert_eq!(ended["ended"][0]["pools"], serde_json::json!(["gpu"]));
    assert_eq!(
        ended["ended"][0]["held"][0]["limits"],
        serde_json::json!(["video-jobs"])
    );
    assert_eq!(pool_figures(&a).await["in_use"], 0);
    let usage = call("GET", &a.admin_url("/v1/usage?key=premium"), None)
        .await
        .json();
    assert_eq!(usage["counters"][0]["in_progress"], 0, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_slots_and_waiters_of_a_killed_instance_come_back_within_the_lease() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\n[upstream]\nurl = \"{{upstream}}\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\nlease = \"1s\"\n[[routes]]\nname = \"slots\"\npath = \"/hold\"\n[[capacity]]\nname = \"gpu\"\nmax = 2\nroutes = [\"slots\"]\nmax_wait = \"20s\"\n",
        redis.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let doomed = Binary::start(dir.path(), &config, &up).await;
    // Two slots held through the doomed instance, and a third request waiting there.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let url = doomed.url("/hold");
            tokio::spawn(async move { call("GET", &url, Some("k")).await })
        })
        .collect();
    eventually("two at the upstream", || up.hits() == 2).await;
    // Renewed while alive: still held after more than one lease.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let survivor = Proxy::start(&config.replace("listen = \"127.0.0.1:{port}\"", ""), &up).await;
    let url = survivor.url("/hold");
    let waiting = tokio::spawn(async move { call("GET", &url, Some("k")).await.status });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the survivor's request waits for a slot"
    );
    assert_eq!(up.hits(), 2);

    doomed.signal("KILL");
    let killed_at = Instant::now();
    for h in held {
        let _ = h.await;
    }
    // The dead instance's slots expire with their lease; the slot granted to
    // its dead waiter expires the same way; then the survivor's waiter gets one.
    eventually("the survivor's request forwarded", || up.hits() == 3).await;
    let freed_after = killed_at.elapsed();
    assert!(
        freed_after <= Duration::from_millis(3500),
        "freed after {freed_after:?}, lease is 1 s"
    );
    up.release(1);
    assert_eq!(waiting.await.unwrap(), 200);
}

#[tokio::test]
async fn while_redis_is_down_a_pool_follows_on_error() {
    let mut redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = |on_error: &str| {
        format!(
            "[upstream]\nurl = \"{{upstream}}\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"300ms\"\non_error = \"{on_error}\"\n[[routes]]\nname = \"slots\"\npath = \"/hold\"\n[[capacity]]\nname = \"gpu\"\nmax = 1\nroutes = [\"slots\"]\nmax_wait = \"0s\"\n",
            redis.url()
        )
    };
    let local = Proxy::start(&config("local"), &up).await;
    let deny = Proxy::start(&config("deny"), &up).await;
    redis.kill();
    // local: this instance's own pool of 1.
    let url = local.url("/hold");
    let first = tokio::spawn(async move { call("GET", &url, Some("k")).await.status });
    eventually("one at the upstream", || up.hits() == 1).await;
    let second = call("GET", &local.url("/hold"), Some("k2")).await;
    assert_eq!(
        (second.status, second.json()["error"].as_str()),
        (503, Some("over_capacity"))
    );
    // deny: refused as the limits are.
    let r = call("GET", &deny.url("/hold"), Some("k")).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (503, Some("store_unavailable"))
    );
    up.release(1);
    assert_eq!(first.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_forgot_is_never_a_silent_full_grant() {
    let mut redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = format!(
        "[upstream]\nurl = \"{{upstream}}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"500ms\"\non_error = \"deny\"\n[[routes]]\nname = \"gen\"\npath = \"/gen\"\n[plans.p]\n[[plans.p.limits]]\nname = \"credits\"\nkind = \"credits\"\ngrant = 10\nrefill = \"month\"\n",
        redis.url()
    );
    let p = Proxy::start(&config, &up).await;
    for _ in 0..8 {
        assert_eq!(call("GET", &p.url("/gen"), Some("k")).await.status, 200);
    }
    // The marker is written within a second of the first connection.
    eventually("the marker", || {
        redis_cli(&redis, &["exists", "turnstile:marker"]).trim() == "1"
    })
    .await;
    // Restarted without persistence: the balance of 2 is gone from Redis.
    redis.restart().await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let r = call("GET", &p.url("/gen"), Some("k")).await;
        statuses.push(r.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        statuses.iter().all(|s| *s == 503),
        "never a fresh grant: {statuses:?}"
    );
    let r = call("GET", &p.url("/gen"), Some("k")).await;
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("lost turnstile's data"),
        "{}",
        r.body
    );
    let ready = call("GET", &p.admin_url("/readyz"), None).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    // The operator acknowledges: counting starts afresh.
    let ack = admin_json(&p, "POST", "/v1/store/ack", serde_json::json!({})).await;
    assert_eq!(
        (ack.status, ack.json()["was_lost"].as_bool()),
        (200, Some(true)),
        "{}",
        ack.body
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = call("GET", &p.url("/gen"), Some("k")).await;
        if r.status == 200 {
            let credits = call("GET", &p.admin_url("/v1/credits?key=k"), None).await;
            assert_eq!(credits.json()["balance"], 9, "{}", credits.body);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back after the ack: {}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn redis_settings_that_lose_counts_are_warned_about_at_startup() {
    require_redis();
    let up = Upstream::start().await;
    let config = "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nurl = \"{upstream}\"\n[store]\nbackend = \"redis\"\nurl = \"{redis}\"\n";
    // No persistence, and evicting under memory pressure.
    let dir = tempfile::tempdir().unwrap();
    let careless = Redis::on_port(
        free_port(),
        tempfile::tempdir().unwrap(),
        &["--maxmemory-policy", "allkeys-lru"],
    )
    .await;
    let b = Binary::start(dir.path(), &config.replace("{redis}", &careless.url()), &up).await;
    let line = b.log_line("maxmemory-policy noeviction").await;
    assert!(line.contains("allkeys-lru"), "{line}");
    b.log_line("a restart forgets every count and balance")
        .await;
    // Kept on disk, never evicted: no warning.
    let dir = tempfile::tempdir().unwrap();
    let careful = Redis::on_port(
        free_port(),
        tempfile::tempdir().unwrap(),
        &["--appendonly", "yes", "--maxmemory-policy", "noeviction"],
    )
    .await;
    let mut b = Binary::start(dir.path(), &config.replace("{redis}", &careful.url()), &up).await;
    // The marker shows the guard ran its first check.
    eventually("the marker", || {
        redis_cli(&careful, &["exists", "turnstile:marker"]).trim() == "1"
    })
    .await;
    b.signal("TERM");
    b.wait().await;
    let logs = b.logs();
    assert!(
        !logs.contains("noeviction") && !logs.contains("keeps nothing on disk"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_made_while_redis_was_down_reach_it_when_it_is_back() {
    let mut redis = Redis::persistent().await;
    let up = Upstream::start().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\n[upstream]\nurl = \"{{upstream}}\"\n[admin]\nlisten = \"127.0.0.1:{{admin_port}}\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"500ms\"\non_error = \"local\"\n[[routes]]\nname = \"bill\"\npath = \"/bill\"\ncost = 2\nsettle = \"header:x-credits-used\"\n[plans.p]\n[[plans.p.limits]]\nname = \"credits\"\nkind = \"credits\"\ngrant = 10000\nrefill = \"month\"\n",
        redis.url()
    );
    // The real clock: the instance's and Redis's agree on the refill period.
    let dir = tempfile::tempdir().unwrap();
    let p = Binary::start(dir.path(), &config, &up).await;
    p.wait_admin().await;
    let url = p.admin("/v1/credits?key=k");
    let balance = || balance_at(&url);
    // Estimated at 2, the upstream says 200: the balance follows the upstream.
    assert_eq!(
        call("GET", &p.url("/bill?used=200"), Some("k"))
            .await
            .status,
        200
    );
    eventually_async("the first settlement", || async {
        balance().await == Some(9800)
    })
    .await;
    // Redis goes away: ten more, admitted locally, each settled at 200.
    redis.kill();
    for _ in 0..10 {
        assert_eq!(
            call("GET", &p.url("/bill?used=200"), Some("k"))
                .await
                .status,
            200
        );
    }
    // Back, with its data: the estimates and the settled differences are
    // applied — 2,200 charged in all, as the upstream charged.
    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = call("GET", &p.url("/bill"), Some("k")).await;
        // (Each of these costs its estimate of 2, settled by no figure.)
        let spent_since = 2 * (up.hits() as i64 - 11);
        if balance().await == Some(7800 - spent_since) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redis holds {:?}, expected {}",
            balance().await,
            7800 - spent_since
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_ended_while_redis_was_down_is_ended_in_it_when_it_is_back() {
    let mut redis = Redis::persistent().await;
    let up = Upstream::start().await;
    let config = JOBS.replace("{redis}", &redis.url()).replace(
        "[store]",
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[store]\non_error = \"local\"",
    );
    let p = Proxy::start(&config, &up).await;
    let submit = call("POST", &p.url("/gen"), Some("k")).await;
    assert_eq!(
        (submit.status, submit.json()["id"].as_str()),
        (200, Some("job-1"))
    );
    let in_progress = || async {
        let r = call("GET", &p.admin_url("/v1/usage?key=k"), None).await;
        (r.status == 200).then(|| r.json()["counters"][0]["in_progress"].as_i64().unwrap())
    };
    assert_eq!(in_progress().await, Some(1));
    // The job finishes while Redis is away: its status poll says so.
    redis.kill();
    let poll = call(
        "GET",
        &p.url("/gen/status?id=job-1&state=completed"),
        Some("k"),
    )
    .await;
    assert_eq!(poll.status, 200);
    // Back with its data: the ending is applied, the slot is free (not held
    // until max_duration).
    redis.restart().await;
    eventually_async("job-1 ended in redis", || async {
        in_progress().await == Some(0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_started_while_redis_was_down_is_held_in_it_when_it_is_back() {
    let mut redis = Redis::persistent().await;
    let up = Upstream::start().await;
    let config = JOBS.replace("{redis}", &redis.url()).replace(
        "[store]",
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[store]\non_error = \"local\"",
    );
    let p = Proxy::start(&config, &up).await;
    let in_progress = || async {
        let r = call("GET", &p.admin_url("/v1/usage?key=k"), None).await;
        (r.status == 200).then(|| r.json()["counters"][0]["in_progress"].as_i64().unwrap())
    };
    assert_eq!(call("POST", &p.url("/gen"), Some("k")).await.status, 200);
    assert_eq!(in_progress().await, Some(1));
    // Redis away: the local fallback starts job-2.
    redis.kill();
    let local = call("POST", &p.url("/gen"), Some("k")).await;
    assert_eq!(
        (local.status, local.json()["id"].as_str()),
        (200, Some("job-2"))
    );
    // Back with its data: job-2 is held there too (2 of max 3).
    redis.restart().await;
    eventually_async("job-2 in redis", || async {
        in_progress().await == Some(2)
    })
    .await;
    // And it ends there by its poll.
    let poll = call(
        "GET",
        &p.url("/gen/status?id=job-2&state=completed"),
        Some("k"),
    )
    .await;
    assert_eq!(poll.status, 200);
    assert_eq!(in_progress().await, Some(1));
}

#[tokio::test]
async fn a_redis_pool_refusal_says_how_many_wait() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = format!(
        "[upstream]\nurl = \"{{upstream}}\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\n[[routes]]\nname = \"slots\"\npath = \"/hold\"\n[[capacity]]\nname = \"gpu\"\nmax = 1\nroutes = [\"slots\"]\nmax_wait = \"300ms\"\n",
        redis.url()
    );
    let p = Proxy::start(&config, &up).await;
    let first = hold_on(&p, "free");
    eventually("the slot taken", || up.hits() == 1).await;
    // Two wait; the first of them runs out of time while the other still waits.
    let url = p.url("/hold");
    let early = tokio::spawn(async move { call("GET", &url, Some("k3")).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let url = p.url("/hold");
    let patient = tokio::spawn(async move { call("GET", &url, Some("k2")).await });
    let r = early.await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["capacity"]["waiting"], 1, "{}", r.body);
    assert_eq!(patient.await.unwrap().status, 503);
    up.release(1);
    assert_eq!(first.await.unwrap().status, 200);
}

/// `INFO commandstats`' call count of `command` (0 when never called).
fn calls_of(redis: &Redis, command: &str) -> u64 {
    let stats = redis_cli(redis, &["info", "commandstats"]);
    stats
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{command}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .map_or(0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_one_function_call_reloaded_when_redis_forgets_it() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = EXACT.replace("{redis}", &redis.url());
    let p = Proxy::start(&config, &up).await;
    for _ in 0..5 {
        assert_eq!(call("GET", &p.url("/fixed"), Some("k")).await.status, 200);
    }
    let library = redis_cli(&redis, &["function", "list"]);
    assert!(library.contains("turnstile_decide_"), "{library}");
    assert_eq!(calls_of(&redis, "fcall"), 5);
    assert_eq!(calls_of(&redis, "evalsha"), 0);
    // The library is gone (FUNCTION FLUSH, or a Redis restarted empty):
    // it is loaded again and the decision made by it.
    assert_eq!(redis_cli(&redis, &["function", "flush"]), "OK");
    assert_eq!(call("GET", &p.url("/fixed"), Some("k")).await.status, 200);
    // (The call that found no function counts too.)
    assert_eq!(calls_of(&redis, "fcall"), 7);
    assert_eq!(calls_of(&redis, "evalsha"), 0);
    assert!(redis_cli(&redis, &["function", "list"]).contains("turnstile_decide_"));
    // A Redis without Functions gets the script, with the same limits.
    let old = Redis::on_port(
        free_port(),
        tempfile::tempdir().unwrap(),
        &["--rename-command", "FUNCTION", ""],
    )
    .await;
    let p = Proxy::start(&EXACT.replace("{redis}", &old.url()), &up).await;
    let mut got = Vec::new();
    for _ in 0..40 {
        got.push(call("GET", &p.url("/fixed"), Some("k")).await.status);
    }
    assert_eq!(tally(got)[&200], 37);
    assert_eq!(calls_of(&old, "fcall"), 0);
    assert!(calls_of(&old, "evalsha") >= 40);
}
