//! Operating the real binary (SPEC §9): admin API and token, metrics, hot
//! reload on SIGHUP and POST /v1/reload, snapshots across restarts and
//! kill -9, graceful shutdown on SIGTERM.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "10s"

[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"

[store]
snapshot = "state/counters.bin"
snapshot_interval = "200ms"

[admin]
listen = "127.0.0.1:{admin_port}"
token = "s3cret"

[[routes]]
name = "gen"
path = "/gen"

[plans.free]
[[plans.free.limits]]
name = "daily"
requests = 3
window = "1d"
"#;

const KEYS: &str = "[[keys]]\nkey = \"key-a\"\naccount = \"acme\"\nplan = \"free\"\n\n[[keys]]\nkey = \"key-b\"\naccount = \"acme\"\nplan = \"free\"\n";

async fn start(dir: &tempfile::TempDir, up: &Upstream, config: &str) -> Binary {
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    Binary::start(dir.path(), config, up).await
}

async fn admin_call(b: &Binary, method: &str, path: &str, token: Option<&str>) -> Got {
    let mut r = req(method, &b.admin(path));
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    send(r.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test]
async fn a_restart_keeps_the_daily_count() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut b = start(&dir, &up, CONFIG).await;
    assert_eq!(call("GET", &b.url("/gen"), Some("key-a")).await.status, 200);
    assert_eq!(
        call("GET", &b.url("/gen"), Some("key-a"))
            .await
            .h("x-ratelimit-remaining"),
        "1"
    );
    b.signal("TERM");
    assert!(b.wait().await.success());
    assert!(
        dir.path().join("state/counters.bin").exists(),
        "snapshot written at shutdown"
    );
    let (port, admin_port) = (b.port, b.admin_port);
    drop(b);
    let b = Binary::restart(dir.path(), port, admin_port).await;
    b.log_line("counters restored").await;
    let r = call("GET", &b.url("/gen"), Some("key-a")).await;
    assert_eq!(
        (r.status, r.h("x-ratelimit-remaining")),
        (200, "0"),
        "exactly one more"
    );
    assert_eq!(call("GET", &b.url("/gen"), Some("key-a")).await.status, 429);
}

#[tokio::test]
async fn kill_9_loses_at_most_one_snapshot_interval() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(&dir, &up, CONFIG).await;
    for _ in 0..2 {
        assert_eq!(call("GET", &b.url("/gen"), Some("key-b")).await.status, 200);
    }
    // Wait for a periodic snapshot that holds both requests (interval 200 ms).
    let snap = dir.path().join("state/counters.bin");
    let written_after = std::time::SystemTime::now();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = std::fs::metadata(&snap)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > written_after);
        if fresh {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no periodic snapshot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.signal("KILL");
    let (port, admin_port) = (b.port, b.admin_port);
    drop(b);
    let b = Binary::restart(dir.path(), port, admin_port).await;
    assert_eq!(call("GET", &b.url("/gen"), Some("key-b")).await.status, 200);
    assert_eq!(call("GET", &b.url("/gen"), Some("key-b")).await.status, 429);
}

#[tokio::test]
async fn a_corrupt_snapshot_is_logged_and_turnstile_starts_empty() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state/counters.bin"),
        b"TSTLSNAP\x01\x00\x00\x00garbage",
    )
    .unwrap();
    let b = start(&dir, &up, CONFIG).await;
    let line = b.log_line("snapshot unreadable").await;
    assert!(line.contains("ERROR"), "{line}");
    let r = call("GET", &b.url("/gen"), Some("key-a")).await;
    assert_eq!((r.status, r.h("x-ratelimit-remaining")), (200, "2"));
}

#[tokio::test]
async fn sighup_reload_changes_a_limit_and_keeps_counts() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(&dir, &up, CONFIG).await;
    for _ in 0..3 {
        assert_eq!(call("GET", &b.url("/gen"), Some("key-a")).await.status, 200);
    }
    assert_eq!(call("GET", &b.url("/gen"), Some("key-a")).await.status, 429);
    let path = dir.path().join("turnstile.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("requests = 3", "requests = 5")).unwrap();
    b.signal("HUP");
    b.log_line("config reloaded").await;
    // Same counter identity: 3 already used of the new 5.
    let r = call("GET", &b.url("/gen"), Some("key-a")).await;
    assert_eq!(
        (
            r.status,
            r.h("x-ratelimit-limit"),
            r.h("x-ratelimit-remaining")
        ),
        (200, "5", "1")
    );
}

