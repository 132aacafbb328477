//! SPEC §1 steps 1, 4, 6 and 7 on the wire: routing, body size, and what
//! crosses the proxy in each direction.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

const CONFIG: &str = r#"
[server]
unmatched = "reject"

[upstream]
url = "{upstream}"

[[routes]]
name = "public"
path = "/public/*"
auth = false

[[routes]]
name = "tenant"
path = "/v1/x"
host = "api.example.com"

[[routes]]
name = "quick"
path = "/slow"
timeout = "200ms"

[[routes]]
name = "any"
path = "/*"
max_body = 10

[plans.p]
[[plans.p.limits]]
name = "minute"
requests = 100
window = "1m"
"#;

async fn setup() -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    (up, p)
}

#[tokio::test]
async fn unmatched_requests_are_rejected_or_forwarded_as_configured() {
    let (up, p) = setup().await;
    let r = call("GET", &p.url("/"), Some("k")).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.body,
        r#"{"error":"not_found","message":"no route for GET /"}"#
    );
    assert_eq!(up.hits(), 0);

    let p2 = Proxy::start(
        &CONFIG.replace("unmatched = \"reject\"", "unmatched = \"forward\""),
        &up,
    )
    .await;
    let r = call("GET", &p2.url("/"), None).await;
    assert_eq!(r.status, 200, "forwarded without a key");
    assert!(r.header("x-ratelimit-limit").is_none());
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn public_routes_need_no_key_and_have_no_limits() {
    let (up, p) = setup().await;
    let r = call("GET", &p.url("/public/logo.png"), None).await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-ratelimit-limit").is_none());
    assert!(up.last().headers.get("x-turnstile-account").is_none());
}

#[tokio::test]
async fn host_routes_ignore_the_port_and_first_match_wins() {
    let (_up, p) = setup().await;
    // "tenant" (no max_body) matches with the right host; otherwise "any" (max_body 10).
    let big = "x".repeat(20);
    let send_host = |host: &'static str| {
        let url = p.url("/v1/x");
        let big = big.clone();
        async move {
            send(
                req("POST", &url)
                    .header("host", host)
                    .header("authorization", "Bearer k")
                    .body(Full::new(Bytes::from(big)))
                    .unwrap(),
            )
            .await
        }
    };
    assert_eq!(send_host("api.example.com:8443").await.status, 200);
    assert_eq!(send_host("other.example.com").await.status, 413);
}

