//! Shared capacity (`[[capacity]]`): a pool of slots across every caller
//! of its routes, handed out in weighted fair order while requests wait —
//! held, not refused; shares by plan weight; round-robin between keys; no
//! slot leaked by any ending; job slots held until the job ends, including
//! by `POST /v1/jobs/end`. Real server, real upstream (its `/hold` answers
//! only when the test opens its gate).

mod support;

use std::time::Duration;

use support::*;

const CONFIG: &str = r#"
[upstream]
url = "{upstream}"

[admin]
listen = "127.0.0.1:0"

[identity]
sources = ["bearer"]
keys_file = "keys.toml"

[[routes]]
name = "hold"
path = "/hold"

[[routes]]
name = "fail"
path = "/status/500"

[[routes]]
name = "slow"
path = "/slow"
timeout = "300ms"

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

[[capacity]]
name = "gpu"
max = {max}
routes = ["hold", "fail", "slow", "gen"]
max_wait = "{max_wait}"
max_queue = 100
weights = { premium = 4, pro = 2 }
max_duration = "1h"

[plans.premium]
[[plans.premium.limits]]
name = "minute"
routes = ["hold", "gen"]
requests = 1000
window = "1m"

[plans.pro]
limits = []

[plans.free]
[[plans.free.limits]]
name = "minute"
routes = ["hold", "gen"]
requests = 1000
window = "1m"
"#;

/// Keys `<plan>-<n>` for n in 0..10 of each plan.
fn keys() -> String {
    let mut out = String::new();
    for plan in ["premium", "pro", "free"] {
        for n in 0..10 {
            out.push_str(&format!(
                "[[keys]]\nkey = \"{plan}-{n}\"\nplan = \"{plan}\"\n\n"
            ));
        }
    }
    out
}

async fn start(max: u32, max_wait: &str) -> (Proxy, Upstream) {
    let up = Upstream::start().await;
    let config = CONFIG
        .replace("{max}", &max.to_string())
        .replace("{max_wait}", max_wait);
    let p = Proxy::start_with(&config, &up, &[("keys.toml", &keys())]).await;
    (p, up)
}

async fn pool(p: &Proxy) -> serde_json::Value {
    let got = call("GET", &p.admin_url("/v1/capacity"), None).await;
    assert_eq!(got.status, 200, "{}", got.body);
    got.json()["pools"][0].clone()
}

async fn in_use(p: &Proxy) -> u64 {
    pool(p).await["in_use"].as_u64().unwrap()
}

async fn waiting(p: &Proxy) -> u64 {
    pool(p).await["waiting_total"].as_u64().unwrap()
}

/// Waits until the pool shows `n` waiting.
async fn until_waiting(p: &Proxy, n: u64) {
    eventually_async(&format!("{n} waiting"), || async { waiting(p).await == n }).await;
}

/// Waits until the pool shows `n` slots in use.
async fn until_in_use(p: &Proxy, n: u64) {
    eventually_async(&format!("{n} in use"), || async { in_use(p).await == n }).await;
}

fn hold(p: &Proxy, key: &str) -> tokio::task::JoinHandle<Got> {
    let url = p.url("/hold");
    let key = key.to_owned();
    tokio::spawn(async move { call("GET", &url, Some(&key)).await })
}

#[tokio::test]
async fn a_request_over_capacity_is_held_then_admitted_when_a_slot_frees() {
    let (p, up) = start(2, "30s").await;
    let a = hold(&p, "free-0");
    let b = hold(&p, "free-1");
    eventually("two at the upstream", || up.hits() == 2).await;
    let c = hold(&p, "free-2");
    until_waiting(&p, 1).await;
    assert_eq!(
        up.hits(),
        2,
        "the third waits in turnstile, not at the upstream"
    );
    up.release(1);
    eventually("the third forwarded", || up.hits() == 3).await;
    up.release(2);
    for r in [a, b, c] {
        assert_eq!(r.await.unwrap().status, 200);
    }
    assert_eq!(up.max_in_flight(), 2, "never more than max at once");
    until_in_use(&p, 0).await;
}

