//! Cost, credits and refunds (SPEC §12) and conditions on request content
//! (§13), against the real server and a real upstream: what a request
//! costs, balances that are never overspent, the upstream's own figure
//! replacing the estimate, refunds, and routes chosen by request values.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};
use support::*;

const CONFIG: &str = r#"
[upstream]
url = "{upstream}"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "image"
method = "POST"
path = "/v1/images"
cost = { by = "json:/model", prices = { "flux-pro" = 8, "veo-3" = 40 }, times = "json:/n" }

[[routes]]
name = "flat"
path = "/flat"
cost = 10

[[routes]]
name = "billed-json"
path = "/bill"
when = { "query:via" = "json" }
cost = 10
settle = "json:/credits_used"

[[routes]]
name = "billed"
path = "/bill"
cost = 10
settle = "header:x-credits-used"

[[routes]]
name = "music"
method = "POST"
path = "/mcp"
mcp_tool = "generate_music"
format = "mcp"
cost = 10
settle = "json:/result/structuredContent/credits_used"

[[routes]]
name = "refunded"
path = "/status/{code}"
cost = 10
refund_on = ["5xx", "429"]

[[routes]]
name = "slow"
path = "/slow"
timeout = "200ms"
cost = 10
refund_on = ["timeout"]

[plans.free]
[[plans.free.limits]]
name = "credits"
kind = "credits"
grant = 100
refill = "1h"
headers = "X-Credits"

[[plans.free.limits]]
name = "daily-spend"
window = "1d"
requests = 1000
count = "cost"
"#;

