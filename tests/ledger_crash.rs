//! The ledger against the real binary: `kill -9` under load forgets no
//! charge and no job (balances and jobs rebuilt from the ledger, the
//! snapshot an hour old), and an HTTP sink that answers 500, then is down,
//! then comes back — with turnstile restarted in the middle of the backlog
//! — gets every event, in order per account, as CloudEvents.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use support::*;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"

[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"
default_plan = "free"

[admin]
listen = "127.0.0.1:{admin_port}"

[store]
snapshot = "state/counters.bin"
snapshot_interval = "1h"

[ledger]
path = "state/ledger.db"
durable = "sync"
{sinks}

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
name = "txt2video"
method = "POST"
path = "/gen"
job = { id = "json:/id" }

[plans.free]
[[plans.free.limits]]
name = "credits"
kind = "credits"
grant = 1000000
per = "account"
routes = ["flat", "billed"]

[[plans.free.limits]]
name = "video-jobs"
kind = "jobs"
per = "account"
routes = ["txt2video"]
max = 2
max_duration = "1h"
"#;

async fn start(dir: &std::path::Path, up: &Upstream, sinks: &str) -> Binary {
    std::fs::write(dir.join("keys.toml"), ACCOUNT_KEYS).unwrap();
    let b = Binary::start(dir, &CONFIG.replace("{sinks}", sinks), up).await;
    b.wait_admin().await;
    b
}

async fn get(url: &str) -> Got {
    send(req("GET", url).body(Full::new(Bytes::new())).unwrap()).await
}

/// Every event of `account` on `b`.
async fn history(b: &Binary, account: &str) -> Vec<Value> {
    ledger_history(&b.admin(""), account).await
}

async fn submit(b: &Binary, key: &str) -> Got {
    send(
        req("POST", &b.url("/gen"))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_forgets_no_charge_and_no_job() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path(), &up, "").await;
    // Two jobs running: the limit is full.
    for key in ["acme-1", "acme-2"] {
        assert_eq!(submit(&b, key).await.status, 200);
    }
    assert_eq!(submit(&b, "acme-1").await.status, 429);

    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (stop, port) = (stop.clone(), b.port);
            tokio::spawn(async move {
                for i in 0..2000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let path = if i % 2 == 0 {
                        "/flat".to_owned()
                    } else {
                        format!("/bill?used={}", (i + t) % 17)
                    };
                    let key = if t % 2 == 0 { "acme-1" } else { "acme-2" };
                    let url = format!("http://127.0.0.1:{port}{path}");
                    let r = req("GET", &url)
                        .header("authorization", format!("Bearer {key}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    if client().request(r).await.is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    // Under load for a while, then killed.
    eventually("load reaching the upstream", || up.hits() > 320).await;
    b.signal("KILL");
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let (port, admin_port) = (b.port, b.admin_port);
    drop(b);
    let b = Binary::restart(dir.path(), port, admin_port).await;
    b.wait_admin().await;
    b.log_line("rebuilt from the ledger").await;

    let events = history(&b, "acme").await;
    let charged: HashSet<&str> = events
        .iter()
        .filter(|e| e["type"] == "credits.charged")
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    let forwarded: Vec<String> = up
        .seen()
        .iter()
        .filter(|s| s.uri.starts_with("/flat") || s.uri.starts_with("/bill"))
        .map(|s| s.headers["x-request-id"].to_str().unwrap().to_owned())
        .collect();
    assert!(forwarded.len() > 300);
    let missing: Vec<&String> = forwarded
        .iter()
        .filter(|id| !charged.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} forwarded requests have no charge: {missing:?}",
        missing.len()
    );

    let sum: i64 = events
        .iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("credits."))
        .map(|e| e["amount"].as_i64().unwrap())
        .sum();
    let shown = get(&b.admin("/v1/credits?account=acme")).await.json();
    assert_eq!(
        shown["balance"].as_i64().unwrap(),
        1_000_000 + sum,
        "{shown}"
    );
    assert!(
        sum < -1000,
        "the snapshot is an hour old: only the ledger knows this spending ({sum})"
    );

    // Both jobs are still running: the limit is still full.
    assert_eq!(submit(&b, "acme-1").await.status, 429);
    let started = events.iter().filter(|e| e["type"] == "job.started").count();
    assert_eq!(started, 2);
}

/// Each batch received: its headers and its JSON.
type Batches = Arc<Mutex<Vec<(HashMap<String, String>, Value)>>>;

/// A CloudEvents receiver that answers `status` (0: down, nothing listens).
#[derive(Clone)]
struct Sink {
    port: u16,
    status: Arc<AtomicU16>,
    batches: Batches,
    server: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Sink {
    fn new() -> Self {
        Self {
            port: free_port(),
            status: Arc::new(AtomicU16::new(200)),
            batches: Arc::default(),
            server: Arc::default(),
        }
    }

    async fn up(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
        if self.server.lock().unwrap().is_some() {
            return;
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let me = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |r: http::Request<hyper::body::Incoming>| {
                        let me = me.clone();
                        async move {
                            let headers = r
                                .headers()
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                                .collect();
                            let body = r.into_body().collect().await.unwrap().to_bytes();
                            let status = me.status.load(Ordering::SeqCst);
                            if status == 200 {
                                let v: Value = serde_json::from_slice(&body).unwrap();
                                me.batches.lock().unwrap().push((headers, v));
                            }
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        *self.server.lock().unwrap() = Some(task);
    }

    fn down(&self) {
        if let Some(t) = self.server.lock().unwrap().take() {
            t.abort();
        }
    }

    /// Event ids in the order delivered (repeats kept).
    fn delivered(&self) -> Vec<(String, String)> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, b)| b.as_array().unwrap().clone())
            .map(|e| {
                (
                    e["subject"].as_str().unwrap().to_owned(),
                    e["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

async fn backlog(b: &Binary) -> u64 {
    let metrics = get(&b.admin("/metrics")).await.body;
    metrics
        .lines()
        .find(|l| l.starts_with("turnstile_ledger_backlog{sink=\"billing\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_sink_that_fails_then_is_down_gets_every_event_after_a_restart() {
    std::env::set_var("TURNSTILE_TEST_BILLING_TOKEN", "Bearer s3cret");
    let up = Upstream::start().await;
    let sink = Sink::new();
    sink.up(500).await;
    let sinks = format!(
        "[[ledger.sinks]]\nname = \"billing\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{}/events\"\nbatch = 7\nheaders = {{ Authorization = \"env:TURNSTILE_TEST_BILLING_TOKEN\" }}\n",
        sink.port
    );
    let dir = tempfile::tempdir().unwrap();
    let mut b = start(dir.path(), &up, &sinks).await;
    // Answering 500: requests are served all the same.
    for i in 0..20 {
        let key = if i % 2 == 0 { "acme-1" } else { "beta-1" };
        assert_eq!(call("GET", &b.url("/flat"), Some(key)).await.status, 200);
    }
    sink.down();
    for i in 0..20 {
        let key = if i % 2 == 0 { "acme-2" } else { "beta-1" };
        assert_eq!(call("GET", &b.url("/flat"), Some(key)).await.status, 200);
    }
    eventually_async("a backlog of 40", || async { backlog(&b).await == 40 }).await;
    assert!(sink.delivered().is_empty());

    // Restarted with the backlog on disk.
    b.signal("TERM");
    assert!(b.wait().await.success());
    let (port, admin_port) = (b.port, b.admin_port);
    drop(b);
    let b = Binary::restart(dir.path(), port, admin_port).await;
    b.wait_admin().await;
    for _ in 0..5 {
        assert_eq!(
            call("GET", &b.url("/flat"), Some("acme-1")).await.status,
            200
        );
    }
    sink.up(200).await;
    let acme = history(&b, "acme").await;
    let beta = history(&b, "beta").await;
    assert_eq!((acme.len(), beta.len()), (25, 20));
    eventually("every event delivered", || {
        let got: HashSet<String> = sink.delivered().into_iter().map(|(_, id)| id).collect();
        acme.iter()
            .chain(&beta)
            .all(|e| got.contains(e["id"].as_str().unwrap()))
    })
    .await;
    eventually_async("no backlog", || async { backlog(&b).await == 0 }).await;

    // In order per account (first deliveries), as CloudEvents.
    for (account, events) in [("acme", &acme), ("beta", &beta)] {
        let mut seen = HashSet::new();
        let order: Vec<String> = sink
            .delivered()
            .into_iter()
            .filter(|(s, id)| s == account && seen.insert(id.clone()))
            .map(|(_, id)| id)
            .collect();
        let expected: Vec<String> = events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(order, expected, "{account}'s events in order");
    }
    let batches = sink.batches.lock().unwrap().clone();
    assert!(batches
        .iter()
        .all(|(_, b)| b.as_array().unwrap().len() <= 7));
    let (headers, batch) = &batches[0];
    assert_eq!(
        headers["content-type"],
        "application/cloudevents-batch+json"
    );
    assert_eq!(headers["authorization"], "Bearer s3cret");
    let e = &batch[0];
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["type"], "dev.turnstile.credits.charged");
    assert!(e["source"].as_str().unwrap().starts_with("turnstile/"));
    assert_eq!(e["datacontenttype"], "application/json");
    assert_eq!(e["id"], e["data"]["id"]);
    assert_eq!(e["subject"], e["data"]["account"]);
    assert_eq!(e["time"], e["data"]["time"]);
}
