//! SPEC §3, §5 and §6 on the wire: counting, refusals, every rate-limit
//! header and the 429 body, with a manual clock.

mod support;

use support::*;

const CONFIG: &str = r#"
[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"
default_plan = "free"

[[routes]]
name = "gen"
method = "POST"
path = "/v1/gen"

[[routes]]
name = "other"
method = "POST"
path = "/v1/other"

[[routes]]
name = "status"
method = "GET"
path = "/v1/status/{id}"

[plans.free]
[[plans.free.limits]]
name = "minute"
routes = ["gen", "other"]
per_route = true
requests = 3
window = "1m"

[[plans.free.limits]]
name = "daily"
routes = ["gen", "other"]
per = "account"
requests = 5
window = "1d"
headers = "X-RateLimit-Daily"

[plans.pro]
[[plans.pro.limits]]
name = "burst"
kind = "bucket"
routes = ["gen"]
rate = "2/s"
burst = 4

[[plans.pro.limits]]
name = "polls"
kind = "rolling"
routes = ["status"]
requests = 3
window = "10s"
"#;

const KEYS: &str = r#"
[[keys]]
key = "free-a"
account = "acme"
plan = "free"

[[keys]]
key = "free-b"
account = "acme"
plan = "free"

[[keys]]
key = "pro-1"
plan = "pro"
"#;

async fn setup() -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let proxy = Proxy::start_with(CONFIG, &up, &[("keys.toml", KEYS)]).await;
    (up, proxy)
}

const MIDNIGHT: u64 = 1_778_025_600; // 2026-05-06T00:00:00Z

