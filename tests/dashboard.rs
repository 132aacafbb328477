//! The admin dashboard (SPEC §16) in a real browser: headless Chromium
//! loads `GET /` from the running binary, its script polls
//! `/v1/dashboard`, and the rendered DOM shows a route's live counts, a
//! capacity pool's slots and waiters, and the most refused key. Needs `chromium` (installed by `.ci/run`).

mod support;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"

[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"

[admin]
listen = "127.0.0.1:{admin_port}"
token = "s3cret"

[[routes]]
name = "gen"
path = "/gen"

[[routes]]
name = "hold"
path = "/hold"

[[capacity]]
name = "gpu"
max = 1
routes = ["hold"]

[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 3
window = "1m"
"#;

const KEYS: &str = "[[keys]]\nkey = \"key-a\"\naccount = \"acme\"\nplan = \"free\"\n\n[[keys]]\nkey = \"key-b\"\nplan = \"free\"\n";

/// What headless Chromium renders at `url` after its scripts ran (up to
/// `virtual_ms` of page time).
fn rendered(url: &str, virtual_ms: u32) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--virtual-time-budget={virtual_ms}"),
            "--dump-dom",
            url,
        ])
        .output()
        .expect("chromium must be installed (apt-get install chromium; .ci/run does)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_page_shows_live_counts_and_the_most_refused_key() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    let b = Binary::start(dir.path(), CONFIG, &up).await;
    b.wait_admin().await;
    // key-a: 3 admitted, 4 refused (429); key-b: 1 admitted.
    for _ in 0..7 {
        call("GET", &b.url("/gen"), Some("key-a")).await;
    }
    assert_eq!(call("GET", &b.url("/gen"), Some("key-b")).await.status, 200);
    assert_eq!(up.hits(), 4);
    // The GPU pool: one slot held (the upstream holds the answer), one waiting.
    let (held, waiting) = (b.url("/hold"), b.url("/hold"));
    let held = tokio::spawn(async move { call("GET", &held, Some("key-b")).await });
    eventually("the slot taken", || up.hits() == 5).await;
    let waiting = tokio::spawn(async move { call("GET", &waiting, Some("key-b")).await });

    // The page itself is static and open; its data needs the token, here
    // given in the fragment (never sent to the server).
    let page = send(
        req("GET", &b.admin("/"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(page.status, 200);
    assert!(page.h("content-type").starts_with("text/html"));
    // No external assets: nothing loaded from an absolute URL (the SVG
    // namespace name is an identifier, never fetched).
    let body = page.body.replace("\"http://www.w3.org/2000/svg\"", "");
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "no external assets"
    );

    let dom = rendered(&format!("{}#token=s3cret", b.admin("/")), 5_000);
    let row = dom
        .split("<tr data-route=\"gen\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no row for route gen in {dom}"));
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains("data-total=\"forwarded\">4<"), "{row}");
    assert!(row.contains("data-total=\"refused\">4<"), "{row}");
    assert!(row.contains("rate_limited 4"), "{row}");
    let pool = dom
        .split("<tr data-pool=\"gpu\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no row for pool gpu in {dom}"));
    let pool = &pool[..pool.find("</tr>").unwrap()];
    assert!(pool.contains("data-in-use=\"1\">1 / 1<"), "{pool}");
    assert!(pool.contains("free 1"), "{pool}");
    up.release(2);
    assert_eq!(held.await.unwrap().status, 200);
    assert_eq!(waiting.await.unwrap().status, 200);
    // key-a's fingerprint leads the most refused keys, acme the accounts.
    let usage = send(
        req("GET", &b.admin("/v1/usage?key=key-a"))
            .header("authorization", "Bearer s3cret")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .json();
    let fp = usage["key"].as_str().unwrap();
    assert!(
        dom.contains(&format!("<tr data-key=\"{fp}\">")),
        "{fp} not in {dom}"
    );
    assert!(dom.contains("<tr data-account=\"acme\">"), "{dom}");

    // Without the token the page asks for it and shows no data.
    let dom = rendered(&b.admin("/"), 3_000);
    assert!(dom.contains("admin token required"), "{dom}");
    assert!(!dom.contains("<tr data-route="), "{dom}");
}

#[tokio::test]
async fn usage_by_fingerprint() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    let b = Binary::start(dir.path(), CONFIG, &up).await;
    b.wait_admin().await;
    call("GET", &b.url("/gen"), Some("key-b")).await;
    let get = |path: String| {
        send(
            req("GET", &b.admin(&path))
                .header("authorization", "Bearer s3cret")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    };
    let by_key = get("/v1/usage?key=key-b".into()).await.json();
    let fp = by_key["key"].as_str().unwrap().to_owned();
    let by_fp = get(format!("/v1/usage?fingerprint={fp}")).await;
    assert_eq!(by_fp.status, 200);
    assert_eq!(by_fp.json(), by_key);
    assert_eq!(by_fp.json()["counters"][0]["used"], 1);
    let missing = get("/v1/usage?fingerprint=00000000".into()).await;
    assert_eq!(missing.status, 404, "{}", missing.body);
}

