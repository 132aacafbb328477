//! Several upstreams: `[upstreams.NAME]` and a route's `upstream`, each
//! with its own connection pool, base path, timeout and headers; an
//! unknown name is a config error at file:line:col.

mod support;

use std::time::Duration;

use support::*;

const CONFIG: &str = r#"
[upstream]
url = "{upstream}"

[upstreams.video]
url = "{video}/v2"
timeout = "1s"
preserve_host = false
account_header = "x-video-account"

[identity]
sources = ["bearer"]
keys_file = "keys.toml"

[[routes]]
name = "images"
path = "/images"

[[routes]]
name = "videos"
path = "/videos/*"
upstream = "video"

[[routes]]
name = "slow-video"
path = "/slow-video"
upstream = "video"

[plans.free]
limits = [{ name = "all", requests = 3, window = "1m" }]
"#;

const KEYS: &str = "[[keys]]\nkey = \"k1\"\nplan = \"free\"\naccount = \"acme\"\n";

#[tokio::test]
async fn each_route_reaches_its_own_upstream_with_its_settings() {
    let images = Upstream::start().await;
    let video = Upstream::start().await;
    let config = CONFIG.replace("{video}", &video.url());
    let p = Proxy::start_with(&config, &images, &[("keys.toml", KEYS)]).await;

    let r = call("GET", &p.url("/images"), Some("k1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(images.hits(), 1);
    assert_eq!(video.hits(), 0);
    assert_eq!(images.last().headers["x-turnstile-account"], "acme");

    let r = call("POST", &p.url("/videos/abc?q=1"), Some("k1")).await;
    assert_eq!(r.status, 200);
    assert_eq!((images.hits(), video.hits()), (1, 1));
    let seen = video.last();
    // The named upstream's base path, Host and account header.
    assert_eq!(seen.uri, "/v2/videos/abc?q=1");
    assert_eq!(seen.headers["host"], video.addr.to_string().as_str());
    assert_eq!(seen.headers["x-video-account"], "acme");
    assert!(seen.headers.get("x-turnstile-account").is_none());

    // The limits count across both upstreams: they are the caller's.
    let r = call("GET", &p.url("/images"), Some("k1")).await;
    assert_eq!(r.status, 200);
    let r = call("POST", &p.url("/videos/x"), Some("k1")).await;
    assert_eq!(r.status, 429);
    assert_eq!((images.hits(), video.hits()), (2, 1));
}

#[tokio::test]
async fn a_named_upstreams_timeout_and_failures_are_its_own() {
    let images = Upstream::start().await;
    let video = Upstream::start().await;
    let config = CONFIG.replace("{video}/v2", &video.url());
    let p = Proxy::start_with(&config, &images, &[("keys.toml", KEYS)]).await;
    // `/slow…` answers after 5 s: the video upstream's 1 s timeout applies.
    let started = std::time::Instant::now();
    let r = call("GET", &p.url("/slow-video"), Some("k1")).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(4));

    // A dead named upstream: 502 on its routes, the others still served.
    let dead = Upstream::dead().await;
    let config = CONFIG.replace("{video}", &dead.url());
    let p = Proxy::start_with(&config, &images, &[("keys.toml", KEYS)]).await;
    assert_eq!(
        call("GET", &p.url("/videos/a"), Some("k1")).await.status,
        502
    );
    assert_eq!(call("GET", &p.url("/images"), Some("k1")).await.status, 200);
}

#[test]
fn an_unknown_upstream_name_is_a_config_error_at_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    let config = CONFIG
        .replace("{upstream}", "http://127.0.0.1:9")
        .replace("{video}", "http://127.0.0.1:9")
        .replace(
            "upstream = \"video\"\n\n[[routes]]",
            "upstream = \"vidoe\"\n\n[[routes]]",
        );
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    std::fs::write(&path, config).unwrap();
    let e = turnstile::load(&path).unwrap_err().to_string();
    assert!(e.contains("t.toml:22:12"), "{e}");
    // `turnstile check` shows which routes go where.
    std::fs::write(
        &path,
        CONFIG
            .replace("{upstream}", "http://127.0.0.1:9")
            .replace("{video}", "http://127.0.0.1:8"),
    )
    .unwrap();
    let table = turnstile::load(&path).unwrap().table();
    assert!(
        table.contains("upstream video (127.0.0.1:8): videos, slow-video"),
        "{table}"
    );
    assert!(
        e.contains("unknown upstream \"vidoe\": upstreams are video"),
        "{e}"
    );

    // A named upstream is checked like [upstream].
    let config = CONFIG
        .replace("{upstream}", "http://127.0.0.1:9")
        .replace("{video}", "https://127.0.0.1:9");
    std::fs::write(&path, config).unwrap();
    let e = turnstile::load(&path).unwrap_err().to_string();
    assert!(
        e.contains("t.toml:6:7") && e.contains("only http://"),
        "{e}"
    );
}
