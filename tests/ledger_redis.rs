//! The ledger with Redis (docs/ledger.md, "With Redis"), on a real
//! redis-server: several instances write one stream (each event appended
//! by the script that changes the balance), every instance holds every
//! event under the same id, each sink gets every event once in all (not
//! once per instance) in order per account, alerts and exhausted quotas
//! are written once whichever instance sees them, and a Redis restarted
//! empty is rebuilt from the ledger: balances and jobs, never a full grant.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const CONFIG: &str = concat!(
    r#"
[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"
default_plan = "free"

[admin]
listen = "127.0.0.1:0"

[store]
backend = "redis"
url = "{redis}"
timeout = "2s"
on_error = "deny"

[ledger]
path = "state/ledger.db"
durable = "sync"

[[ledger.sinks]]
kind = "http"
url = "{sink}/events"
batch = 7

"#,
    crate::ledger_routes!(),
    r#"
[plans.free]
[[plans.free.limits]]
name = "credits"
kind = "credits"
grant = 100000
refill = "month"
per = "account"
routes = ["flat", "billed", "refunded"]
alerts = ["20%", "5%", "0"]

[[plans.free.limits]]
name = "per-minute"
routes = ["quota"]
per = "account"
window = "1m"
requests = 3

[[plans.free.limits]]
name = "video-jobs"
kind = "jobs"
routes = ["txt2video"]
per = "account"
max = 2
max_duration = "10m"
"#
);

fn config(redis: &Redis, sink: &Upstream, grant: u32) -> String {
    CONFIG
        .replace("{redis}", &redis.url())
        .replace("{sink}", &sink.url())
        .replace("grant = 100000", &format!("grant = {grant}"))
}

async fn instance(config: &str, up: &Upstream) -> Proxy {
    Proxy::start_with(config, up, &[("keys.toml", ACCOUNT_KEYS)]).await
}