/// The series a chart drew, from its `data-series` attribute in the DOM.
fn chart(dom: &str, id: &str) -> serde_json::Value {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no chart {id} in {dom}"));
    let div = &dom[dom[..at].rfind('<').unwrap()..];
    let div = &div[..div.find('>').unwrap()];
    let attr = div
        .split("data-series=\"")
        .nth(1)
        .unwrap_or_else(|| panic!("{id} drew nothing: {div}"));
    let json = attr[..attr.find('"').unwrap()]
        .replace("&quot;", "\"")
        .replace("&amp;", "&");
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

fn sum(series: &serde_json::Value) -> f64 {
    series
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum()
}

#[tokio::test]
async fn the_charts_draw_the_traffic_just_sent() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    let b = Binary::start(dir.path(), CONFIG, &up).await;
    b.wait_admin().await;
    // The history's first point is noted by a background task at start.
    let dashboard = || async {
        send(
            req("GET", &b.admin("/v1/dashboard"))
                .header("authorization", "Bearer s3cret")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .json()
    };
    for _ in 0..100 {
        if !dashboard().await["history"]["times"]
            .as_array()
            .unwrap()
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // 3 forwarded and 4 refused for key-a.
    for _ in 0..7 {
        call("GET", &b.url("/gen"), Some("key-a")).await;
    }
    let data = dashboard().await;
    assert!(sum(&data["history"]["forwarded"]["gen"]) > 0.0, "{data}");

    let dom = rendered(&format!("{}#token=s3cret", b.admin("/")), 5_000);
    let forwarded = chart(&dom, "chart-forwarded");
    assert!(sum(&forwarded["gen"]) > 0.0, "{forwarded}");
    let refused = chart(&dom, "chart-refused");
    assert!(sum(&refused["gen"]) > 0.0, "{refused}");
    let reasons = chart(&dom, "chart-reasons");
    assert!(sum(&reasons["rate_limited"]) > 0.0, "{reasons}");
    // Refusals were a larger share than forwards (4 to 3) in every
    // interval that saw traffic.
    assert!(
        sum(&refused["gen"]) > sum(&forwarded["gen"]),
        "{refused} {forwarded}"
    );
    // No jobs or credits in this config: those charts stay hidden.
    assert!(dom.contains("id=\"chart-jobs\" hidden"), "{dom}");
}

#[tokio::test]
async fn the_page_shows_the_latest_ledger_events_and_each_sinks_backlog() {
    let config = CONFIG
        .replace(
            "[[routes]]\nname = \"gen\"",
            "[ledger]\npath = \"ledger.db\"\n\n[[ledger.sinks]]\nname = \"billing-file\"\nkind = \"file\"\npath = \"events.jsonl\"\n\n[[routes]]\nname = \"gen\"\ncost = 5",
        )
        .replace(
            "requests = 3\nwindow = \"1m\"",
            "requests = 3\nwindow = \"1m\"\n\n[[plans.free.limits]]\nname = \"credits\"\nkind = \"credits\"\nroutes = [\"gen\"]\nper = \"account\"\ngrant = 100",
        );
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    let b = Binary::start(dir.path(), &config, &up).await;
    b.wait_admin().await;
    for _ in 0..2 {
        assert_eq!(call("GET", &b.url("/gen"), Some("key-a")).await.status, 200);
    }
    eventually("both events in the file", || {
        std::fs::read_to_string(dir.path().join("events.jsonl"))
            .is_ok_and(|t| t.lines().count() == 2)
    })
    .await;
    let dom = rendered(&format!("{}#token=s3cret", b.admin("/")), 5_000);
    let sink = dom
        .split("<tr data-sink=\"billing-file\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no row for the sink in {dom}"));
    let sink = &sink[..sink.find("</tr>").unwrap()];
    assert!(sink.contains("data-backlog=\"0\""), "{sink}");
    let events: Vec<&str> = dom.split("<tr data-event=").skip(1).collect();
    assert_eq!(events.len(), 2, "{dom}");
    let newest = &events[0][..events[0].find("</tr>").unwrap()];
    assert!(
        newest.contains("credits.charged") && newest.contains("acme"),
        "{newest}"
    );
    assert!(
        newest.contains(">90<"),
        "the balance after the second charge: {newest}"
    );
}
