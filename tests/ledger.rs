//! The ledger (docs/ledger.md) against the real server and a real
//! upstream: every balance change and job start and end is one event, the
//! events add up to the balance under concurrency, low-balance alerts and
//! exhausted quotas are written once, every forwarded request has its
//! charge, accounts page through their history, and the file sink gets
//! every event.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};
use support::*;

const KEYS: &str = r#"
[[keys]]
key = "acme-1"
account = "acme"

[[keys]]
key = "acme-2"
account = "acme"

[[keys]]
key = "solo"
"#;

const CONFIG: &str = concat!(
    r#"
[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"
default_plan = "free"

[admin]
listen = "127.0.0.1:0"

[ledger]
path = "state/ledger.db"
durable = "sync"

[[ledger.sinks]]
kind = "file"
path = "state/events.jsonl"

"#,
    crate::ledger_routes!(),
    r#"
[plans.free]
[[plans.free.limits]]
name = "credits"
kind = "credits"
grant = 100000
refill = "1h"
per = "account"
routes = ["flat", "billed", "refunded"]
alerts = ["20%", "5%", "0"]

[[plans.free.limits]]
name = "per-minute"
routes = ["quota"]
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

async fn start(config: &str) -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let p = Proxy::start_with(config, &up, &[("keys.toml", KEYS)]).await;
    (up, p)
}

async fn admin(p: &Proxy, method: &str, path: &str, body: Option<Value>) -> Got {
    admin_at(&p.admin_url(""), method, path, body).await
}

/// Every event of `account`.
async fn history(p: &Proxy, account: &str) -> Vec<Value> {
    ledger_history(&p.admin_url(""), account).await
}

/// Waits until every event the server took is on disk and readable.
async fn settled_history(p: &Proxy, account: &str, n: usize) -> Vec<Value> {
    let mut events = Vec::new();
    for _ in 0..200 {
        events = history(p, account).await;
        if events.len() >= n {
            return events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    events
}

async fn balance(p: &Proxy, account: &str) -> i64 {
    let got = admin(p, "GET", &format!("/v1/credits?account={account}"), None).await;
    assert_eq!(got.status, 200, "{}", got.body);
    got.json()["balance"].as_i64().unwrap()
}

/// The ledger and the balance agree: each credits event's balance is the
/// one before plus its amount, from the grant (or a set/refill).
fn assert_chain(events: &[Value], grant: i64) -> i64 {
    let mut balance = grant;
    for e in events.iter().filter(|e| {
        e["type"].as_str().unwrap().starts_with("credits.") && e["type"] != "credits.low"
    }) {
        let amount = e["amount"].as_i64().unwrap();
        let after = e["balance"].as_i64().unwrap();
        match e["type"].as_str().unwrap() {
            "credits.set" | "credits.refilled" => {}
            _ => assert_eq!(balance + amount, after, "chain broken at {e}"),
        }
        balance = after;
    }
    balance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_parallel_charges_settles_and_refunds_add_up_to_the_balance() {
    let (up, p) = start(CONFIG).await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let path = match i % 4 {
                0 | 1 => "/flat".to_owned(),
                2 => format!("/bill?used={}", i % 23),
                _ => "/status/503".to_owned(),
            };
            let url = p.url(&path);
            let key = if i % 2 == 0 { "acme-1" } else { "acme-2" };
            tokio::spawn(async move { call("GET", &url, Some(key)).await })
        })
        .collect();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(got.status == 200 || got.status == 503, "{}", got.status);
    }
    let now = balance(&p, "acme").await;
    let events = settled_history(&p, "acme", 250).await;
    let credit: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("credits."))
        .collect();
    let sum: i64 = credit.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(
        sum,
        now - 100_000,
        "the sum of amounts is the balance change"
    );
    assert_eq!(assert_chain(&events, 100_000), now);
    assert_eq!(of_type(&events, "credits.charged").len(), 200);
    assert_eq!(of_type(&events, "credits.refunded").len(), 50);
    // Settled: the 50 billed requests whose figure was not the estimate.
    let settled = (0..200).filter(|i| i % 4 == 2 && i % 23 != 10).count();
    assert_eq!(of_type(&events, "credits.settled").len(), settled);
    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "ids are unique");
    let mut sorted: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    sorted.sort();
    let order: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(sorted, order, "ids sort as the ledger is written");

    // Every request the upstream received has its charge, by request id.
    let charged: HashSet<&str> = of_type(&events, "credits.charged")
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    let seen = up.seen();
    assert_eq!(seen.len(), 200);
    for s in &seen {
        let id = s.headers["x-request-id"].to_str().unwrap();
        assert!(charged.contains(id), "no charge for request {id}");
    }
    let e = of_type(&events, "credits.charged")[0];
    assert_eq!(e["account"], "acme");
    assert_eq!(e["limit"], "credits");
    assert_eq!(e["amount"], -10);
    assert_eq!(e["key_fp"].as_str().unwrap().len(), 8);
    assert!(["flat", "billed", "refunded"].contains(&e["route"].as_str().unwrap()));
    assert_eq!(e["job_id"], Value::Null);
    assert!(e["time"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn alerts_fire_once_per_threshold_per_refill_period() {
    let config = CONFIG.replace("grant = 100000", "grant = 100");
    let (_up, p) = start(&config).await;
    for _ in 0..10 {
        assert_eq!(
            call("GET", &p.url("/flat"), Some("acme-1")).await.status,
            200
        );
    }
    let events = settled_history(&p, "acme", 13).await;
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
    assert!(of_type(&events, "credits.low")
        .iter()
        .all(|e| e["amount"] == 0));

    // Topped up and spent down again in the same period: nothing new.
    let added = admin(
        &p,
        "POST",
        "/v1/credits?account=acme",
        Some(json!({"add": 50})),
    )
    .await;
    assert_eq!(added.status, 200, "{}", added.body);
    for _ in 0..4 {
        assert_eq!(
            call("GET", &p.url("/flat"), Some("acme-1")).await.status,
            200
        );
    }
    let events = settled_history(&p, "acme", 18).await;
    assert_eq!(of_type(&events, "credits.low").len(), 3);
    let add = of_type(&events, "credits.added")[0];
    assert_eq!(
        (add["amount"].as_i64(), add["balance"].as_i64()),
        (Some(50), Some(50))
    );
    assert_eq!(add["request_id"], Value::Null);

    // The next refill period: the balance is back, the alerts fire again.
    p.advance_secs(3600);
    for _ in 0..8 {
        assert_eq!(
            call("GET", &p.url("/flat"), Some("acme-1")).await.status,
            200
        );
    }
    let events = settled_history(&p, "acme", 28).await;
    let refill = of_type(&events, "credits.refilled");
    assert_eq!(refill.len(), 1);
    assert_eq!(refill[0]["balance"], 100);
    assert_eq!(refill[0]["amount"], 90, "from 10 back to the grant of 100");
    assert_eq!(of_type(&events, "credits.low").len(), 4);
    assert_eq!(assert_chain(&events, 100), balance(&p, "acme").await);
}

#[tokio::test]
async fn an_exhausted_quota_is_written_once_per_window() {
    let (_up, p) = start(CONFIG).await;
    let statuses: Vec<u16> = {
        let mut s = Vec::new();
        for _ in 0..6 {
            s.push(call("GET", &p.url("/quota"), Some("solo")).await.status);
        }
        s
    };
    assert_eq!(statuses, vec![200, 200, 200, 429, 429, 429]);
    let account = solo_account();
    let events = settled_history(&p, &account, 1).await;
    let exhausted = of_type(&events, "quota.exhausted");
    assert_eq!(exhausted.len(), 1, "{events:?}");
    assert_eq!(exhausted[0]["limit"], "per-minute");
    assert_eq!(exhausted[0]["route"], "quota");
    assert_eq!(exhausted[0]["balance"], Value::Null);
    p.advance_secs(60);
    for _ in 0..5 {
        call("GET", &p.url("/quota"), Some("solo")).await;
    }
    let events = settled_history(&p, &account, 2).await;
    assert_eq!(of_type(&events, "quota.exhausted").len(), 2);
}

/// How events name the key without an account: `key:<fingerprint>` (the
/// first 8 hex digits of the key's SHA-256).
fn solo_account() -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(b"solo");
    format!("key:{}", hex::encode(&digest[..4]))
}

#[tokio::test]
async fn jobs_start_and_end_as_events() {
    let (_up, p) = start(CONFIG).await;
    let submit = || async {
        send(
            req("POST", &p.url("/gen"))
                .header("authorization", "Bearer acme-1")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    };
    let a = submit().await.json()["id"].as_str().unwrap().to_owned();
    let b = submit().await.json()["id"].as_str().unwrap().to_owned();
    // A caller who never comes back: its job ends when its counter is swept.
    let lone = send(
        req("POST", &p.url("/gen"))
            .header("authorization", "Bearer solo")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = call(
        "GET",
        &p.url(&format!("/gen/status?id={a}&state=completed")),
        Some("acme-2"),
    )
    .await;
    assert_eq!(done.status, 200);
    // b runs past max_duration: the next submission notices it expired.
    p.advance_secs(601);
    assert_eq!(submit().await.status, 200);
    let events = settled_history(&p, "acme", 5).await;
    let jobs: Vec<(String, String, Option<String>)> = events
        .iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("job."))
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["job_id"].as_str().unwrap().to_owned(),
                e["how"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(jobs[0], ("job.started".into(), a.clone(), None));
    assert_eq!(jobs[1], ("job.started".into(), b.clone(), None));
    assert_eq!(
        jobs[2],
        ("job.ended".into(), a.clone(), Some("done".into()))
    );
    assert_eq!(
        jobs[3],
        ("job.ended".into(), b.clone(), Some("expired".into()))
    );
    assert_eq!(jobs[4].0, "job.started");
    assert_eq!(jobs.len(), 5);
    p.app.store().in_process().evict_expired();
    let swept = settled_history(&p, &solo_account(), 2).await;
    let ended: Vec<(&str, &str)> = of_type(&swept, "job.ended")
        .iter()
        .map(|e| (e["job_id"].as_str().unwrap(), e["how"].as_str().unwrap()))
        .collect();
    assert_eq!(ended, vec![(lone.as_str(), "expired")]);
    let ended = of_type(&events, "job.ended");
    assert_eq!(ended[0]["route"], "status", "the poll that ended it");
    assert!(ended[0]["request_id"].is_string());
    assert_eq!(ended[1]["route"], Value::Null, "no request expired it");
    let started = events.iter().find(|e| e["type"] == "job.started").unwrap();
    assert_eq!(started["route"], "txt2video");
    assert_eq!(started["limit"], "video-jobs");
    assert!(started["request_id"].as_str().is_some());
}

#[tokio::test]
async fn the_file_sink_gets_every_event_once_in_order() {
    let (_up, p) = start(CONFIG).await;
    for i in 0..30 {
        let key = if i % 2 == 0 { "acme-1" } else { "solo" };
        call("GET", &p.url("/flat"), Some(key)).await;
    }
    let events = settled_history(&p, "acme", 15).await;
    let path = p.dir.path().join("state/events.jsonl");
    let mut lines: Vec<Value> = Vec::new();
    for _ in 0..500 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 30 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(lines.len(), 30);
    let acme: Vec<&Value> = lines.iter().filter(|l| l["account"] == "acme").collect();
    assert_eq!(acme.len(), 15);
    assert_eq!(acme.into_iter().cloned().collect::<Vec<_>>(), events);
    let metrics_say = |want: &'static str| {
        let url = p.admin_url("/metrics");
        async move {
            let m = send(req("GET", &url).body(Full::new(Bytes::new())).unwrap()).await;
            m.body.contains(want)
        }
    };
    eventually_async("30 delivered in the metrics", || {
        metrics_say("turnstile_ledger_delivered_total{sink=\"file\"} 30")
    })
    .await;
    eventually_async("no backlog in the metrics", || {
        metrics_say("turnstile_ledger_backlog{sink=\"file\"} 0")
    })
    .await;
    let dash = admin(&p, "GET", "/v1/dashboard", None).await.json();
    assert_eq!(dash["ledger"]["sinks"][0]["name"], "file");
    assert_eq!(dash["ledger"]["latest"].as_array().unwrap().len(), 20);
}

#[tokio::test]
async fn ledger_pages_are_bounded_and_checked() {
    let (_up, p) = start(CONFIG).await;
    for _ in 0..5 {
        call("GET", &p.url("/flat"), Some("acme-1")).await;
    }
    let events = settled_history(&p, "acme", 5).await;
    let first = admin(&p, "GET", "/v1/ledger?account=acme&limit=2", None)
        .await
        .json();
    assert_eq!(first["events"].as_array().unwrap().len(), 2);
    let next = first["next"].as_str().unwrap();
    assert_eq!(next, events[1]["id"]);
    let second = admin(
        &p,
        "GET",
        &format!("/v1/ledger?account=acme&limit=2&after={next}"),
        None,
    )
    .await
    .json();
    assert_eq!(second["events"][0], events[2]);
    let last = admin(
        &p,
        "GET",
        &format!(
            "/v1/ledger?account=acme&after={}",
            events[4]["id"].as_str().unwrap()
        ),
        None,
    )
    .await
    .json();
    assert_eq!(last["events"], json!([]));
    assert_eq!(last["next"], Value::Null);
    for bad in [
        "",
        "account=acme&limit=1001",
        "account=acme&after=nope",
        "account=acme&x=1",
    ] {
        let got = admin(&p, "GET", &format!("/v1/ledger?{bad}"), None).await;
        assert_eq!(got.status, 400, "{bad}: {}", got.body);
    }
    let none = admin(&p, "GET", "/v1/ledger?account=nobody", None)
        .await
        .json();
    assert_eq!(none["events"], json!([]));

    let plain = CONFIG.split("[ledger]").next().unwrap().to_owned()
        + &CONFIG[CONFIG.find("[[routes]]").unwrap()..];
    let (_up2, p2) = start(&plain.replace("alerts = [\"20%\", \"5%\", \"0\"]", "")).await;
    let got = admin(&p2, "GET", "/v1/ledger?account=acme", None).await;
    assert_eq!(got.status, 404, "{}", got.body);
    let _ = HashMap::<(), ()>::new();
}

#[test]
fn ledger_config_errors_name_the_place() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    let cases = [
        (CONFIG.replace("durable = \"sync\"", "durable = \"always\""), "expected \"sync\" or \"interval\""),
        (CONFIG.replace("kind = \"file\"", "kind = \"kafka\""), "expected \"http\" or \"file\""),
        (CONFIG.replace("alerts = [\"20%\", \"5%\", \"0\"]", "alerts = [\"lots\"]"), "alert \"lots\""),
        (CONFIG.replace("alerts = [\"20%\", \"5%\", \"0\"]", "alerts = [\"5%\", \"5%\"]"), "written twice"),
        (
            CONFIG.replace("requests = 3", "requests = 3\nalerts = [\"1\"]"),
            "alerts are for credits balances",
        ),
        (
            CONFIG.replace(
                "kind = \"file\"\npath = \"state/events.jsonl\"",
                "kind = \"http\"\nurl = \"http://127.0.0.1:1/e\"\nheaders = { Authorization = \"env:TURNSTILE_TEST_NO_SUCH_VAR\" }",
            ),
            "TURNSTILE_TEST_NO_SUCH_VAR, which is not set",
        ),
        (
            CONFIG.replace(
                "kind = \"file\"\npath = \"state/events.jsonl\"",
                "kind = \"http\"\nurl = \"ftp://billing.example/e\"",
            ),
            "expected http://host[:port]/path or https://",
        ),
        (
            CONFIG.replace("[ledger]", "[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\ncluster = true\n\n[ledger]"),
            "a Redis Cluster cannot hold",
        ),
    ];
    for (config, message) in cases {
        let config = config.replace("{upstream}", "http://127.0.0.1:9");
        let path = dir.path().join("turnstile.toml");
        std::fs::write(&path, &config).unwrap();
        let err = turnstile::load(&path).expect_err(message).to_string();
        assert!(err.contains(message), "{err}");
        assert!(err.contains("turnstile.toml:"), "names the place: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_is_forwarded_only_once_it_is_on_disk() {
    let (up, p) = start(CONFIG).await;
    assert_eq!(
        call("GET", &p.url("/flat"), Some("acme-1")).await.status,
        200
    );
    // Another writer holds the ledger's database: nothing can be committed.
    let db = rusqlite::Connection::open(p.dir.path().join("state/ledger.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let url = p.url("/flat");
    let waiting = tokio::spawn(async move { call("GET", &url, Some("acme-1")).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(up.hits(), 1, "not forwarded before its charge is on disk");
    db.execute_batch("COMMIT").unwrap();
    assert_eq!(waiting.await.unwrap().status, 200);
    assert_eq!(up.hits(), 2);
}

/// An HTTPS receiver with a fresh self-signed certificate for localhost:
/// its port, its certificate (PEM) and what it received (Authorization,
/// events).
async fn https_sink() -> (u16, String, Arc<Mutex<Vec<(String, Value)>>>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_pem = made.cert.pem();
    let der = made.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(made.key_pair.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |r: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let auth = r
                                .headers()
                                .get("authorization")
                                .map_or("", |v| v.to_str().unwrap())
                                .to_owned();
                            let body = r.into_body().collect().await.unwrap().to_bytes();
                            for e in serde_json::from_slice::<Value>(&body)
                                .unwrap()
                                .as_array()
                                .unwrap()
                            {
                                seen.lock().unwrap().push((auth.clone(), e.clone()));
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::new(),
                            )))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, cert_pem, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_sink_trusting_its_own_ca_gets_the_events() {
    std::env::set_var("TURNSTILE_TEST_HTTPS_SINK_TOKEN", "Bearer t0ken");
    let (port, cert, got) = https_sink().await;
    let config = CONFIG.replace(
        "kind = \"file\"\npath = \"state/events.jsonl\"",
        &format!(
            "kind = \"http\"\nurl = \"https://localhost:{port}/events\"\nca = \"ca.pem\"\nheaders = {{ Authorization = \"env:TURNSTILE_TEST_HTTPS_SINK_TOKEN\" }}"
        ),
    );
    let up = Upstream::start().await;
    let p = Proxy::start_with(&config, &up, &[("keys.toml", KEYS), ("ca.pem", &cert)]).await;
    for _ in 0..3 {
        assert_eq!(
            call("GET", &p.url("/flat"), Some("acme-1")).await.status,
            200
        );
    }
    eventually("three events over TLS", || got.lock().unwrap().len() == 3).await;
    let got = got.lock().unwrap().clone();
    assert!(got.iter().all(|(auth, _)| auth == "Bearer t0ken"));
    assert_eq!(got[0].1["type"], "dev.turnstile.credits.charged");
    assert_eq!(got[0].1["data"]["account"], "acme");
}

#[test]
fn an_https_sink_with_an_unusable_ca_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
    let config = CONFIG
        .replace(
            "kind = \"file\"\npath = \"state/events.jsonl\"",
            "kind = \"http\"\nurl = \"https://billing.example/events\"\nca = \"ca.pem\"",
        )
        .replace("{upstream}", "http://127.0.0.1:9");
    let path = dir.path().join("turnstile.toml");
    std::fs::write(&path, config).unwrap();
    let err = turnstile::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("ca.pem") && err.contains("turnstile.toml:"),
        "{err}"
    );
}
