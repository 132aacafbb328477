//! Bad input gets a clear 4xx or a closed connection, and the proxy keeps serving.

mod support;

use std::time::Duration;

use support::*;

const CONFIG: &str = r#"
[server]
header_timeout = "300ms"
[upstream]
url = "{upstream}"
[[routes]]
name = "gen"
path = "/gen"
[plans.p]
[[plans.p.limits]]
name = "minute"
requests = 1000
window = "1m"
"#;

async fn still_serving(p: &Proxy) {
    let r = call("GET", &p.url("/gen"), Some("k")).await;
    assert_eq!(r.status, 200, "the proxy stopped serving");
}

#[tokio::test]
async fn garbage_on_the_socket_gets_400_and_the_proxy_keeps_serving() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let out = raw(
        p.addr,
        b"\x00\x01\x02 hello there\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out:?}");
    let out = raw(
        p.addr,
        b"GET /gen HTTP/1.1\r\nHost: x\r\nX-Bad\x01: y\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    let out = raw(
        p.addr,
        b"GET /gen HTTP/9.9\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        out.is_empty() || out.starts_with("HTTP/1.1 4") || out.starts_with("HTTP/1.1 505"),
        "{out:?}"
    );
    assert_eq!(up.hits(), 0);
    still_serving(&p).await;
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let big = format!(
        "GET /gen HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let out = raw(p.addr, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        out.is_empty() || out.starts_with("HTTP/1.1 431"),
        "{:?}",
        &out[..out.len().min(200)]
    );
    assert_eq!(up.hits(), 0);
    still_serving(&p).await;
}

#[tokio::test]
async fn invalid_key_bytes_are_a_malformed_key() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let out = raw(
        p.addr,
        b"GET /gen HTTP/1.1\r\nHost: x\r\nX-Api-Key: caf\xc3\xa9 key\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 401"), "{out:?}");
    assert!(
        out.contains("malformed API key in the x-api-key header"),
        "{out:?}"
    );
    still_serving(&p).await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    // header_timeout is 300 ms; the connection must be closed well before 5 s.
    let started = std::time::Instant::now();
    let out = raw(
        p.addr,
        b"GET /gen HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "connection held open"
    );
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "{out:?}");
    still_serving(&p).await;
}
