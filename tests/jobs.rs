//! Jobs for asynchronous generation APIs (SPEC §11): "up to N generations
//! at once" counts jobs in progress, from the submission's answer naming
//! an id to the status poll that says it is done, a cancel, the admin API
//! or `max_duration`.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use support::*;
use tokio::io::AsyncWriteExt;

const CONFIG: &str = r#"
[upstream]
url = "{upstream}"

[[routes]]
name = "txt2video"
method = "POST"
path = "/gen"
job = { id = "json:/id" }

[[routes]]
name = "status"
method = "GET"
path = "/gen/status"
job_status = { id = "query:id", state = "json:/status", done = ["completed", "failed"] }

[[routes]]
name = "cancel"
method = "POST"
path = "/gen/{id}/cancel"
job_cancel = { id = "path:id" }

[plans.free]
[[plans.free.limits]]
name = "video-jobs"
kind = "jobs"
max = 2
routes = ["txt2video"]
max_duration = "1h"
retry_after = "5s"

[[plans.free.limits]]
name = "minute"
routes = ["txt2video"]
requests = 100
window = "1m"
"#;

async fn submit(p: &Proxy, query: &str, key: &str) -> Got {
    call("POST", &p.url(&format!("/gen{query}")), Some(key)).await
}

async fn poll(p: &Proxy, id: &str, state: &str, key: &str) -> Got {
    call(
        "GET",
        &p.url(&format!("/gen/status?id={id}&state={state}")),
        Some(key),
    )
    .await
}

#[tokio::test]
async fn a_job_holds_its_slot_until_its_status_poll_says_done() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let a = submit(&p, "", "k").await;
    assert_eq!((a.status, a.json()["id"].as_str()), (200, Some("job-1")));
    // Jobs are never the primary limit: the headers show the minute.
    assert_eq!(
        (a.h("x-ratelimit-limit"), a.h("x-ratelimit-remaining")),
        ("100", "99")
    );
    assert_eq!(submit(&p, "", "k").await.status, 200);
    let refused = submit(&p, "", "k").await;
    assert_eq!(
        (
            refused.status,
            refused.h("x-ratelimit-type"),
            refused.h("retry-after")
        ),
        (429, "video-jobs", "5")
    );
    let body = refused.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(
        body["message"],
        "Too many generations in progress: at most 2 at once (video-jobs). Retry in 5 s."
    );
    assert_eq!(
        (
            &body["rate_limit"]["name"],
            &body["rate_limit"]["count"],
            &body["rate_limit"]["limit"],
            &body["rate_limit"]["remaining"],
            &body["rate_limit"]["reset_in_seconds"]
        ),
        (
            &serde_json::json!("video-jobs"),
            &serde_json::json!(2),
            &serde_json::json!(2),
            &serde_json::json!(0),
            &serde_json::json!(5)
        )
    );
    assert_eq!(
        up.hits(),
        2,
        "the refused submission never reached the upstream"
    );

    // Still running, or asked about by someone else: nothing changes.
    assert_eq!(poll(&p, "job-1", "running", "k").await.status, 200);
    assert_eq!(
        poll(&p, "job-1", "completed", "other-key").await.status,
        200
    );
    assert_eq!(poll(&p, "job-404", "completed", "k").await.status, 200);
    assert_eq!(submit(&p, "", "k").await.status, 429);

    // Done: the slot is free at once.
    assert_eq!(poll(&p, "job-1", "completed", "k").await.status, 200);
    let c = submit(&p, "", "k").await;
    assert_eq!((c.status, c.json()["id"].as_str()), (200, Some("job-3")));
    assert_eq!(
        c.h("x-ratelimit-remaining"),
        "97",
        "the refused submissions consumed no minute quota"
    );
    assert_eq!(submit(&p, "", "k").await.status, 429);

    // A 2xx cancel ends a job; a failed one does not.
    let r = call("POST", &p.url("/gen/job-2/cancel?fail"), Some("k")).await;
    assert_eq!(r.status, 404);
    assert_eq!(submit(&p, "", "k").await.status, 429);
    let r = call("POST", &p.url("/gen/job-2/cancel"), Some("k")).await;
    assert_eq!(r.status, 200);
    assert_eq!(submit(&p, "", "k").await.status, 200);

    // Another key has slots of its own.
    assert_eq!(submit(&p, "", "k2").await.status, 200);
}