/// `account`'s history once this instance holds at least `n` events.
async fn history_of(p: &Proxy, account: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = ledger_history(&p.admin_url(""), account).await;
        if events.len() >= n || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The events the sink received, in the order it received them (each
/// delivery of each event).
fn delivered(sink: &Upstream) -> Vec<Value> {
    sink.seen()
        .iter()
        .filter(|s| s.uri == "/events")
        .flat_map(|s| {
            let batch: Vec<Value> = serde_json::from_slice(&s.body).unwrap();
            batch.into_iter().map(|ce| ce["data"].clone())
        })
        .collect()
}

fn stream_length(redis: &Redis) -> usize {
    redis_cli(redis, &["xlen", "turnstile:ledger"])
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_write_one_stream_and_each_event_is_delivered_once_in_all() {
    let redis = Redis::start().await;
    let (up, sink) = (Upstream::start().await, Upstream::start().await);
    let config = config(&redis, &sink, 100_000);
    let a = instance(&config, &up).await;
    let b = instance(&config, &up).await;
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let p = if i % 2 == 0 { &a } else { &b };
            let path = match i % 4 {
                0 | 1 => "/flat".to_owned(),
                2 => format!("/bill?used={}", i % 23),
                _ => "/status/503".to_owned(),
            };
            let (url, key) = (p.url(&path), if i % 3 == 0 { "acme-1" } else { "acme-2" });
            tokio::spawn(async move { call("GET", &url, Some(key)).await })
        })
        .collect();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(got.status == 200 || got.status == 503, "{}", got.status);
    }
    // Sync: each instance held the charge of each request it forwarded
    // on its disk before the upstream saw it: read at once, the two
    // instances' ledgers together hold every forwarded request's charge.
    let mut held = HashSet::new();
    for p in [&a, &b] {
        for e in of_type(
            &ledger_history(&p.admin_url(""), "acme").await,
            "credits.charged",
        ) {
            held.insert(e["request_id"].as_str().unwrap().to_owned());
        }
    }
    for s in up.seen() {
        let id = s.headers["x-request-id"].to_str().unwrap();
        assert!(
            held.contains(id),
            "request {id} forwarded before its charge was on disk"
        );
    }
    let total = stream_length(&redis);
    let settled = (0..120).filter(|i| i % 4 == 2 && i % 23 != 10).count();
    assert_eq!(total, 120 + 30 + settled, "one stream for both instances");

    // Both instances hold every event, under the same ids.
    let ea = history_of(&a, "acme", total).await;
    let eb = history_of(&b, "acme", total).await;
    assert_eq!(ea.len(), total);
    assert_eq!(ea, eb, "the same events, ids and order on both instances");
    let sum: i64 = ea.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    let now = admin_at(&a.admin_url(""), "GET", "/v1/credits?account=acme", None)
        .await
        .json()["balance"]
        .as_i64()
        .unwrap();
    assert_eq!(
        sum,
        now - 100_000,
        "the sum of amounts is the balance change"
    );
    let mut balance = 100_000;
    for e in &ea {
        assert_eq!(
            balance + e["amount"].as_i64().unwrap(),
            e["balance"].as_i64().unwrap(),
            "chain broken at {e}"
        );
        balance = e["balance"].as_i64().unwrap();
    }
    // Every request the upstream received has its charge, by request id.
    let charged: HashSet<&str> = of_type(&ea, "credits.charged")
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(charged.len(), 120);
    for s in up.seen() {
        let id = s.headers["x-request-id"].to_str().unwrap();
        assert!(charged.contains(id), "no charge for request {id}");
    }
    let routes: HashSet<&str> = ea.iter().map(|e| e["route"].as_str().unwrap()).collect();
    assert_eq!(routes, HashSet::from(["flat", "billed", "refunded"]));

    // The sink gets every event once in all, in order.
    eventually_async("every event delivered", || async {
        delivered(&sink).len() >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = delivered(&sink);
    let ids: Vec<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let want: Vec<&str> = ea.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, want, "each event once, in the ledger's order");
    let batches = sink.seen().len();
    assert!(batches >= total / 7, "{batches} batches of at most 7");
    // Every instance knows the sink is up to date.
    for p in [&a, &b] {
        let metrics = call("GET", &p.admin_url("/metrics"), None).await.body;
        assert!(
            metrics.contains("turnstile_ledger_backlog{sink=\"http\"} 0"),
            "{}",
            metrics
                .lines()
                .filter(|l| l.contains("ledger"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_quotas_and_jobs_are_written_once_whichever_instance_sees_them() {
    let redis = Redis::start().await;
    let (up, sink) = (Upstream::start().await, Upstream::start().await);
    let config = config(&redis, &sink, 100);
    let a = instance(&config, &up).await;
    let b = instance(&config, &up).await;
    for i in 0..10 {
        let p = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            call("GET", &p.url("/flat"), Some("acme-1")).await.status,
            200
        );
    }
    assert_eq!(
        call("GET", &a.url("/flat"), Some("acme-2")).await.status,
        402
    );
    let events = history_of(&b, "acme", 13).await;
    let low: Vec<(i64, &str)> = of_type(&events, "credits.low")
        .iter()
        .map(|e| {
            (
                e["balance"].as_i64().unwrap(),
                e["threshold"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(low, vec![(20, "20%"), (0, "5%"), (0, "0")]);
    // Topped up on one instance, spent on the other: nothing new.
    let added = admin_at(
        &a.admin_url(""),
        "POST",
        "/v1/credits?account=acme",
        Some(json!({"add": 30})),
    )
    .await;
    assert_eq!(added.status, 200, "{}", added.body);
    for _ in 0..3 {
        assert_eq!(
            call("GET", &b.url("/flat"), Some("acme-2")).await.status,
            200
        );
    }
    let events = history_of(&a, "acme", 17).await;
    assert_eq!(of_type(&events, "credits.low").len(), 3, "{events:#?}");
    let add = of_type(&events, "credits.added")[0];
    assert_eq!(
        (add["amount"].as_i64(), add["balance"].as_i64()),
        (Some(30), Some(30))
    );

    // A quota refused on both instances: one event for the window.
    let mut statuses = Vec::new();
    for i in 0..6 {
        let p = if i % 2 == 0 { &a } else { &b };
        statuses.push(call("GET", &p.url("/quota"), Some("beta-1")).await.status);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429, 429, 429]);
    let beta = history_of(&a, "beta", 1).await;
    let exhausted = of_type(&beta, "quota.exhausted");
    assert_eq!(exhausted.len(), 1, "{beta:#?}");
    assert_eq!(exhausted[0]["limit"], "per-minute");
    assert_eq!(exhausted[0]["route"], "quota");

    // A job started on one instance and ended by a status poll on the other.
    let started = call("POST", &a.url("/gen"), Some("acme-1")).await;
    assert_eq!(started.status, 200, "{}", started.body);
    let id = started.json()["id"].as_str().unwrap().to_owned();
    let polled = call(
        "GET",
        &b.url(&format!("/gen/status?id={id}&state=completed")),
        Some("acme-2"),
    )
    .await;
    assert_eq!(polled.status, 200);
    let events = history_of(&b, "acme", 19).await;
    let jobs: Vec<(&str, &str, Option<&str>)> = events
        .iter()
        .filter(|e| e["job_id"] == id.as_str())
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["route"].as_str().unwrap(),
                e["how"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        jobs,
        vec![
            ("job.started", "txt2video", None),
            ("job.ended", "status", Some("done"))
        ]
    );
    let total = stream_length(&redis);
    eventually_async("every event delivered", || async {
        delivered(&sink).len() >= total
    })
    .await;
    let ids: HashSet<String> = delivered(&sink)
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_is_rebuilt_from_the_ledger() {
    let mut redis = Redis::start().await;
    let (up, sink) = (Upstream::start().await, Upstream::start().await);
    let config = config(&redis, &sink, 100);
    let p = instance(&config, &up).await;
    for _ in 0..3 {
        assert_eq!(
            call("GET", &p.url("/flat"), Some("acme-1")).await.status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            call("POST", &p.url("/gen"), Some("acme-2")).await.status,
            200
        );
    }
    assert_eq!(
        call("POST", &p.url("/gen"), Some("acme-1")).await.status,
        429
    );
    assert_eq!(history_of(&p, "acme", 5).await.len(), 5);
    eventually("the marker", || {
        redis_cli(&redis, &["exists", "turnstile:marker"]) == "1"
    })
    .await;

    // Restarted without persistence: every count is gone from Redis.
    redis.restart().await;
    assert_eq!(redis_cli(&redis, &["dbsize"]), "0");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut statuses = HashMap::new();
    loop {
        let r = call("GET", &p.url("/flat"), Some("acme-1")).await;
        *statuses.entry(r.status).or_insert(0) += 1;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(Instant::now() < deadline, "not rebuilt: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let credits = admin_at(&p.admin_url(""), "GET", "/v1/credits?account=acme", None).await;
    assert_eq!(
        credits.json()["balance"],
        60,
        "70 rebuilt, then 10 more: {}",
        credits.body
    );
    // Both jobs still hold their slots.
    assert_eq!(
        call("POST", &p.url("/gen"), Some("acme-1")).await.status,
        429
    );
    let ready = admin_at(&p.admin_url(""), "GET", "/readyz", None).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    // The new stream goes on after the events the instance holds: the
    // charge made after the rebuild is copied, and sorts last.
    let events = history_of(&p, "acme", 6).await;
    assert_eq!(events.len(), 6, "{events:#?}");
    assert_eq!(
        (events[5]["type"].as_str(), events[5]["balance"].as_i64()),
        (Some("credits.charged"), Some(60))
    );
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
}

fn signal(redis: &Redis, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &redis.child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_local_fallback_did_during_an_outage_is_in_the_ledger_when_redis_is_back() {
    let redis = Redis::persistent().await;
    let (up, sink) = (Upstream::start().await, Upstream::start().await);
    // The real clock (a binary): the instance's and Redis's agree on the
    // refill period.
    let config = config(&redis, &sink, 10_000)
        .replace(
            "timeout = \"2s\"\non_error = \"deny\"",
            "timeout = \"300ms\"\non_error = \"local\"",
        )
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:{admin_port}\"",
        )
        .replace(
            "[upstream]",
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]",
        );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), ACCOUNT_KEYS).unwrap();
    let p = Binary::start(dir.path(), &config, &up).await;
    p.wait_admin().await;
    let base = p.admin("");
    let url = p.admin("/v1/credits?account=acme");
    let balance = || balance_at(&url);
    let first = call("GET", &p.url("/flat"), Some("acme-1")).await;
    assert_eq!((first.status, balance().await), (200, Some(9990)));
    for n in 1..=2 {
        let job = call("POST", &p.url("/gen"), Some("acme-2")).await;
        assert_eq!(job.json()["id"].as_str(), Some(format!("job-{n}").as_str()));
    }
    // Redis stops answering: ten more, admitted locally, each settled at
    // 200 by the upstream, two of them refunded.
    signal(&redis, "-STOP");
    for i in 0..10 {
        let path = if i < 8 {
            "/bill?used=200"
        } else {
            "/status/503"
        };
        let got = call("GET", &p.url(path), Some("acme-1")).await;
        assert!(got.status == 200 || got.status == 503, "{}", got.status);
    }
    // job-1 finishes while Redis is paused: its status poll says so.
    let poll = call(
        "GET",
        &p.url("/gen/status?id=job-1&state=completed"),
        Some("acme-2"),
    )
    .await;
    assert_eq!(poll.status, 200);
    signal(&redis, "-CONT");
    // Back: the balance is what the upstream charged, and the ledger's
    // events add up to it.
    let want = 9990 - 200 * 8;
    let deadline = Instant::now() + Duration::from_secs(10);
    while balance().await != Some(want) {
        assert!(
            Instant::now() < deadline,
            "redis holds {:?}, want {want}; {:#?}",
            balance().await,
            ledger_history(&base, "acme").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events = ledger_history(&base, "acme").await;
            let sum: i64 = events.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
            if sum == want - 10_000 || Instant::now() > deadline {
                break events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let sum: i64 = events.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(sum, want - 10_000, "{events:#?}");
    let last = events
        .iter()
        .rev()
        .find(|e| !e["balance"].is_null())
        .unwrap();
    assert_eq!(last["balance"].as_i64(), Some(want));
    // The settlements and refunds made during the outage name their requests.
    let settled = of_type(&events, "credits.settled");
    assert_eq!(settled.len(), 8, "{events:#?}");
    assert!(settled.iter().all(|e| e["request_id"].as_str().is_some()));
    assert_eq!(of_type(&events, "credits.refunded").len(), 2);
    // Redis holds the job really running, and the ledger says why.
    let usage = admin_at(&base, "GET", "/v1/usage?account=acme", None)
        .await
        .json();
    let jobs = counter_named(&usage, "video-jobs");
    assert_eq!(jobs["in_progress"], 1, "{usage}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = ledger_history(&base, "acme").await;
    while of_type(&events, "job.ended").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        events = ledger_history(&base, "acme").await;
    }
    let ended: Vec<(&str, &str)> = of_type(&events, "job.ended")
        .iter()
        .map(|e| (e["job_id"].as_str().unwrap(), e["how"].as_str().unwrap()))
        .collect();
    assert_eq!(ended, vec![("job-1", "done")]);
}