async fn post_json(p: &Proxy, path: &str, key: &str, body: Value) -> Got {
    send(
        req("POST", &p.url(path))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
}

async fn admin(p: &Proxy, method: &str, path: &str, body: Option<Value>) -> Got {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    send(
        req(method, &p.admin_url(path))
            .body(Full::new(body))
            .unwrap(),
    )
    .await
}

async fn balance(p: &Proxy, key: &str) -> i64 {
    let got = admin(p, "GET", &format!("/v1/credits?key={key}"), None).await;
    assert_eq!(got.status, 200, "{}", got.body);
    got.json()["balance"].as_i64().expect("a balance")
}

/// The `used` figure of a window counter in the admin usage output.
async fn used(p: &Proxy, key: &str, limit: &str) -> u64 {
    let usage = admin(p, "GET", &format!("/v1/usage?key={key}"), None)
        .await
        .json();
    usage["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == limit)
        .and_then(|c| c["used"].as_u64())
        .unwrap_or_else(|| panic!("no {limit} in {usage}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_parallel_requests_of_cost_10_against_100_admit_exactly_10() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let url = p.url("/flat");
            tokio::spawn(async move { call("GET", &url, Some("k")).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let statuses = tally(answers.iter().map(|g| g.status));
    assert_eq!(statuses.get(&200), Some(&10), "{statuses:?}");
    assert_eq!(statuses.get(&402), Some(&20), "{statuses:?}");
    assert_eq!(up.hits(), 10, "refused requests never reach the upstream");
    let refused = answers.iter().find(|g| g.status == 402).unwrap();
    assert_eq!(
        refused.json(),
        json!({
            "error": "insufficient_credits",
            "message": "Insufficient credits: this request costs 10 credits, 0 left.",
            "credits": {"name": "credits", "balance": 0, "cost": 10},
        })
    );
    assert_eq!(refused.h("x-credits-remaining"), "0");
    assert_eq!(refused.h("x-credits-limit"), "100");
    assert!(
        refused.header("retry-after").is_none(),
        "waiting does not refill a balance before its refill"
    );
    let shown = admin(&p, "GET", "/v1/credits?key=k", None).await.json();
    let next = (T0 / 3600 + 1) * 3600;
    assert_eq!(
        shown,
        json!({"name": "credits", "balance": 0, "grant": 100, "next_refill": next})
    );
    // A 402 consumed nothing: the daily spend counts the ten admitted only.
    assert_eq!(used(&p, "k", "daily-spend").await, 100);

    // The refill sets the balance back to the grant.
    p.advance_secs(3600);
    assert_eq!(call("GET", &p.url("/flat"), Some("k")).await.status, 200);
    assert_eq!(balance(&p, "k").await, 90);
}

#[tokio::test]
async fn a_price_table_by_model_times_a_count() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let ok = post_json(&p, "/v1/images", "k", json!({"model": "flux-pro", "n": 2})).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        (ok.h("x-credits-limit"), ok.h("x-credits-remaining")),
        ("100", "84")
    );
    // Credits are not a quota over time: the main headers show the daily spend.
    assert_eq!(
        (ok.h("x-ratelimit-limit"), ok.h("x-ratelimit-remaining")),
        ("1000", "984")
    );

    let dear = post_json(&p, "/v1/images", "k", json!({"model": "veo-3", "n": 3})).await;
    assert_eq!(dear.status, 402);
    assert_eq!(
        dear.json()["message"],
        "Insufficient credits: this request costs 120 credits, 84 left."
    );
    let unpriced = post_json(&p, "/v1/images", "k", json!({"model": "sdxl"})).await;
    assert_eq!(unpriced.status, 400);
    assert_eq!(unpriced.json()["error"], "invalid_arguments");
    let message = unpriced.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("\"sdxl\"") && message.contains("flux-pro, veo-3"),
        "{message}"
    );
    let absent = post_json(&p, "/v1/images", "k", json!({"n": 1})).await;
    assert_eq!(
        (absent.status, absent.json()["message"].as_str()),
        (400, Some("json:/model is required to price this request"))
    );
    for n in [json!(0), json!(-1), json!(1.5), json!("two")] {
        let bad = post_json(&p, "/v1/images", "k", json!({"model": "flux-pro", "n": n})).await;
        assert_eq!(bad.status, 400, "n = {n}");
    }
    // No `times` value: counted once.
    let one = post_json(&p, "/v1/images", "k", json!({"model": "flux-pro"})).await;
    assert_eq!(one.h("x-credits-remaining"), "76");
    assert_eq!(
        up.hits(),
        2,
        "refused and unpriced requests never reach the upstream"
    );
    assert_eq!(balance(&p, "k").await, 76);
}

#[tokio::test]
async fn the_answer_settles_the_cost_from_a_header_or_the_json_body() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    // Estimate 10 reserved at admission; the upstream says it used 3.
    let a = call("GET", &p.url("/bill?used=3"), Some("k")).await;
    assert_eq!((a.status, a.h("x-credits-remaining")), (200, "90"));
    assert_eq!(balance(&p, "k").await, 97);
    // Used more than the balance: it goes negative and then refuses.
    assert_eq!(
        call("GET", &p.url("/bill?used=150"), Some("k"))
            .await
            .status,
        200
    );
    assert_eq!(balance(&p, "k").await, -53);
    let refused = call("GET", &p.url("/flat"), Some("k")).await;
    assert_eq!(refused.status, 402);
    assert_eq!(
        refused.json()["credits"]["balance"],
        0,
        "shown never below 0"
    );

    // Top up, then set.
    let added = admin(&p, "POST", "/v1/credits?key=k", Some(json!({"add": 100}))).await;
    assert_eq!(
        (added.status, added.json()["balance"].as_i64()),
        (200, Some(47))
    );
    assert_eq!(call("GET", &p.url("/flat"), Some("k")).await.status, 200);
    let set = admin(&p, "POST", "/v1/credits?key=k", Some(json!({"set": 500}))).await;
    assert_eq!(set.json()["balance"], 500);

    // From the JSON body; no figure in the answer: the estimate stands.
    let j = call("GET", &p.url("/bill?via=json&used=5"), Some("k")).await;
    assert_eq!(
        j.json(),
        json!({"credits_used": 5}),
        "the body passes intact"
    );
    assert_eq!(balance(&p, "k").await, 495);
    assert_eq!(
        call("GET", &p.url("/bill?via=json"), Some("k"))
            .await
            .status,
        200
    );
    assert_eq!(balance(&p, "k").await, 485);
    // The cost-counting window was settled the same way: 3 + 150 + 10 + 5 + 10.
    assert_eq!(used(&p, "k", "daily-spend").await, 178);

    for bad in [
        json!({"add": 1.5}),
        json!({"take": 1}),
        json!({"add": 1, "set": 2}),
    ] {
        let r = admin(&p, "POST", "/v1/credits?key=k", Some(bad.clone())).await;
        assert_eq!(r.status, 400, "{bad}");
    }
    assert_eq!(
        balance(&p, "k").await,
        485,
        "a refused change changes nothing"
    );
    let usage = admin(&p, "GET", "/v1/usage?key=k", None).await.json();
    let row = usage["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "credits")
        .cloned()
        .unwrap();
    assert_eq!(
        (row["balance"].as_i64(), row["limit"].as_u64()),
        (Some(485), Some(100))
    );
    let metrics = call("GET", &p.admin_url("/metrics"), None).await.body;
    assert!(
        metrics.contains("turnstile_credits_spent_total{route=\"billed\"} 153"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_mcp_answer_delivered_as_sse_settles_the_cost() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let call_tool = json!({
        "jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "generate_music", "arguments": {"prompt": "jazz", "credits_used": 4}},
    });
    let got = post_json(&p, "/mcp?jobs", "k", call_tool).await;
    assert_eq!(got.status, 200);
    assert!(got.body.contains("\"credits_used\":4"), "{}", got.body);
    assert_eq!(balance(&p, "k").await, 96);
    // Out of credits, the tool call is refused as a tool error.
    admin(&p, "POST", "/v1/credits?key=k", Some(json!({"set": 3}))).await;
    let again = json!({
        "jsonrpc": "2.0", "id": 8, "method": "tools/call",
        "params": {"name": "generate_music", "arguments": {"prompt": "jazz"}},
    });
    let refused = post_json(&p, "/mcp?jobs", "k", again).await;
    let body = refused.json();
    assert_eq!((refused.status, &body["id"]), (200, &json!(8)));
    assert_eq!(body["result"]["isError"], true);
    assert_eq!(
        body["result"]["content"][0]["text"],
        "Insufficient credits: this request costs 10 credits, 3 left."
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn refund_on_gives_back_credits_and_window_counts_for_each_reason() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    // The upstream's 5xx and a listed status: everything given back.
    assert_eq!(
        call("GET", &p.url("/status/503"), Some("k")).await.status,
        503
    );
    assert_eq!(
        call("GET", &p.url("/status/429"), Some("k")).await.status,
        429
    );
    assert_eq!(balance(&p, "k").await, 100);
    assert_eq!(used(&p, "k", "daily-spend").await, 0);
    // A status it does not list is paid for.
    assert_eq!(
        call("GET", &p.url("/status/404"), Some("k")).await.status,
        404
    );
    assert_eq!(balance(&p, "k").await, 90);
    // 504 from turnstile.
    let slow = call("GET", &p.url("/slow"), Some("k")).await;
    assert_eq!(slow.status, 504);
    assert_eq!(balance(&p, "k").await, 90);
    assert_eq!(used(&p, "k", "daily-spend").await, 10);
    let metrics = call("GET", &p.admin_url("/metrics"), None).await.body;
    for line in [
        "turnstile_refunds_total{route=\"refunded\",reason=\"5xx\"} 1",
        "turnstile_refunds_total{route=\"refunded\",reason=\"429\"} 1",
        "turnstile_refunds_total{route=\"slow\",reason=\"timeout\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }

    // 502 from turnstile: refunded with "connect", paid for without it.
    let dead = Upstream::dead().await;
    let connect = CONFIG.replace(
        "[[routes]]\nname = \"flat\"\npath = \"/flat\"\ncost = 10\n",
        "[[routes]]\nname = \"flat\"\npath = \"/flat\"\ncost = 10\nrefund_on = [\"connect\"]\n\n[[routes]]\nname = \"paid\"\npath = \"/paid\"\ncost = 10\n",
    );
    assert_ne!(connect, CONFIG);
    let d = Proxy::start(&connect, &dead).await;
    assert_eq!(call("GET", &d.url("/flat"), Some("k")).await.status, 502);
    assert_eq!(balance(&d, "k").await, 100);
    assert_eq!(call("GET", &d.url("/paid"), Some("k")).await.status, 502);
    assert_eq!(
        balance(&d, "k").await,
        90,
        "without refund_on a 502 is paid for"
    );
}

#[tokio::test]
async fn a_refunded_submission_gives_its_job_slot_and_window_count_back() {
    let up = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"

[[routes]]
name = "txt2video"
method = "POST"
path = "/gen"
job = { id = "json:/id" }
refund_on = ["5xx"]

[plans.free]
[[plans.free.limits]]
name = "jobs"
kind = "jobs"
max = 1

[[plans.free.limits]]
name = "daily"
window = "1d"
requests = 2
"#;
    let p = Proxy::start(config, &up).await;
    for _ in 0..3 {
        assert_eq!(
            call("POST", &p.url("/gen?fail"), Some("k")).await.status,
            500
        );
    }
    // Three failures cost nothing: the one slot and both daily requests are there.
    let a = call("POST", &p.url("/gen"), Some("k")).await;
    assert_eq!((a.status, a.h("x-ratelimit-remaining")), (200, "1"));
    assert_eq!(call("POST", &p.url("/gen"), Some("k")).await.status, 429);
}

const WHEN: &str = r#"
[upstream]
url = "{upstream}"

[[routes]]
name = "blog"
method = "POST"
path = "/content"
when = { "json:/contentType" = ["blog_post", "article"] }

[[routes]]
name = "flux"
method = "POST"
path = "/content"
when = { "header:x-model" = "flux-pro", "query:size" = ["1024", "2048"] }

[[routes]]
name = "numbered"
method = "POST"
path = "/content"
when = { "json:/n" = [3, true] }

[[routes]]
name = "other"
method = "POST"
path = "/content"

[plans.free]
[[plans.free.limits]]
name = "blog-monthly"
routes = ["blog"]
requests = 1
window = "month"

[[plans.free.limits]]
name = "flux-monthly"
routes = ["flux"]
requests = 1
window = "month"

[[plans.free.limits]]
name = "numbered-monthly"
routes = ["numbered"]
requests = 2
window = "month"

[[plans.free.limits]]
name = "other-minute"
routes = ["other"]
requests = 100
window = "1m"
"#;

async fn content(p: &Proxy, query: &str, headers: &[(&str, &str)], body: &str) -> Got {
    let mut r = req("POST", &p.url(&format!("/content{query}")))
        .header("authorization", "Bearer k")
        .header("content-type", "application/json");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    send(r.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
}

#[tokio::test]
async fn when_conditions_choose_the_route_and_fall_through_when_they_do_not_hold() {
    let up = Upstream::start().await;
    let p = Proxy::start(WHEN, &up).await;
    let body = r#"{"contentType":"blog_post","title":"x"}"#;
    let blog = content(&p, "", &[], body).await;
    assert_eq!((blog.status, blog.h("x-ratelimit-limit")), (200, "1"));
    assert_eq!(
        up.last().body,
        Bytes::from(body),
        "the body reaches the upstream intact"
    );
    // Either listed value counts against the same monthly quota.
    let article = content(&p, "", &[], r#"{"contentType":"article"}"#).await;
    assert_eq!(
        (article.status, article.h("x-ratelimit-type")),
        (429, "blog-monthly")
    );
    // Another type falls through to the next route that matches.
    let video = content(&p, "", &[], r#"{"contentType":"video"}"#).await;
    assert_eq!((video.status, video.h("x-ratelimit-limit")), (200, "100"));
    let absent = content(&p, "", &[], r#"{"title":"no type"}"#).await;
    assert_eq!(
        absent.h("x-ratelimit-limit"),
        "100",
        "an absent value never matches"
    );
    let empty = content(&p, "", &[], "").await;
    assert_eq!(
        (empty.status, empty.h("x-ratelimit-limit")),
        (200, "100"),
        "no body: no json: value, the next route"
    );

    // Every condition must hold: header and query together.
    let flux = [("x-model", "flux-pro")];
    let half = content(&p, "", &flux, "{}").await;
    assert_eq!(half.h("x-ratelimit-limit"), "100");
    let both = content(&p, "?size=2048", &flux, "{}").await;
    assert_eq!((both.status, both.h("x-ratelimit-limit")), (200, "1"));
    assert_eq!(content(&p, "?size=1024", &flux, "{}").await.status, 429);

    // Numbers and booleans compare as their JSON text.
    let n = content(&p, "", &[], r#"{"n":3}"#).await;
    assert_eq!(n.h("x-ratelimit-limit"), "2");
    let t = content(&p, "", &[], r#"{"n":true}"#).await;
    assert_eq!(t.h("x-ratelimit-limit"), "2");
    assert_eq!(
        content(&p, "", &[], r#"{"n":4}"#)
            .await
            .h("x-ratelimit-limit"),
        "100"
    );

    // A body the proxy cannot read as strict JSON is refused, never passed to a later route.
    let hits = up.hits();
    for bad in [
        r#"{"contentType":"blog_post""#,
        r#"{"contentType":"video","contentType":"blog_post"}"#,
    ] {
        let r = content(&p, "", &[], bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    assert_eq!(up.hits(), hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_top_ups_and_concurrent_spending_never_overspend() {
    let up = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "gen"
path = "/gen-credit"

[plans.free]
[[plans.free.limits]]
name = "credits"
kind = "credits"
grant = 0
"#;
    let p = std::sync::Arc::new(Proxy::start(config, &up).await);
    let spenders: Vec<_> = (0..200)
        .map(|_| {
            let url = p.url("/gen-credit");
            tokio::spawn(async move { call("GET", &url, Some("k")).await.status })
        })
        .collect();
    let toppers: Vec<_> = (0..20)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move {
                admin(&p, "POST", "/v1/credits?key=k", Some(json!({"add": 5})))
                    .await
                    .status
            })
        })
        .collect();
    for t in toppers {
        assert_eq!(t.await.unwrap(), 200);
    }
    let mut admitted = 0;
    for t in spenders {
        match t.await.unwrap() {
            200 => admitted += 1,
            402 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(admitted <= 100, "admitted {admitted} with 100 credits");
    assert_eq!(up.hits(), admitted);
    assert_eq!(balance(&p, "k").await, 100 - admitted as i64);
    let set = admin(&p, "POST", "/v1/credits?key=k", Some(json!({"set": 2}))).await;
    assert_eq!(set.json()["balance"], 2);
    let statuses: Vec<u16> = futures_statuses(&p, 5).await;
    assert_eq!(tally(statuses), [(200, 2), (402, 3)].into_iter().collect());
}

async fn futures_statuses(p: &Proxy, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(call("GET", &p.url("/gen-credit"), Some("k")).await.status);
    }
    out
}

const SNAPSHOT: &str = r#"
[server]
listen = "127.0.0.1:{port}"

[upstream]
url = "{upstream}"

[store]
snapshot = "state/counters.bin"

[admin]
listen = "127.0.0.1:{admin_port}"

[[routes]]
name = "gen"
path = "/gen-credit"
cost = 30

[plans.free]
[[plans.free.limits]]
name = "credits"
kind = "credits"
grant = 100
"#;

#[tokio::test]
async fn balances_survive_a_reload_and_a_restart() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut b = Binary::start(dir.path(), SNAPSHOT, &up).await;
    b.wait_admin().await;
    assert_eq!(
        call("GET", &b.url("/gen-credit"), Some("k")).await.status,
        200
    );
    let read = || async {
        call("GET", &b.admin("/v1/credits?key=k"), None)
            .await
            .json()["balance"]
            .clone()
    };
    assert_eq!(read().await, 70);
    let reload = send(
        req("POST", &b.admin("/v1/reload"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    assert_eq!(read().await, 70);
    b.signal("TERM");
    b.wait().await;
    let port = b.port;
    let admin_port = b.admin_port;
    drop(b);
    let b = Binary::restart(dir.path(), port, admin_port).await;
    b.wait_admin().await;
    assert_eq!(
        call("GET", &b.admin("/v1/credits?key=k"), None)
            .await
            .json()["balance"],
        70
    );
    assert_eq!(
        call("GET", &b.url("/gen-credit"), Some("k")).await.status,
        200
    );
    assert_eq!(
        call("GET", &b.url("/gen-credit"), Some("k")).await.status,
        200
    );
    assert_eq!(
        call("GET", &b.url("/gen-credit"), Some("k")).await.status,
        402
    );
}
