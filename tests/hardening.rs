//! Ways around a limit, and ways to tie the proxy up, tried from outside:
//! every spelling of a limited path is counted or refused, never forwarded
//! uncounted; framing and credential tricks are refused; slow and silent
//! clients are cut off; memory and logs stay bounded.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = r#"
[server]
header_timeout = "400ms"
idle_timeout = "400ms"
body_timeout = "300ms"
max_buffered = "1KB"

[upstream]
url = "{upstream}"

[identity]
unknown_key = "default"
default_plan = "free"

[[routes]]
name = "generate"
method = "POST"
path = "/v1/images/generations"

[[routes]]
name = "media"
method = "POST"
path = "/mcp"
mcp_tool = "generate_media"

[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 3
window = "1m"
"#;

/// Sends one request as raw bytes; returns the status code and the response text.
async fn raw_request(p: &Proxy, head: &str) -> (u16, String) {
    let out = raw(p.addr, head.as_bytes(), Duration::from_secs(5)).await;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, out)
}

fn post(path: &str, key: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Counted as the `generate` route; the upstream receives this target.
    Counted(&'static str),
    /// Refused with this status; nothing reaches the upstream.
    Refused(u16),
}

#[tokio::test]
async fn every_spelling_of_a_limited_path_is_counted_or_refused() {
    use Expect::*;
    let table: &[(&str, Expect)] = &[
        ("/v1/images/generations", Counted("/v1/images/generations")),
        (
            "/v1/images/generations/",
            Counted("/v1/images/generations/"),
        ),
        ("//v1/images/generations", Counted("/v1/images/generations")),
        ("/v1/images//generations", Counted("/v1/images/generations")),
        (
            "/v1/./images/generations",
            Counted("/v1/images/generations"),
        ),
        (
            "/v1/x/../images/generations",
            Counted("/v1/images/generations"),
        ),
        ("/v1/Images/Generations", Counted("/v1/Images/Generations")),
        (
            "/V1/IMAGES/GENERATIONS/",
            Counted("/V1/IMAGES/GENERATIONS/"),
        ),
        (
            "/v1/images/gen%65rations",
            Counted("/v1/images/generations"),
        ),
        (
            "/%761/images/generations",
            Counted("/v1/images/generations"),
        ),
        (
            "/v1/images/%67%65%6e%65rations",
            Counted("/v1/images/generations"),
        ),
        (
            "/v1/%2e/images/generations",
            Counted("/v1/images/generations"),
        ),
        (
            "/v1/x/%2e%2e/images/generations",
            Counted("/v1/images/generations"),
        ),
        (
            "/v1/x/%2E%2e/images/generations",
            Counted("/v1/images/generations"),
        ),
        (
            "/v1/images/generations;x=1",
            Counted("/v1/images/generations;x=1"),
        ),
        (
            "/v1;a=b/images/generations",
            Counted("/v1;a=b/images/generations"),
        ),
        (
            "/v1/images/x/..;/generations",
            Counted("/v1/images/generations"),
        ),
        (
            "/v1/images/generations?x=1",
            Counted("/v1/images/generations?x=1"),
        ),
        (
            "/v1/images/generations/.",
            Counted("/v1/images/generations/"),
        ),
        (
            "http://x/v1/images//generations",
            Counted("/v1/images/generations"),
        ),
        ("/v1/images%2Fgenerations", Refused(400)),
        ("/v1/images%2fgenerations", Refused(400)),
        ("/v1%5Cimages%5Cgenerations", Refused(400)),
        ("/v1\\images\\generations", Refused(400)),
        ("/v1/images/generations%00", Refused(400)),
        ("/v1/images/generations%0d%0a", Refused(400)),
        ("/v1/images/generations%20", Refused(400)),
        ("/%20v1/images/generations", Refused(400)),
        ("/v1/images/generation%C0%B3", Refused(400)),
        ("/v1/images/generations%C0%AF", Refused(400)),
        ("/v1/images/%zzgenerations", Refused(400)),
        ("/../v1/images/generations", Refused(400)),
        ("/v1/%2e%2e/%2e%2e/v1/images/generations", Refused(400)),
        ("*", Refused(400)),
    ];
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    for (i, (target, expect)) in table.iter().enumerate() {
        let key = format!("key-{i}");
        let before = up.seen().len();
        let (status, out) = raw_request(&p, &post(target, &key)).await;
        match expect {
            Counted(want) => {
                assert_eq!(status, 200, "{target}: {out}");
                assert!(
                    out.to_ascii_lowercase()
                        .contains("x-ratelimit-remaining: 2"),
                    "{target} was not counted as the route: {out}"
                );
                let seen = up.seen();
                assert_eq!(seen.len(), before + 1, "{target}");
                assert_eq!(
                    seen[before].uri, *want,
                    "{target}: what the upstream received"
                );
                // Without a key it is the route too: 401, nothing forwarded.
                let (status, out) = raw_request(
                    &p,
                    &format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                )
                .await;
                assert_eq!(status, 401, "{target} without a key: {out}");
            }
            Refused(code) => {
                assert_eq!(status, *code, "{target}: {out}");
            }
        }
        assert_eq!(
            up.seen().len(),
            before + usize::from(matches!(expect, Counted(_))),
            "{target}: nothing else may reach the upstream"
        );
    }
    // Unlimited spellings were not a way around the count either: the fourth
    // request of one key in a minute is refused whatever the spelling.
    for target in [
        "/v1/images/generations",
        "//v1/images/generations/",
        "/v1/IMAGES/gen%65rations",
    ] {
        let (status, _) = raw_request(&p, &post(target, "one-key")).await;
        assert_eq!(status, 200, "{target}");
    }
    let (status, out) = raw_request(&p, &post("/v1/images/generations;x", "one-key")).await;
    assert_eq!(status, 429, "{out}");
}

#[tokio::test]
async fn connect_head_and_lowercase_methods() {
    let up = Upstream::start().await;
    let config = CONFIG.replace(
        "[[routes]]\nname = \"generate\"",
        "[[routes]]\nname = \"status\"\nmethod = \"GET\"\npath = \"/v1/status\"\n\n[[routes]]\nname = \"generate\"",
    );
    let p = Proxy::start(&config, &up).await;
    let (status, out) = raw_request(
        &p,
        "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405, "{out}");
    assert!(out.contains("method_not_allowed"), "{out}");
    // A GET route matches HEAD: counted (and keyed) like GET.
    let (status, out) = raw_request(
        &p,
        "HEAD /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 401, "{out}");
    let (status, out) = raw_request(
        &p,
        "HEAD /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("x-ratelimit-remaining: 2"),
        "{out}"
    );
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn ambiguous_framing_and_broken_chunked_bodies_are_400_and_cost_nothing() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    // Content-Length beside Transfer-Encoding: hyper frames the request by
    // the chunked encoding (RFC 9112 section 6.3), drops the Content-Length
    // and closes the connection after the answer, so the upstream receives
    // one unambiguous request and nothing can be smuggled behind it.
    let (status, out) = raw_request(
        &p,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cl-te\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        out.matches("HTTP/1.1").count(),
        1,
        "a second request was served: {out}"
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, "abc");
    assert!(seen[0]
        .headers
        .get("content-length")
        .is_none_or(|v| v == "3"));
    assert!(!seen.iter().any(|s| s.uri.contains("smuggled")));
    let cases = [
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer f\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer f\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer f\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer f\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
    ];
    for case in cases {
        let (status, out) = raw_request(&p, case).await;
        assert_eq!(status, 400, "{case:?}: {out}");
        // Closed after the answer: raw() read to the end of the stream.
        assert!(
            !out.contains("HTTP/1.1 200"),
            "{case:?}: something after the 400 was served: {out}"
        );
    }
    assert_eq!(
        up.seen().len(),
        1,
        "a malformed request reached the upstream whole"
    );
    // None of them consumed quota: the key still has all three.
    for remaining in ["2", "1", "0"] {
        let r = call("POST", &p.url("/v1/images/generations"), Some("f")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.h("x-ratelimit-remaining"), remaining);
    }
}

#[tokio::test]
async fn two_different_credentials_are_refused_one_key_twice_is_not() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let url = p.url("/v1/images/generations");
    for extra in [
        ("x-api-key", "other-key"),
        ("authorization", "Bearer other-key"),
    ] {
        let r = send(
            req("POST", &url)
                .header("authorization", "Bearer my-key")
                .header(extra.0, extra.1)
                .body(Default::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 401, "{extra:?}");
        assert!(r.body.contains("ambiguous credentials"), "{}", r.body);
    }
    let r = send(
        req("POST", &url)
            .header("authorization", "Bearer my-key")
            .header("x-api-key", "my-key")
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn http2_is_held_to_the_http1_header_count() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut b = req("POST", &p.url("/v1/images/generations")).header("authorization", "Bearer h2");
    for i in 0..150 {
        b = b.header(format!("x-filler-{i}"), "v");
    }
    let r = client
        .request(b.body(Default::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(up.seen().len(), 0);
    let r = client
        .request(
            req("POST", &p.url("/v1/images/generations"))
                .header("authorization", "Bearer h2")
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

const MCP_CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"generate_media","arguments":{}}}"#;

#[tokio::test]
async fn a_tool_route_checks_the_key_before_reading_the_body() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    // A keyless request announcing a large body and sending little of it:
    // answered at once, without waiting for (or holding) the body.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900000\r\n\r\n{\"jsonrpc\"")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_millis(250), s.read(&mut buf))
        .await
        .expect("the 401 waited for the body")
        .unwrap();
    let out = String::from_utf8_lossy(&buf[..n]);
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert_eq!(p.app.buffered_bytes(), 0);
    assert_eq!(up.seen().len(), 0);
}

#[tokio::test]
async fn bodies_read_for_a_decision_are_strict_json_uncompressed_and_budgeted() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let url = p.url("/mcp");
    let mcp = |body: &str| {
        req("POST", &url)
            .header("authorization", "Bearer m")
            .header("content-type", "application/json")
            .body(body.to_owned().into())
            .unwrap()
    };
    let dup = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"generate_media","name":"other","arguments":{}}}"#;
    let r = send(mcp(dup)).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("duplicate object key"), "{}", r.body);
    assert!(r.body.contains("-32700"), "{}", r.body);
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"generate_media","arguments":{}1{}}}}}"#,
        "[".repeat(70),
        "]".repeat(70)
    );
    let r = send(mcp(&deep)).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = send(
        req("POST", &url)
            .header("authorization", "Bearer m")
            .header("content-encoding", "gzip")
            .body(MCP_CALL.into())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.body);
    assert!(r.body.contains("unsupported_media_type"), "{}", r.body);
    assert_eq!(up.seen().len(), 0);
    // A good call goes through, byte for byte.
    let r = send(mcp(MCP_CALL)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(up.last().body, MCP_CALL.as_bytes());

    // max_buffered = 1KB: one body of 900 bytes held (its client stalls)...
    let mut held = TcpStream::connect(p.addr).await.unwrap();
    let head = "POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer m\r\nContent-Type: application/json\r\nContent-Length: 2000\r\n\r\n";
    held.write_all(head.as_bytes()).await.unwrap();
    held.write_all(&[b' '; 900]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while p.app.buffered_bytes() < 900 {
        assert!(Instant::now() < deadline, "the held body was not buffered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...so another 200-byte body would cross the budget: 503 at once.
    let padded = format!("{MCP_CALL}{}", " ".repeat(200 - MCP_CALL.len().min(200)));
    let r = send(mcp(&padded)).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("overloaded"), "{}", r.body);
    assert_eq!(r.h("retry-after"), "1");
    // Traffic that holds no body is unaffected.
    let r = call("POST", &p.url("/v1/images/generations"), Some("other")).await;
    assert_eq!(r.status, 200);
    // The stalled body is cut after body_timeout (408), and its budget freed.
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), held.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert_eq!(p.app.buffered_bytes(), 0);
    let r = send(mcp(&padded)).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn a_stalled_streamed_body_gets_408_and_costs_nothing() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer slow\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(2));
    for remaining in ["2", "1", "0"] {
        let r = call("POST", &p.url("/v1/images/generations"), Some("slow")).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.h("x-ratelimit-remaining"),
            remaining,
            "the stalled request was counted"
        );
    }
}