#[tokio::test]
async fn no_slot_in_time_is_a_503_that_consumes_nothing() {
    let (p, up) = start(1, "0s").await;
    let a = hold(&p, "free-0");
    eventually("one at the upstream", || up.hits() == 1).await;
    let r = call("GET", &p.url("/hold"), Some("free-1")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.h("retry-after"), "5");
    assert_eq!(
        r.json(),
        serde_json::json!({
            "error": "over_capacity",
            "message": "All 1 generation slots are busy (gpu). Retry in 5 s.",
            "capacity": {"name": "gpu", "max": 1, "waiting": 0}
        })
    );
    up.release(1);
    assert_eq!(a.await.unwrap().status, 200);
    // The refused request took nothing from the caller's own minute limit.
    let next = hold(&p, "free-1");
    up.release(1);
    let next = next.await.unwrap();
    assert_eq!((next.status, next.h("x-ratelimit-remaining")), (200, "999"));
    let metrics = call("GET", &p.admin_url("/metrics"), None).await.body;
    assert!(
        metrics.contains("turnstile_capacity_refused_total{name=\"gpu\",plan=\"free\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("turnstile_capacity_wait_seconds_count{name=\"gpu\",plan=\"free\"} 2"));
    let figures = pool(&p).await;
    assert!(
        figures["mean_wait_seconds"]["free"].as_f64().unwrap() >= 0.0,
        "{figures}"
    );
    assert_eq!(figures["mean_wait_seconds"]["premium"], 0.0, "{figures}");
}

#[tokio::test]
async fn the_queue_runs_out_at_max_wait_and_leaves_nothing_behind() {
    let (p, up) = start(1, "200ms").await;
    let a = hold(&p, "free-0");
    eventually("one at the upstream", || up.hits() == 1).await;
    let started = std::time::Instant::now();
    let r = call("GET", &p.url("/hold"), Some("pro-0")).await;
    assert_eq!(r.status, 503);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(waiting(&p).await, 0);
    up.release(1);
    assert_eq!(a.await.unwrap().status, 200);
    until_in_use(&p, 0).await;
}

/// Plan of each request the upstream saw, in order.
fn plans_seen(up: &Upstream) -> Vec<String> {
    up.seen()
        .iter()
        .map(|s| s.headers["x-turnstile-plan"].to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn freed_slots_go_to_plans_by_weight() {
    let (p, up) = start(1, "60s").await;
    let first = hold(&p, "free-9");
    eventually("the slot taken", || up.hits() == 1).await;
    // 12 waiters per plan, in arrival order premium, pro, free (a FIFO
    // queue would serve all premium first, then pro).
    let mut waiters = Vec::new();
    for (plan, n) in [("premium", 12), ("pro", 12), ("free", 12)] {
        for i in 0..n {
            waiters.push(hold(&p, &format!("{plan}-{}", i % 10)));
        }
    }
    until_waiting(&p, 36).await;
    // Free 14 slots one at a time: 8 premium, 4 pro, 2 free (4:2:1).
    for n in 2..=15 {
        up.release(1);
        eventually("the next forwarded", || up.hits() == n).await;
    }
    let seen = plans_seen(&up);
    let count = |plan: &str| seen[1..].iter().filter(|p| *p == plan).count();
    let (premium, pro, free) = (count("premium"), count("pro"), count("free"));
    assert_eq!(premium + pro + free, 14);
    eprintln!("shares of 14 freed slots: premium {premium}, pro {pro}, free {free}");
    // Within one slot of the exact shares 8, 4, 2.
    assert!((7..=9).contains(&premium), "{seen:?}");
    assert!((3..=5).contains(&pro), "{seen:?}");
    assert!((1..=3).contains(&free), "{seen:?}");
    up.release(100);
    for w in waiters {
        assert_eq!(w.await.unwrap().status, 200);
    }
    assert_eq!(first.await.unwrap().status, 200);
    until_in_use(&p, 0).await;
}

#[tokio::test]
async fn a_key_that_queued_late_is_served_within_the_next_slots() {
    let (p, up) = start(1, "60s").await;
    let first = hold(&p, "free-9");
    eventually("the slot taken", || up.hits() == 1).await;
    let mut waiters = Vec::new();
    for _ in 0..20 {
        waiters.push(hold(&p, "free-0"));
    }
    until_waiting(&p, 20).await;
    for _ in 0..2 {
        waiters.push(hold(&p, "free-1"));
    }
    until_waiting(&p, 22).await;
    for n in 2..=5 {
        up.release(1);
        eventually("the next forwarded", || up.hits() == n).await;
    }
    let keys: Vec<String> = up
        .seen()
        .iter()
        .map(|s| s.headers["authorization"].to_str().unwrap().to_owned())
        .collect();
    let b = keys[1..].iter().filter(|k| k.ends_with("free-1")).count();
    assert_eq!(b, 2, "B's two within the next four slots: {keys:?}");
    up.release(100);
    for w in waiters {
        assert_eq!(w.await.unwrap().status, 200);
    }
    drop(first);
    until_in_use(&p, 0).await;
}

#[tokio::test]
async fn no_ending_leaks_a_slot() {
    let (p, up) = start(2, "30s").await;
    // Clients that give up while waiting.
    let a = hold(&p, "free-0");
    let b = hold(&p, "free-1");
    eventually("two at the upstream", || up.hits() == 2).await;
    let mut gone = Vec::new();
    for i in 2..8 {
        let url = p.url("/hold");
        let key = format!("free-{i}");
        gone.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(50), call("GET", &url, Some(&key))).await
        }));
    }
    for g in gone {
        assert!(
            g.await.unwrap().is_err(),
            "the client gave up while waiting"
        );
    }
    until_waiting(&p, 0).await;
    up.release(2);
    assert_eq!(a.await.unwrap().status, 200);
    assert_eq!(b.await.unwrap().status, 200);
    until_in_use(&p, 0).await;
    assert_eq!(up.max_in_flight(), 2);
    // Upstream errors, timeouts and a storm of both, many at once.
    let mut storm = Vec::new();
    for i in 0..30 {
        let (path, key) = match i % 3 {
            0 => ("/status/500", format!("pro-{}", i % 10)),
            1 => ("/slow", format!("free-{}", i % 10)),
            _ => ("/hold", format!("premium-{}", i % 10)),
        };
        let url = p.url(path);
        storm.push(tokio::spawn(async move {
            call("GET", &url, Some(&key)).await.status
        }));
    }
    up.release(100);
    let statuses = tally(futures(storm).await);
    assert_eq!(statuses.values().sum::<usize>(), 30, "{statuses:?}");
    assert!(
        statuses.keys().all(|s| [200, 500, 503, 504].contains(s)),
        "{statuses:?}"
    );
    // (A request turnstile stopped waiting for at its timeout frees its
    // slot, though the upstream may still be working on it.)
    until_in_use(&p, 0).await;
}