#[tokio::test]
async fn content_length_over_the_limit_is_413_before_the_body_is_read() {
    let (up, p) = setup().await;
    let r = send(
        req("POST", &p.url("/upload"))
            .header("authorization", "Bearer k")
            .body(Full::new(Bytes::from_static(b"01234567890")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.body,
        r#"{"error":"payload_too_large","message":"body exceeds 10 bytes on route any","limit_bytes":10}"#
    );
    assert_eq!(up.hits(), 0);
    // Refused by size: no quota consumed.
    let r = call("POST", &p.url("/upload"), Some("k")).await;
    assert_eq!(r.h("x-ratelimit-remaining"), "99");
}

#[tokio::test]
async fn a_chunked_body_growing_past_the_limit_never_reaches_the_upstream_whole() {
    let (up, p) = setup().await;
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..5)
        .map(|_| Ok(Frame::data(Bytes::from_static(b"12345"))))
        .collect();
    let body = StreamBody::new(tokio_stream::iter(chunks));
    let client: Client<HttpConnector, _> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let request = req("POST", &p.url("/upload"))
        .header("authorization", "Bearer k")
        .body(body)
        .unwrap();
    let resp = client.request(request).await.unwrap();
    assert_eq!(resp.status(), 413);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("payload_too_large"));
    assert!(
        up.seen().is_empty(),
        "the upstream must not receive a complete over-limit request"
    );
    // The refused request consumed no quota.
    let r = call("POST", &p.url("/upload"), Some("k")).await;
    assert_eq!(r.h("x-ratelimit-remaining"), "99");
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let (up, p) = setup().await;
    let r = send(
        req("GET", &p.url("/hop"))
            .header("authorization", "Bearer k")
            .header("connection", "x-private, keep-alive")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-authorization", "Basic abc")
            .header("x-normal", "kept")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    let seen = up.last();
    for h in [
        "x-private",
        "keep-alive",
        "te",
        "proxy-authorization",
        "connection",
    ] {
        assert!(seen.headers.get(h).is_none(), "{h} reached the upstream");
    }
    assert_eq!(seen.headers["x-normal"], "kept");
    assert_eq!(r.status, 200);
    assert!(r.header("x-secret").is_none() && r.header("keep-alive").is_none());
    assert_eq!(r.h("x-kept"), "yes");
}

#[tokio::test]
async fn forwarded_headers_replace_or_append_by_trust() {
    let (up, p) = setup().await;
    let spoof = |url: String| async move {
        send(
            req("GET", &url)
                .header("authorization", "Bearer k")
                .header("x-forwarded-for", "6.6.6.6")
                .header("x-forwarded-proto", "https")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    };
    spoof(p.url("/a")).await;
    let seen = up.last();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], p.addr.to_string());
    assert_eq!(
        seen.headers["host"],
        p.addr.to_string(),
        "preserve_host keeps the client's Host"
    );

    let trusting = CONFIG
        .replace("[server]", "[server]\ntrust_forwarded = true")
        .replace(
            "url = \"{upstream}\"",
            "url = \"{upstream}\"\npreserve_host = false",
        );
    let p2 = Proxy::start(&trusting, &up).await;
    spoof(p2.url("/a")).await;
    let seen = up.last();
    assert_eq!(seen.headers["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["host"], up.addr.to_string());
}

#[tokio::test]
async fn an_absolute_form_target_never_chooses_the_destination() {
    let (up, p) = setup().await;
    let out = raw(p.addr, b"GET http://169.254.169.254/latest?x=1 HTTP/1.1\r\nHost: 169.254.169.254\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n", Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(up.last().uri, "/latest?x=1");
}

#[tokio::test]
async fn upstream_errors_pass_through_with_rate_headers() {
    let (_up, p) = setup().await;
    let r = call("GET", &p.url("/status/503"), Some("k")).await;
    assert_eq!(
        (r.status, r.body.as_str(), r.h("x-upstream")),
        (503, r#"{"upstream_status":503}"#, "yes")
    );
    assert_eq!(r.h("x-ratelimit-remaining"), "99");
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_slow_upstream_is_504() {
    let (_up, p) = setup().await;
    let r = call("GET", &p.url("/slow"), Some("k")).await;
    assert_eq!(r.status, 504);
    assert_eq!(
        r.body,
        r#"{"error":"upstream_timeout","message":"upstream did not answer within 0.2 s"}"#
    );

    let dead = Upstream::dead().await;
    let p2 = Proxy::start(CONFIG, &dead).await;
    let r = call("GET", &p2.url("/a"), Some("k")).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        r.body,
        r#"{"error":"bad_gateway","message":"upstream connection refused"}"#
    );
}

#[tokio::test]
async fn server_sent_events_stream_chunk_by_chunk() {
    let (up, p) = setup().await;
    let client: Client<HttpConnector, Full<Bytes>> = client();
    let resp = client
        .request(
            req("GET", &p.url("/sse"))
                .header("authorization", "Bearer k")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    // The second event does not exist yet: the first one arrived on its own.
    assert_eq!(&first[..], b"data: one\n\n");
    up.sse_next();
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&second[..], b"data: two\n\n");
}

#[tokio::test]
async fn http2_cleartext_clients_are_served() {
    let (up, p) = setup().await;
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let resp = client
        .request(
            req("GET", &p.url("/h2"))
                .header("authorization", "Bearer k")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-ratelimit-limit"], "100");
    assert_eq!(up.last().uri, "/h2");
    assert_eq!(up.last().headers["host"], p.addr.to_string());
}

/// Every exchange has one id: the client's `X-Request-Id` when it is 1–128
/// visible ASCII characters in one header, else one made by turnstile; the
/// upstream gets exactly that id and the client gets it back, refusals
/// included.
#[tokio::test]
async fn each_exchange_carries_one_request_id_both_ways() {
    let (up, p) = setup().await;
    let with = |ids: &[&str]| {
        let mut r = req("GET", &p.url("/anything")).header("x-api-key", "k");
        for id in ids {
            r = r.header("x-request-id", *id);
        }
        r.body(Full::new(Bytes::new())).unwrap()
    };
    // A usable id is kept, both ways.
    let got = send(with(&["req-42.a_b"])).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.h("x-request-id"), "req-42.a_b");
    let seen = up.last().headers;
    let sent: Vec<_> = seen.get_all("x-request-id").iter().collect();
    assert_eq!(sent, ["req-42.a_b"]);
    // None, or one that is not usable: a new one, the same both ways, and
    // the client's never reaches the upstream.
    let long = "a".repeat(129);
    for ids in [
        &[][..],
        &["has space"][..],
        &[""][..],
        &[long.as_str()][..],
        &["one", "two"][..],
    ] {
        let got = send(with(ids)).await;
        assert_eq!(got.status, 200, "{ids:?}");
        let made = got.h("x-request-id").to_owned();
        assert_eq!(made.len(), 32, "{ids:?}: {made}");
        assert!(made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
        let seen = up.last().headers;
        let sent: Vec<_> = seen.get_all("x-request-id").iter().collect();
        assert_eq!(sent, [made.as_str()], "{ids:?}");
    }
    let a = call("GET", &p.url("/anything"), Some("k")).await;
    let b = call("GET", &p.url("/anything"), Some("k")).await;
    assert_ne!(a.h("x-request-id"), b.h("x-request-id"));
    // Answers turnstile makes itself carry it too.
    let refused = send(
        req("GET", &p.url("/"))
            .header("x-request-id", "refused-1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, 404);
    assert_eq!(refused.h("x-request-id"), "refused-1");
    let longest = "b".repeat(128);
    let got = send(with(&[&longest])).await;
    assert_eq!(got.h("x-request-id"), longest);
}

/// On HTTP/1.1 the name is spelled `X-Request-Id`, whoever made the answer.
#[tokio::test]
async fn the_request_id_header_is_spelled_as_published() {
    let (_up, p) = setup().await;
    let raw_answer = raw(
        p.addr,
        b"GET /anything HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw_answer.contains("\r\nX-Request-Id: "), "{raw_answer}");
}