#[tokio::test]
async fn answers_that_name_no_job_give_the_slot_back() {
    let up = Upstream::start().await;
    let p = Proxy::start(&CONFIG.replace("max = 2", "max = 1"), &up).await;
    for query in ["?fail", "?noid", "?fail", "?noid"] {
        let r = submit(&p, query, "k").await;
        assert!(r.status == 500 || r.status == 200, "{}", r.status);
    }
    assert_eq!(submit(&p, "", "k").await.status, 200, "no slot leaked");
    assert_eq!(submit(&p, "", "k").await.status, 429);
    // A connect error too.
    let dead = Upstream::dead().await;
    let p = Proxy::start(&CONFIG.replace("max = 2", "max = 1"), &dead).await;
    assert_eq!(submit(&p, "", "k").await.status, 502);
    assert_eq!(
        submit(&p, "", "k").await.status,
        502,
        "the 502 gave its slot back"
    );
}

#[tokio::test]
async fn a_job_named_in_a_header_and_expiry_at_max_duration() {
    let up = Upstream::start().await;
    let config = CONFIG.replace("max = 2", "max = 1").replace(
        "job = { id = \"json:/id\" }",
        "job = { id = \"header:Location\" }",
    );
    let p = Proxy::start(&config, &up).await;
    let r = submit(&p, "?location", "k").await;
    assert_eq!((r.status, r.h("location")), (202, "job-1"));
    assert_eq!(submit(&p, "?location", "k").await.status, 429);
    // Never seen ending: free after max_duration (the proxy's clock).
    p.advance_secs(3599);
    assert_eq!(submit(&p, "?location", "k").await.status, 429);
    p.advance_secs(1);
    assert_eq!(submit(&p, "?location", "k").await.status, 202);
    assert_eq!(p.app.store().jobs_expired(), 1);
}

#[tokio::test]
async fn a_client_that_leaves_after_sending_does_not_end_the_accounting() {
    let up = Upstream::start().await;
    let p = Proxy::start(&CONFIG.replace("max = 2", "max = 1"), &up).await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        b"POST /gen?hold HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    eventually("the submission reached the upstream", || up.hits() == 1).await;
    drop(conn);
    tokio::time::sleep(Duration::from_millis(50)).await;
    up.release(1);
    // The answer named job-1 with nobody waiting: the slot is the job's.
    eventually("the job was recorded", || {
        p.app.store().jobs_in_progress() == 1
    })
    .await;
    assert_eq!(submit(&p, "", "k").await.status, 429);
    assert_eq!(poll(&p, "job-1", "failed", "k").await.status, 200);
    assert_eq!(submit(&p, "", "k").await.status, 200);
}