#[tokio::test]
async fn admitted_requests_carry_the_primary_trio_and_extra_headers() {
    let (up, p) = setup().await;
    let r = call("POST", &p.url("/v1/gen"), Some("free-a")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.h("x-upstream"), "yes");
    // minute (2 left) is the primary: it has the least remaining.
    assert_eq!(r.h("x-ratelimit-limit"), "3");
    assert_eq!(r.h("x-ratelimit-remaining"), "2");
    assert_eq!(r.h("x-ratelimit-reset"), (T0 + 60).to_string());
    assert_eq!(r.h("x-ratelimit-daily-limit"), "5");
    assert_eq!(r.h("x-ratelimit-daily-remaining"), "4");
    assert_eq!(r.h("x-ratelimit-daily-reset"), MIDNIGHT.to_string());
    assert!(r.header("x-ratelimit-type").is_none() && r.header("retry-after").is_none());
    assert!(
        r.header("ratelimit-policy").is_none(),
        "IETF fields are off by default"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_minute_refusal_has_the_full_contract_and_consumes_nothing() {
    let (up, p) = setup().await;
    for remaining in ["2", "1", "0"] {
        let r = call("POST", &p.url("/v1/gen"), Some("free-a")).await;
        assert_eq!((r.status, r.h("x-ratelimit-remaining")), (200, remaining));
    }
    p.advance_secs(5); // T0 + 15
    let r = call("POST", &p.url("/v1/gen"), Some("free-a")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.h("content-type"), "application/json");
    assert_eq!(r.h("x-ratelimit-type"), "minute");
    assert_eq!(r.h("retry-after"), "45");
    assert_eq!(r.h("x-ratelimit-limit"), "3");
    assert_eq!(r.h("x-ratelimit-remaining"), "0");
    assert_eq!(r.h("x-ratelimit-reset"), (T0 + 60).to_string());
    // The daily limit admitted but nothing was counted: still 2 left of 5.
    assert_eq!(r.h("x-ratelimit-daily-remaining"), "2");
    let body = r.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(
        body["message"],
        "Rate limit exceeded: 3 requests per 1m (minute). Retry in 45 s."
    );
    let rl = &body["rate_limit"];
    assert_eq!(
        (
            rl["name"].as_str(),
            rl["count"].as_u64(),
            rl["limit"].as_u64()
        ),
        (Some("minute"), Some(3), Some(3))
    );
    assert_eq!(
        (rl["remaining"].as_u64(), rl["reset_in_seconds"].as_u64()),
        (Some(0), Some(45))
    );
    assert_eq!(rl["reset_at"], "2026-05-05T16:01:00Z");
    assert_eq!(
        up.hits(),
        3,
        "the refused request never reached the upstream"
    );

    // Exactly at the next minute boundary the window is fresh.
    p.advance_secs(45);
    let r = call("POST", &p.url("/v1/gen"), Some("free-a")).await;
    assert_eq!(
        (r.status, r.h("x-ratelimit-remaining")),
        (200, "1"),
        "minute 2 left, daily 1 left: daily is primary"
    );
    assert_eq!(r.h("x-ratelimit-limit"), "5");
}

#[tokio::test]
async fn per_route_minutes_share_one_daily_per_account() {
    let (_up, p) = setup().await;
    for _ in 0..3 {
        assert_eq!(
            call("POST", &p.url("/v1/gen"), Some("free-a")).await.status,
            200
        );
    }
    // Another route has its own minute counter...
    let r = call("POST", &p.url("/v1/other"), Some("free-b")).await;
    assert_eq!((r.status, r.h("x-ratelimit-daily-remaining")), (200, "1"));
    // ...but the account's daily is shared by both keys and both routes.
    assert_eq!(
        call("POST", &p.url("/v1/other"), Some("free-b"))
            .await
            .status,
        200
    );
    let r = call("POST", &p.url("/v1/other"), Some("free-a")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.h("x-ratelimit-type"), "daily");
    assert_eq!(r.h("retry-after"), (MIDNIGHT - T0 - 10).to_string());
    // Refused by daily: the daily is the primary.
    assert_eq!(
        (r.h("x-ratelimit-limit"), r.h("x-ratelimit-reset")),
        ("5", &*MIDNIGHT.to_string())
    );
    assert_eq!(r.json()["rate_limit"]["reset_at"], "2026-05-06T00:00:00Z");
}

#[tokio::test]
async fn bucket_limit_headers_show_burst_and_refill() {
    let (_up, p) = setup().await;
    for remaining in ["3", "2", "1", "0"] {
        let r = call("POST", &p.url("/v1/gen"), Some("pro-1")).await;
        assert_eq!(
            (
                r.status,
                r.h("x-ratelimit-limit"),
                r.h("x-ratelimit-remaining")
            ),
            (200, "4", remaining)
        );
    }
    let r = call("POST", &p.url("/v1/gen"), Some("pro-1")).await;
    assert_eq!(
        (r.status, r.h("x-ratelimit-type"), r.h("retry-after")),
        (429, "burst", "1")
    );
    assert_eq!(
        r.json()["message"],
        "Rate limit exceeded: bursts of 4 requests, refilled at 2/s (burst). Retry in 1 s."
    );
    // Full again 2 s after now (4 tokens at 2/s).
    assert_eq!(r.h("x-ratelimit-reset"), (T0 + 12).to_string());
    p.clock.advance(500_000_000); // one token back
    assert_eq!(
        call("POST", &p.url("/v1/gen"), Some("pro-1")).await.status,
        200
    );
    assert_eq!(
        call("POST", &p.url("/v1/gen"), Some("pro-1")).await.status,
        429
    );
}

#[tokio::test]
async fn rolling_limit_frees_a_slot_when_the_oldest_leaves() {
    let (_up, p) = setup().await;
    assert_eq!(
        call("GET", &p.url("/v1/status/1"), Some("pro-1"))
            .await
            .status,
        200
    );
    p.advance_secs(4);
    assert_eq!(
        call("GET", &p.url("/v1/status/2"), Some("pro-1"))
            .await
            .status,
        200
    );
    let r = call("GET", &p.url("/v1/status/3"), Some("pro-1")).await;
    assert_eq!((r.status, r.h("x-ratelimit-remaining")), (200, "0"));
    // Oldest admitted at T0+10 leaves at T0+21 (one-second grain): reset there.
    assert_eq!(r.h("x-ratelimit-reset"), (T0 + 21).to_string());
    let r = call("GET", &p.url("/v1/status/4"), Some("pro-1")).await;
    assert_eq!(
        (r.status, r.h("retry-after"), r.h("x-ratelimit-type")),
        (429, "7", "polls")
    );
    p.advance_secs(7);
    assert_eq!(
        call("GET", &p.url("/v1/status/5"), Some("pro-1"))
            .await
            .status,
        200
    );
    assert_eq!(
        call("GET", &p.url("/v1/status/6"), Some("pro-1"))
            .await
            .status,
        429
    );
}

#[tokio::test]
async fn concurrent_requests_on_one_key_admit_exactly_n() {
    let up = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"
[[routes]]
name = "gen"
path = "/v1/gen"
[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 37
window = "1m"
"#;
    let p = Proxy::start(config, &up).await;
    let url = p.url("/v1/gen");
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { call("POST", &url, Some("same-key")).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let counts = tally(statuses);
    assert_eq!(counts.get(&200), Some(&37), "{counts:?}");
    assert_eq!(counts.get(&429), Some(&463), "{counts:?}");
    assert_eq!(up.hits(), 37);
}

#[tokio::test]
async fn pinned_primary_relative_reset_and_ietf_fields() {
    let up = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"
[headers]
prefix = "X-Rate"
reset = "seconds"
ietf = true
primary = "minute"
[[routes]]
name = "gen"
path = "/v1/gen"
[[routes]]
name = "free"
path = "/v1/free"
[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 3
window = "1m"
routes = ["gen"]
[[plans.free.limits]]
name = "daily"
requests = 2
window = "1d"
routes = ["gen"]
"#;
    let p = Proxy::start(config, &up).await;
    let r = call("GET", &p.url("/v1/gen"), Some("k")).await;
    // Pinned: the trio shows the minute limit although daily has less left.
    assert_eq!(
        (
            r.h("x-rate-limit"),
            r.h("x-rate-remaining"),
            r.h("x-rate-reset")
        ),
        ("3", "2", "50")
    );
    assert_eq!(
        r.h("ratelimit-policy"),
        "\"minute\";q=3;w=60, \"daily\";q=2;w=86400"
    );
    assert_eq!(r.h("ratelimit"), "\"minute\";r=2;t=50");
    assert!(r.header("x-ratelimit-limit").is_none());
    call("GET", &p.url("/v1/gen"), Some("k")).await;
    let r = call("GET", &p.url("/v1/gen"), Some("k")).await;
    assert_eq!(r.status, 429);
    // Daily refused: Type names it, the trio stays on the minute figures.
    assert_eq!(
        (
            r.h("x-rate-type"),
            r.h("x-rate-limit"),
            r.h("x-rate-remaining")
        ),
        ("daily", "3", "1")
    );
    assert_eq!(r.h("retry-after"), (MIDNIGHT - T0 - 10).to_string());
    // Routes no limit covers carry no rate-limit headers.
    let r = call("GET", &p.url("/v1/free"), Some("k")).await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-rate") && !k.as_str().starts_with("ratelimit")),
        "{:?}",
        r.headers
    );
}

#[tokio::test]
async fn templates_replace_bodies_globally_and_per_route() {
    let up = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"
[responses.rate_limited]
body = '{"message":"Too Many Attempts.","wait":{retry_after},"limit":"{name}","route":"{route}","plan":"{plan}","window":"{window}"}'
[[routes]]
name = "gen"
path = "/v1/gen"
[[routes]]
name = "mcp"
path = "/mcp"
[routes.responses.rate_limited]
status = 200
content_type = "text/plain"
body = "slow down, {count}/{limit}, reset {reset_at}"
[routes.responses.unauthorized]
body = '{"why":"no key"}'
[plans.basic]
[[plans.basic.limits]]
name = "minute"
requests = 1
window = "1m"
"#;
    let p = Proxy::start(config, &up).await;
    call("GET", &p.url("/v1/gen"), Some("k")).await;
    let r = call("GET", &p.url("/v1/gen"), Some("k")).await;
    assert_eq!(
        (r.status, r.h("content-type"), r.h("retry-after")),
        (429, "application/json", "50")
    );
    assert_eq!(
        r.body,
        r#"{"message":"Too Many Attempts.","wait":50,"limit":"minute","route":"gen","plan":"basic","window":"1m"}"#
    );
    call("GET", &p.url("/mcp"), Some("k")).await;
    let r = call("GET", &p.url("/mcp"), Some("k")).await;
    assert_eq!((r.status, r.h("content-type")), (200, "text/plain"));
    assert_eq!(r.body, "slow down, 1/1, reset 2026-05-05T16:01:00Z");
    assert_eq!(r.h("x-ratelimit-type"), "minute");
    let r = call("GET", &p.url("/mcp"), None).await;
    assert_eq!(
        (r.status, r.body.as_str(), r.h("www-authenticate")),
        (401, r#"{"why":"no key"}"#, "Bearer")
    );
}

#[tokio::test]
async fn a_shadow_limit_counts_and_reports_but_never_refuses() {
    let up = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"

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

[[plans.free.limits]]
name = "trial-daily"
requests = 2
window = "1d"
shadow = true
"#;
    let p = Proxy::start(config, &up).await;
    let mut last = None;
    for _ in 0..5 {
        let got = call("GET", &p.url("/gen"), Some("k")).await;
        assert_eq!(got.status, 200, "a shadow limit never refuses");
        last = Some(got);
    }
    let last = last.unwrap();
    // Reported as usual: it is the limit with the least left.
    assert_eq!(
        (last.h("x-ratelimit-limit"), last.h("x-ratelimit-remaining")),
        ("2", "0")
    );
    assert!(last.header("x-ratelimit-type").is_none());
    assert_eq!(up.hits(), 5);
    let usage = call("GET", &p.admin_url("/v1/usage?key=k"), None)
        .await
        .json();
    let trial = counter_named(&usage, "trial-daily");
    assert_eq!(trial["used"], 5, "counted past its figure: {usage}");
    let metrics = call("GET", &p.admin_url("/metrics"), None).await.body;
    assert!(
        metrics.contains("turnstile_shadow_refusals_total{limit=\"trial-daily\"} 3"),
        "{metrics}"
    );
    // A real limit still refuses, and names itself, not the shadow.
    let config_tight = config.replace("requests = 100", "requests = 6");
    let q = Proxy::start(&config_tight, &up).await;
    for _ in 0..6 {
        assert_eq!(call("GET", &q.url("/gen"), Some("k")).await.status, 200);
    }
    let refused = call("GET", &q.url("/gen"), Some("k")).await;
    assert_eq!(
        (refused.status, refused.h("x-ratelimit-type")),
        (429, "minute")
    );
}