#[tokio::test]
async fn a_broken_reload_is_refused_and_the_running_config_keeps_serving() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(&dir, &up, CONFIG).await;
    assert_eq!(call("GET", &b.url("/gen"), Some("key-a")).await.status, 200);
    let path = dir.path().join("turnstile.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace("window = \"1d\"", "window = \"1 fortnight\""),
    )
    .unwrap();
    b.signal("HUP");
    let line = b.log_line("config reload refused").await;
    assert!(
        line.contains(&format!("{}:28:10: invalid duration", path.display())),
        "{line}"
    );
    let r = call("GET", &b.url("/gen"), Some("key-a")).await;
    assert_eq!(
        (
            r.status,
            r.h("x-ratelimit-limit"),
            r.h("x-ratelimit-remaining")
        ),
        (200, "3", "1")
    );
    // The admin call reports the same error with its position.
    let r = admin_call(&b, "POST", "/v1/reload", Some("s3cret")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_config");
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with(&format!(
            "{}:28:10: invalid duration \"1 fortnight\"",
            path.display()
        )),
        "{message}"
    );
    // Fixed, the admin reload takes it.
    std::fs::write(&path, good.replace("requests = 3", "requests = 4")).unwrap();
    let r = admin_call(&b, "POST", "/v1/reload", Some("s3cret")).await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("reloaded"))
    );
    assert_eq!(
        call("GET", &b.url("/gen"), Some("key-a"))
            .await
            .h("x-ratelimit-remaining"),
        "1"
    );
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut b = start(&dir, &up, CONFIG).await;
    let url = b.url("/gen?hold");
    let slow = tokio::spawn(async move { call("GET", &url, Some("key-a")).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while up.hits() == 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.signal("TERM");
    b.log_line("shutting down").await;
    // New connections are no longer accepted while the slow one drains.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", b.port))
        .await
        .is_err());
    assert!(
        b.child.try_wait().unwrap().is_none(),
        "exited before the exchange finished"
    );
    up.release(1);
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(b.wait().await.success());
}