async fn futures(tasks: Vec<tokio::task::JoinHandle<u16>>) -> Vec<u16> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_job_holds_its_slot_until_it_ends() {
    let (p, _up) = start(1, "0s").await;
    let submit = call("POST", &p.url("/gen"), Some("free-0")).await;
    assert_eq!(
        (submit.status, submit.json()["id"].as_str()),
        (200, Some("job-1"))
    );
    assert_eq!(in_use(&p).await, 1, "held past the exchange");
    assert_eq!(
        call("POST", &p.url("/gen"), Some("free-1")).await.status,
        503
    );
    // Another caller's poll does not end it; the owner's does.
    let other = call(
        "GET",
        &p.url("/gen/status?id=job-1&state=completed"),
        Some("free-1"),
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(in_use(&p).await, 1);
    call(
        "GET",
        &p.url("/gen/status?id=job-1&state=running"),
        Some("free-0"),
    )
    .await;
    assert_eq!(in_use(&p).await, 1);
    call(
        "GET",
        &p.url("/gen/status?id=job-1&state=completed"),
        Some("free-0"),
    )
    .await;
    assert_eq!(in_use(&p).await, 0);
    // A failed submission gives its slot back at once.
    assert_eq!(
        call("POST", &p.url("/gen?fail"), Some("free-0"))
            .await
            .status,
        500
    );
    assert_eq!(in_use(&p).await, 0);
}

#[tokio::test]
async fn the_upstream_ends_a_job_by_its_id_alone() {
    let (p, _up) = start(1, "0s").await;
    assert_eq!(
        call("POST", &p.url("/gen"), Some("premium-0")).await.status,
        200
    );
    assert_eq!(in_use(&p).await, 1);
    let end = |body: &'static str| {
        let url = p.admin_url("/v1/jobs/end");
        async move {
            let req = req("POST", &url)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            send(req).await
        }
    };
    assert_eq!(end(r#"{"id":"job-1","ids":["job-1"]}"#).await.status, 400);
    assert_eq!(end(r#"{"id":"job-9"}"#).await.status, 404);
    let ended = end(r#"{"ids":["job-1","job-9"]}"#).await;
    assert_eq!(ended.status, 200, "{}", ended.body);
    let body = ended.json();
    assert_eq!(body["ended"][0]["id"], "job-1");
    assert_eq!(body["ended"][0]["pools"], serde_json::json!(["gpu"]));
    assert_eq!(body["unknown"], serde_json::json!(["job-9"]));
    assert_eq!(in_use(&p).await, 0);
    assert_eq!(end(r#"{"id":"job-1"}"#).await.status, 404, "ended once");
    let metrics = call("GET", &p.admin_url("/metrics"), None).await.body;
    assert!(
        metrics.contains("turnstile_jobs_ended_total{how=\"upstream\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn mcp_routes_refuse_as_tool_errors() {
    let up = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"

[[routes]]
name = "tools"
path = "/hold"
format = "mcp"

[[capacity]]
name = "gpu"
max = 1
routes = ["tools"]
max_wait = "0s"
"#;
    let p = Proxy::start(config, &up).await;
    let a = hold(&p, "k1");
    eventually("one at the upstream", || up.hits() == 1).await;
    let r = call("GET", &p.url("/hold"), Some("k2")).await;
    assert_eq!(r.status, 200);
    let text = r.json()["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        text,
        "All 1 generation slots are busy (gpu). Try again in 5 s."
    );
    assert_eq!(r.json()["result"]["isError"], true);
    up.release(1);
    assert_eq!(a.await.unwrap().status, 200);
}

#[tokio::test]
async fn config_errors_name_the_place() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("routes = [\"nope\"]", "unknown route \"nope\""),
        (
            "routes = [\"hold\"]\nweights = { gold = 2 }",
            "unknown plan \"gold\"",
        ),
        (
            "routes = [\"hold\"]\nreserve = { free = 5 }",
            "reserves 5 slots, more than its max of 2",
        ),
        (
            "routes = [\"hold\"]\nfair_per = \"ip\"",
            "expected \"key\" or \"account\"",
        ),
        ("routes = []", "covers no route"),
    ];
    for (body, message) in cases {
        let config = format!(
            "[upstream]\nurl = \"{}\"\n[[routes]]\nname = \"hold\"\npath = \"/hold\"\n[plans.free]\nlimits = []\n[[capacity]]\nname = \"gpu\"\nmax = 2\n{body}\n",
            up.url()
        );
        let path = dir.path().join("t.toml");
        std::fs::write(&path, &config).unwrap();
        let e = turnstile::load(&path).unwrap_err().to_string();
        assert!(e.contains(message), "{e}");
        assert!(e.contains("t.toml:1"), "{e}");
    }
}

/// The shipped example in front of the bundled example API (whose videos
/// run 20 s and answer with `vid_N` ids).
async fn gpu_pool_example() -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(turnstile::cli::example_api::serve(listener));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let config = std::fs::read_to_string(dir.join("gpu-pool.toml"))
        .unwrap()
        .replace("url = \"http://127.0.0.1:9000\"", "url = \"{upstream}\"")
        .replace("listen = \"127.0.0.1:8080\"", "")
        .replace("listen = \"127.0.0.1:9090\"", "listen = \"127.0.0.1:0\"");
    let keys = std::fs::read_to_string(dir.join("gpu-pool-keys.toml")).unwrap();
    Proxy::start_url(&config, &api, &[("gpu-pool-keys.toml", &keys)]).await
}

#[tokio::test]
async fn the_gpu_pool_example_keeps_its_reserve_and_frees_slots_by_webhook() {
    let p = gpu_pool_example().await;
    let video = |key: &'static str| {
        let url = p.url("/v1/videos");
        tokio::spawn(async move { call("POST", &url, Some(key)).await })
    };
    // free: 2 videos (its jobs limit), pro: 2; 4 of the 6 slots.
    for key in ["free-key", "free-key", "pro-key", "pro-key"] {
        assert_eq!(video(key).await.unwrap().status, 200);
    }
    assert_eq!(in_use(&p).await, 4);
    // The last 2 slots are premium's reserve: pro's third waits...
    let pro = video("pro-key");
    until_waiting(&p, 1).await;
    // ...while premium takes a slot at once.
    let premium = video("premium-key").await.unwrap();
    assert_eq!(
        (premium.status, premium.json()["id"].as_str()),
        (200, Some("vid_5"))
    );
    assert_eq!(in_use(&p).await, 5);
    // The API's backend reports vid_1 finished (its webhook): its slot
    // frees, and the waiting pro submission gets it.
    let end = req("POST", &p.admin_url("/v1/jobs/end"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"id":"vid_1"}"#,
        )))
        .unwrap();
    let ended = send(end).await;
    assert_eq!(ended.status, 200, "{}", ended.body);
    let held = &ended.json()["ended"][0]["held"][0];
    assert!(
        held["subject"].as_str().unwrap().starts_with("key:"),
        "{held}"
    );
    assert_eq!(held["limits"], serde_json::json!(["videos"]));
    let pro = pro.await.unwrap();
    assert_eq!(
        (pro.status, pro.json()["id"].as_str()),
        (200, Some("vid_6"))
    );
    assert_eq!(in_use(&p).await, 5);
    let usage = call("GET", &p.admin_url("/v1/usage?key=free-key"), None)
        .await
        .json();
    assert_eq!(usage["counters"][0]["in_progress"], 1, "{usage}");
}

#[test]
fn check_lists_each_pool() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/gpu-pool.toml");
    let table = turnstile::load(&path).unwrap().table();
    assert!(
        table.contains("capacity pool gpu (6 at once, waiting up to 30 s, weights: premium 4, pro 2): txt2video"),
        "{table}"
    );
}

#[tokio::test]
async fn a_refusal_says_how_many_still_wait() {
    let (p, up) = start(1, "300ms").await;
    let first = hold(&p, "free-0");
    eventually("the slot taken", || up.hits() == 1).await;
    let early = hold(&p, "free-1");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let patient = hold(&p, "free-2");
    let r = early.await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["capacity"]["waiting"], 1, "{}", r.body);
    assert_eq!(patient.await.unwrap().status, 503);
    up.release(1);
    assert_eq!(first.await.unwrap().status, 200);
}