#[tokio::test]
async fn a_client_gone_before_its_request_was_sent_in_full_frees_the_slot() {
    let up = Upstream::start().await;
    let p = Proxy::start(&CONFIG.replace("max = 2", "max = 1"), &up).await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        b"POST /gen HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\ncontent-length: 100\r\n\r\n{\"a\":",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = submit(&p, "", "k").await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429);
        assert!(
            Instant::now() < deadline,
            "the cut-short submission kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.app.store().jobs_in_progress(), 1, "only the complete one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_submissions_at_once_start_exactly_max_jobs() {
    let up = Upstream::start().await;
    let p = std::sync::Arc::new(Proxy::start(&CONFIG.replace("max = 2", "max = 3"), &up).await);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = p.url("/gen");
            tokio::spawn(async move { call("POST", &url, Some("k")).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(tally(statuses), [(200, 3), (429, 47)].into_iter().collect());
    assert_eq!(up.hits(), 3);
    assert_eq!(p.app.store().jobs_in_progress(), 3);
}

#[tokio::test]
async fn a_window_refusal_takes_no_job_slot() {
    let up = Upstream::start().await;
    let p = Proxy::start(&CONFIG.replace("requests = 100", "requests = 2"), &up).await;
    assert_eq!(submit(&p, "", "k").await.status, 200);
    assert_eq!(poll(&p, "job-1", "completed", "k").await.status, 200);
    assert_eq!(submit(&p, "", "k").await.status, 200);
    let r = submit(&p, "", "k").await;
    assert_eq!((r.status, r.h("x-ratelimit-type")), (429, "minute"));
    // One job in progress: the minute's refusal left the second slot free.
    assert_eq!(p.app.store().jobs_in_progress(), 1);
    p.advance_secs(60);
    assert_eq!(submit(&p, "", "k").await.status, 200);
    assert_eq!(
        submit(&p, "", "k").await.json()["rate_limit"]["name"],
        "video-jobs"
    );
}

#[tokio::test]
async fn ended_jobs_are_counted_by_how_they_ended() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    submit(&p, "", "k").await;
    submit(&p, "", "k").await;
    poll(&p, "job-1", "failed", "k").await;
    call("POST", &p.url("/gen/job-2/cancel"), Some("k")).await;
    let figures = turnstile::observe::metrics::StoreFigures {
        jobs_in_progress: p.app.store().jobs_in_progress(),
        ..Default::default()
    };
    let text = p.app.metrics().render(figures);
    for line in [
        "turnstile_jobs_ended_total{how=\"done\"} 1",
        "turnstile_jobs_ended_total{how=\"cancelled\"} 1",
        "turnstile_jobs_in_progress 0",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
}

const MCP: &str = r#"
[upstream]
url = "{upstream}"

[[routes]]
name = "generate_video"
path = "/mcp-gen"
mcp_tool = "generate_video"
format = "mcp"
job = { id = "json:/result/structuredContent/job_id" }

[[routes]]
name = "get_status"
path = "/mcp-gen"
mcp_tool = "get_status"
format = "mcp"
job_status = { id = "json:/params/arguments/job_id", state = "json:/result/structuredContent/status", done = ["completed"] }

[plans.p]
[[plans.p.limits]]
name = "generations"
kind = "jobs"
max = 1
routes = ["generate_video"]
retry_after = "7s"
"#;

async fn tool(p: &Proxy, name: &str, args: &str) -> Got {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":41,"method":"tools/call","params":{{"name":"{name}","arguments":{args}}}}}"#
    );
    send(
        req("POST", &p.url("/mcp-gen"))
            .header("authorization", "Bearer k")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn mcp_tools_answered_as_sse_start_and_end_jobs() {
    let up = Upstream::start().await;
    let p = Proxy::start(MCP, &up).await;
    let r = tool(&p, "generate_video", "{}").await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("\"job_id\":\"job-1\""),
        "passed on whole: {}",
        r.body
    );
    let refused = tool(&p, "generate_video", "{}").await;
    assert_eq!(
        (
            refused.status,
            refused.h("x-ratelimit-type"),
            refused.h("retry-after")
        ),
        (200, "generations", "7")
    );
    let body = refused.json();
    assert_eq!(
        (&body["id"], &body["result"]["isError"]),
        (&serde_json::json!(41), &serde_json::json!(true))
    );
    assert_eq!(
        body["result"]["content"][0]["text"],
        "Too many generations in progress (at most 1). Try again in 7 s."
    );
    let r = tool(
        &p,
        "get_status",
        r#"{"job_id":"job-1","state":"rendering"}"#,
    )
    .await;
    assert!(r.body.contains("rendering"), "{}", r.body);
    assert_eq!(
        tool(&p, "generate_video", "{}").await.json()["result"]["isError"],
        true
    );
    tool(
        &p,
        "get_status",
        r#"{"job_id":"job-1","state":"completed"}"#,
    )
    .await;
    let r = tool(&p, "generate_video", "{}").await;
    assert!(
        r.body.contains("job-2"),
        "admitted once job-1 was done: {}",
        r.body
    );
}

#[tokio::test]
async fn jobs_survive_a_reload_and_the_new_max_applies() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    for _ in 0..2 {
        assert_eq!(submit(&p, "", "k").await.status, 200);
    }
    let path = p.dir.path().join("turnstile.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("max = 2", "max = 3")).unwrap();
    p.app.reload().unwrap();
    assert_eq!(submit(&p, "", "k").await.status, 200);
    assert_eq!(
        submit(&p, "", "k").await.status,
        429,
        "the two jobs were kept"
    );
}

const BINARY: &str = r#"
[server]
listen = "127.0.0.1:{port}"

[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"

[store]
snapshot = "state/counters.bin"

[admin]
listen = "127.0.0.1:{admin_port}"

[[routes]]
name = "gen"
method = "POST"
path = "/gen"
job = { id = "json:/id" }

[plans.free]
[[plans.free.limits]]
name = "jobs"
kind = "jobs"
max = 2
per = "account"
routes = ["gen"]
"#;

const KEYS: &str = "[[keys]]\nkey = \"key-a\"\naccount = \"acme\"\nplan = \"free\"\n\n[[keys]]\nkey = \"key-b\"\naccount = \"acme\"\nplan = \"free\"\n";

async fn admin(b: &Binary, method: &str, path: &str) -> Got {
    send(
        req(method, &b.admin(path))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn admin_lists_and_ends_jobs_metrics_count_them_and_a_restart_keeps_them() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    let mut b = Binary::start(dir.path(), BINARY, &up).await;
    // Per account: both keys of acme share the two slots.
    assert_eq!(
        call("POST", &b.url("/gen"), Some("key-a")).await.status,
        200
    );
    assert_eq!(
        call("POST", &b.url("/gen"), Some("key-b")).await.status,
        200
    );
    assert_eq!(
        call("POST", &b.url("/gen"), Some("key-a")).await.status,
        429
    );

    let usage = admin(&b, "GET", "/v1/usage?account=acme").await.json();
    let jobs = &usage["counters"][0];
    assert_eq!(
        (&jobs["kind"], &jobs["in_progress"], &jobs["limit"]),
        (
            &serde_json::json!("jobs"),
            &serde_json::json!(2),
            &serde_json::json!(2)
        ),
        "{usage}"
    );
    let ids: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["job-1", "job-2"]);
    let first = &jobs["jobs"][0];
    // Started rounds down, expires up: 1 h apart, give or take the rounding.
    let span = first["expires"].as_u64().unwrap() - first["started"].as_u64().unwrap();
    assert!(
        (3600..=3601).contains(&span),
        "max_duration defaults to 1h: {span}"
    );

    // A restart keeps the jobs (snapshot at shutdown).
    b.signal("TERM");
    assert!(b.wait().await.success());
    let (port, admin_port) = (b.port, b.admin_port);
    drop(b);
    let b = Binary::restart(dir.path(), port, admin_port).await;
    b.log_line("counters restored").await;
    assert_eq!(
        call("POST", &b.url("/gen"), Some("key-b")).await.status,
        429
    );

    let r = admin(&b, "DELETE", "/v1/jobs?account=acme&id=job-404").await;
    assert_eq!(r.status, 404);
    let r = admin(&b, "DELETE", "/v1/jobs?account=acme&id=job-1").await;
    assert_eq!((r.status, r.json()["ended"].as_str()), (200, Some("job-1")));
    assert_eq!(
        call("POST", &b.url("/gen"), Some("key-b")).await.status,
        200
    );

    let metrics = admin(&b, "GET", "/metrics").await.body;
    assert!(
        metrics.contains("turnstile_jobs_in_progress 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("turnstile_jobs_ended_total{how=\"admin\"} 1"),
        "{metrics}"
    );
}

/// The quickstart's config in front of the bundled example API, whose
/// videos really run (for 20 s of the example API's clock).
#[tokio::test]
async fn the_quickstart_counts_videos_in_progress() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let config = std::fs::read_to_string(root.join("turnstile.toml"))
        .unwrap()
        .replace("listen = \"127.0.0.1:8080\"", "")
        .replace("url = \"http://127.0.0.1:9000\"", "url = \"{upstream}\"")
        .replace("snapshot = \"../state/counters.bin\"", "")
        .replace("../state/ledger.db", "state/ledger.db")
        .replace("listen = \"127.0.0.1:9090\"", "listen = \"127.0.0.1:0\"");
    let keys = std::fs::read_to_string(root.join("keys.toml")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut api = Upstream::start().await;
    api.addr = listener.local_addr().unwrap();
    tokio::spawn(turnstile::cli::example_api::serve(listener));
    let p = Proxy::start_with(&config, &api, &[("keys.toml", &keys)]).await;
    let key = "demo-free-key";
    let video = |p: &Proxy| {
        let url = p.url("/v1/videos");
        async move { call("POST", &url, Some(key)).await }
    };
    assert_eq!(video(&p).await.json()["id"], "vid_1");
    assert_eq!(video(&p).await.json()["id"], "vid_2");
    let r = video(&p).await;
    assert_eq!((r.status, r.h("x-ratelimit-type")), (429, "videos"));
    let r = call("GET", &p.url("/v1/videos/vid_1"), Some(key)).await;
    assert_eq!(r.json()["status"], "processing");
    assert_eq!(video(&p).await.status, 429, "still processing");
    let r = call("POST", &p.url("/v1/videos/vid_1/cancel"), Some(key)).await;
    assert_eq!(r.json()["status"], "cancelled");
    assert_eq!(video(&p).await.json()["id"], "vid_3");
    assert_eq!(video(&p).await.status, 429);
}