/// Reads until the peer closes; returns whether it did within `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn silent_half_preface_and_idle_connections_are_closed() {
    let up = Upstream::start().await;
    let admin_port = free_port();
    let config = CONFIG.replace(
        "[upstream]",
        &format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n[upstream]"),
    );
    let p = Proxy::start(&config, &up).await;
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    let mut preface = TcpStream::connect(p.addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut admin_silent = TcpStream::connect(admin).await.unwrap();
    let mut keep_alive = TcpStream::connect(p.addr).await.unwrap();
    keep_alive
        .write_all(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ka\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    for (name, s) in [
        ("silent", &mut silent),
        ("half preface", &mut preface),
        ("admin silent", &mut admin_silent),
        ("idle keep-alive", &mut keep_alive),
    ] {
        assert!(
            closed_within(s, Duration::from_secs(3)).await,
            "{name} connection still open"
        );
    }

    // HTTP/2: a connection with no stream open is closed after idle_timeout.
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut send_req, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let r = send_req
        .send_request(
            http::Request::post(format!("http://{}/v1/images/generations", p.addr))
                .header("authorization", "Bearer h2")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    let ended = tokio::time::timeout(Duration::from_secs(3), conn).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection still open");
    still_serving(&p).await;
}

async fn still_serving(p: &Proxy) {
    let r = call("POST", &p.url("/v1/images/generations"), Some("fresh")).await;
    assert_eq!(r.status, 200, "the proxy stopped serving");
}

#[tokio::test]
async fn memory_stays_bounded_under_a_flood_of_distinct_keys() {
    let up = Upstream::start().await;
    let config = format!(
        "{}\n[store]\nmax_counters = 50\n",
        CONFIG.replace("[identity]\n", "[identity]\nkeys_file = \"keys.toml\"\n")
    );
    let keys = "[[keys]]\nkey = \"paying\"\nplan = \"free\"\n";
    let p = Proxy::start_with(&config, &up, &[("keys.toml", keys)]).await;
    let url = p.url("/v1/images/generations");
    assert_eq!(
        call("POST", &url, Some("paying"))
            .await
            .h("x-ratelimit-remaining"),
        "2"
    );
    for i in 0..300 {
        let r = call("POST", &url, Some(&format!("flood-{i}"))).await;
        assert_eq!(r.status, 200);
    }
    let store = p.app.store().in_process();
    assert!(
        store.live_counters() <= 50,
        "{} counters held",
        store.live_counters()
    );
    assert!(store.evicted_counters() >= 250);
    // The keys-file key's counter survived: its count goes on.
    assert_eq!(
        call("POST", &url, Some("paying"))
            .await
            .h("x-ratelimit-remaining"),
        "1"
    );
}

const BINARY_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"
header_timeout = "500ms"

[log]
refusals_per_second = 5

[upstream]
url = "{upstream}"

[[routes]]
name = "generate"
path = "/v1/images/generations"

[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 3
window = "1m"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_survived_and_logged_once_a_second() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = Binary::start_limited(dir.path(), BINARY_CONFIG, &up, 64).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", b.port).parse().unwrap();
    // One connection in use (its upstream connection pooled), then a crowd
    // of silent ones taking every descriptor turnstile has.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    let ask = b"GET /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n";
    let mut buf = vec![0u8; 2048];
    kept.write_all(ask).await.unwrap();
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut silent = Vec::new();
    for _ in 0..120 {
        if let Ok(s) = TcpStream::connect(addr).await {
            silent.push(s);
        }
    }
    // The connection it already had is still served while accepts fail.
    kept.write_all(ask).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), kept.read(&mut buf))
        .await
        .expect("an open connection went unanswered")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Silent connections are closed after header_timeout: it recovers.
    let started = Instant::now();
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            call("GET", &b.url("/v1/images/generations"), Some("fresh")),
        )
        .await;
        if matches!(r, Ok(ref got) if got.status == 200) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no recovery from fd exhaustion"
        );
    }
    let recovered = started.elapsed();
    drop(silent);
    let logs = b.logs();
    let failures = logs.matches("accept failed").count();
    assert!(failures >= 1, "fd exhaustion was not logged:\n{logs}");
    assert!(
        failures <= 2 + recovered.as_secs() as usize,
        "{failures} accept-failure lines in {recovered:?}"
    );
    assert!(!logs.contains("panicked"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_log_lines_are_rate_limited_with_a_summary() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = Binary::start(dir.path(), BINARY_CONFIG, &up).await;
    let started = Instant::now();
    for _ in 0..300 {
        let r = call("GET", &b.url("/v1/images/generations"), None).await;
        assert_eq!(r.status, 401);
    }
    let elapsed = started.elapsed().as_secs() as usize + 1;
    let summary = b.log_line("refusal log lines suppressed").await;
    assert!(summary.contains("unauthorized="), "{summary}");
    let logs = b.logs();
    let refused = logs.lines().filter(|l| l.contains("\"refused\"")).count();
    assert!(
        refused <= 5 * (elapsed + 1),
        "{refused} refusal lines for 300 refusals in {elapsed} s at 5 a second"
    );
    assert!(refused >= 1);
}