#[tokio::test]
async fn admin_usage_reset_metrics_and_token() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace(
        "window = \"1d\"\n",
        "window = \"1d\"\nper = \"account\"\n\n[[plans.free.limits]]\nname = \"minute\"\nrequests = 10\nwindow = \"1m\"\n",
    );
    let b = start(&dir, &up, &config).await;
    for key in ["key-a", "key-a", "key-b"] {
        assert_eq!(call("GET", &b.url("/gen"), Some(key)).await.status, 200);
    }
    assert_eq!(call("GET", &b.url("/gen"), Some("key-b")).await.status, 429);

    // Probes and metrics are open; /v1 needs the token.
    assert_eq!(admin_call(&b, "GET", "/healthz", None).await.status, 200);
    assert_eq!(
        admin_call(&b, "GET", "/readyz", None).await.json()["status"],
        "ready"
    );
    let r = admin_call(&b, "GET", "/v1/usage?key=key-a", None).await;
    assert_eq!((r.status, r.h("www-authenticate")), (401, "Bearer"));
    assert_eq!(
        admin_call(&b, "GET", "/v1/usage?key=key-a", Some("wrong"))
            .await
            .status,
        401
    );

    let r = admin_call(&b, "GET", "/v1/usage?key=key-a", Some("s3cret")).await;
    assert_eq!(r.status, 200);
    let u = r.json();
    let fp = &hex::encode(turnstile::keys::identity::digest("key-a"))[..8];
    assert_eq!(
        (u["key"].as_str(), u["account"].as_str(), u["plan"].as_str()),
        (Some(fp), Some("acme"), Some("free"))
    );
    assert!(
        !r.body.contains("key-a"),
        "keys are shown only as fingerprints"
    );
    let daily = &counter_named(&u, "daily");
    assert_eq!(
        (
            daily["used"].as_u64(),
            daily["remaining"].as_u64(),
            daily["limit"].as_u64()
        ),
        (Some(3), Some(0), Some(3))
    );
    assert_eq!(
        (daily["kind"].as_str(), daily["route"].is_null()),
        (Some("fixed"), true)
    );
    assert!(daily["reset"].as_u64().unwrap() % 86_400 == 0);
    let minute = &counter_named(&u, "minute");
    assert_eq!(minute["used"].as_u64(), Some(2));

    let r = admin_call(&b, "GET", "/v1/usage?account=acme", Some("s3cret")).await;
    let u = r.json();
    assert_eq!(u["keys"].as_array().unwrap().len(), 2);
    let minutes: Vec<u64> = u["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "minute")
        .map(|c| c["used"].as_u64().unwrap())
        .collect();
    assert_eq!(
        minutes.iter().sum::<u64>(),
        3,
        "per-key counters of every key of the account: {u}"
    );

    let m = admin_call(&b, "GET", "/metrics", None).await;
    assert_eq!(m.status, 200);
    assert!(
        m.body
            .contains("turnstile_requests_total{route=\"gen\",decision=\"forwarded\"} 3"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("turnstile_requests_total{route=\"gen\",decision=\"rate_limited\"} 1"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("turnstile_rate_limited_total{route=\"gen\",limit=\"daily\"} 1"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("turnstile_upstream_latency_seconds_count{route=\"gen\"} 3"),
        "{}",
        m.body
    );
    assert!(
        m.body.contains("turnstile_tracked_counters 3"),
        "{}",
        m.body
    );

    // Reset the account: its quota is whole again.
    let r = admin_call(&b, "DELETE", "/v1/usage?account=acme", Some("s3cret")).await;
    assert_eq!(
        (r.status, r.json()["reset_counters"].as_u64()),
        (200, Some(3))
    );
    let r = call("GET", &b.url("/gen"), Some("key-b")).await;
    assert_eq!((r.status, r.h("x-ratelimit-remaining")), (200, "2"));
    assert_eq!(
        admin_call(&b, "GET", "/v1/usage?key=nobody", Some("s3cret"))
            .await
            .status,
        404
    );
    let line = b.log_line("\"refused\"").await;
    assert!(
        line.contains("\"key_fp\"")
            && line.contains("\"limit\":\"daily\"")
            && line.contains("\"status\":429"),
        "{line}"
    );
    // A 401 line names the presented key by its fingerprint, never the key.
    assert_eq!(
        call("GET", &b.url("/gen"), Some("stolen-key-42"))
            .await
            .status,
        401
    );
    let fp = turnstile::keys::identity::Fingerprint::of(&turnstile::keys::identity::digest(
        "stolen-key-42",
    ));
    let line = b.log_line("unknown API key").await;
    assert!(
        line.contains(&format!("\"key_fp\":\"{}\"", fp.as_str()))
            && !line.contains("stolen-key-42"),
        "{line}"
    );
    // The startup line prints the listeners plainly.
    let start = b.log_line("turnstile listening").await;
    assert!(
        start.contains(&format!("\"admin\":\"127.0.0.1:{}\"", b.admin_port)),
        "{start}"
    );
}

const ACCESS: &str = r#"
[server]
listen = "127.0.0.1:{port}"

[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"

[log]
access = true

[admin]
listen = "127.0.0.1:{admin_port}"

[[routes]]
name = "gen"
path = "/gen"

[plans.free]
[[plans.free.limits]]
name = "daily"
requests = 1
window = "1d"
"#;

/// The access log line whose `needle` field is there, as JSON.
async fn access_line(b: &Binary, needle: &str) -> serde_json::Value {
    let line = b.log_line(needle).await;
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[tokio::test]
async fn the_access_log_has_one_line_per_exchange() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(&dir, &up, ACCESS).await;
    let body = send(
        req("POST", &b.url("/gen?token=secret"))
            .header("authorization", "Bearer key-a")
            .body(Full::new(Bytes::from_static(b"0123456789")))
            .unwrap(),
    )
    .await;
    assert_eq!(body.status, 200);
    assert_eq!(call("GET", &b.url("/gen"), Some("key-a")).await.status, 429);
    assert_eq!(
        call("GET", &b.url("/gen"), Some("nobody")).await.status,
        401
    );
    assert_eq!(call("GET", &b.url("/elsewhere"), None).await.status, 200);

    let fp = |k: &str| {
        turnstile::keys::identity::Fingerprint::of(&turnstile::keys::identity::digest(k))
            .to_string()
    };
    let ok = access_line(&b, "\"path\":\"/gen\",\"route\":\"gen\",\"plan\":\"free\",\"key_fp\":\"f10f7812\",\"account\":\"acme\",\"status\":200").await;
    let f = &ok["fields"];
    assert_eq!(f["route"], "gen", "{ok}");
    assert_eq!(f["method"], "POST");
    assert_eq!(f["path"], "/gen", "no query string: it may carry keys");
    assert_eq!(f["plan"], "free");
    assert_eq!(f["key_fp"], fp("key-a"));
    assert_eq!(f["account"], "acme");
    assert_eq!(f["status"], 200);
    assert_eq!(f["bytes_in"], 10);
    assert_eq!(f["bytes_out"], body.body.len());
    assert!(f["upstream_ms"].as_f64().unwrap() > 0.0, "{ok}");
    assert!(f["duration_ms"].as_f64().unwrap() >= f["upstream_ms"].as_f64().unwrap());
    assert_eq!(f["request_id"], body.h("x-request-id"), "{ok}");
    let refused = access_line(&b, "\"decision\":\"rate_limited\"").await;
    assert_eq!(
        refused["fields"]["request_id"].as_str().map(str::len),
        Some(32),
        "{refused}"
    );
    assert_eq!(
        (&refused["fields"]["status"], &refused["fields"]["limit"]),
        (&serde_json::json!(429), &serde_json::json!("daily"))
    );
    assert!(refused["fields"]["upstream_ms"].is_null(), "{refused}");
    let unknown = access_line(&b, "\"decision\":\"unauthorized\"").await;
    assert_eq!(unknown["fields"]["key_fp"], fp("nobody"), "{unknown}");
    let unmatched = access_line(&b, "\"path\":\"/elsewhere\"").await;
    assert_eq!(unmatched["fields"]["route"], "(unmatched)");
    assert!(
        !b.logs().contains("secret"),
        "the query string is never logged"
    );
    let m = call("GET", &b.admin("/metrics"), None).await.body;
    assert!(m.contains("turnstile_access_log_dropped_total 0"), "{m}");
}

#[tokio::test]
async fn a_graceful_stop_writes_every_access_line() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut b = start(&dir, &up, ACCESS).await;
    // Exchanges still in flight when the stop begins end during the drain,
    // right before the process exits.
    let pending: Vec<_> = (0..20)
        .map(|i| {
            let url = b.url(&format!("/last-{i}?hold"));
            tokio::spawn(async move { call("GET", &url, None).await.status })
        })
        .collect();
    eventually("all 20 reached the upstream", || up.hits() == 20).await;
    b.signal("TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    up.release(20);
    for p in pending {
        assert_eq!(p.await.unwrap(), 200);
    }
    assert!(b.wait().await.success());
    let logs = b.logs();
    for i in 0..20 {
        assert!(
            logs.contains(&format!("\"path\":\"/last-{i}\"")),
            "line {i} missing:\n{logs}"
        );
    }
}

const ACCESS_JOBS: &str = r#"
[server]
listen = "127.0.0.1:{port}"

[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"

[log]
access = true

[[routes]]
name = "gen"
method = "POST"
path = "/gen"
cost = 3
job = { id = "json:/id" }

[[routes]]
name = "status"
method = "GET"
path = "/gen/status"
job_status = { id = "query:id", state = "json:/status", done = ["completed"] }

[plans.free]
[[plans.free.limits]]
name = "credits"
kind = "credits"
routes = ["gen"]
grant = 100
refill = "month"

[[plans.free.limits]]
name = "videos"
kind = "jobs"
routes = ["gen"]
max = 2
"#;

#[tokio::test]
async fn access_lines_carry_the_cost_the_balance_and_the_job() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(&dir, &up, ACCESS_JOBS).await;
    let submit = call("POST", &b.url("/gen"), Some("key-a")).await;
    assert_eq!(
        (submit.status, submit.json()["id"].as_str()),
        (200, Some("job-1"))
    );
    let line = access_line(&b, "\"route\":\"gen\"").await;
    let f = &line["fields"];
    assert_eq!(
        (&f["cost"], &f["credits_balance"]),
        (&serde_json::json!(3), &serde_json::json!(97)),
        "{line}"
    );
    assert_eq!(f["job_id"], "job-1", "the id read from the answer: {line}");
    let poll = call(
        "GET",
        &b.url("/gen/status?id=job-1&state=completed"),
        Some("key-a"),
    )
    .await;
    assert_eq!(poll.status, 200);
    let line = access_line(&b, "\"route\":\"status\"").await;
    let f = &line["fields"];
    assert_eq!(f["job_id"], "job-1", "{line}");
    assert!(
        f["cost"].is_null() && f["credits_balance"].is_null(),
        "{line}"
    );
}
