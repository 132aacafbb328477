//! Header-name case on the wire (SPEC §16): the names turnstile writes go
//! out as the seeds spell them, an upstream's names as the upstream spelled
//! them, and no body byte changes, over keep-alive and pipelined requests.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A body that looks like response heads, to prove bodies are left alone.
const BODY: &str = "\r\nx-ratelimit-limit: 9\r\n\r\nHTTP/1.1 200 OK\r\nratelimit: x\r\n\r\n";

/// An upstream written by hand, so its header names have a case hyper's
/// would not: answers every request on a kept-alive connection, HEAD
/// without a body, GETs to `/chunked` with a chunked body.
async fn hand_written_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let answer = if head.starts_with("HEAD ") {
                        format!("HTTP/1.1 200 OK\r\nX-Upstream-MiXed: yes\r\ncontent-LENGTH: {}\r\n\r\n", BODY.len())
                    } else if head.contains(" /chunked ") {
                        format!("HTTP/1.1 200 OK\r\nX-Upstream-MiXed: yes\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{BODY}\r\n0\r\n\r\n", BODY.len())
                    } else {
                        format!("HTTP/1.1 200 OK\r\nX-Upstream-MiXed: yes\r\ncontent-type: text/plain\r\nContent-Length: {}\r\n\r\n{BODY}", BODY.len())
                    };
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

const CONFIG: &str = r#"
[upstream]
url = "http://UPSTREAM"

[identity]
keys_file = "keys.toml"

[headers]
ietf = true

[[routes]]
name = "gen"
path = "/gen"

[[routes]]
name = "chunked"
path = "/chunked"

[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 4
window = "1m"

[[plans.free.limits]]
name = "calls"
requests = 100
window = "1h"
headers = "X-MCP-Calls"
"#;

const KEYS: &str = "[[keys]]\nkey = \"sk-one\"\nplan = \"free\"\n";

/// Five requests on one connection, pipelined in one write: a GET, a HEAD,
/// a chunked GET, a GET and one over the limit.
#[tokio::test]
async fn our_names_as_published_upstream_names_as_sent_bodies_untouched() {
    let upstream = hand_written_upstream().await;
    let dead = Upstream::dead().await;
    let config = CONFIG.replace("UPSTREAM", &upstream.to_string());
    let p = Proxy::start_with(&config, &dead, &[("keys.toml", KEYS)]).await;
    let h = "host: t\r\nx-api-key: sk-one";
    let get = format!("GET /gen HTTP/1.1\r\n{h}\r\n\r\n");
    let requests = format!(
        "{get}HEAD /gen HTTP/1.1\r\n{h}\r\n\r\nGET /chunked HTTP/1.1\r\n{h}\r\n\r\n{get}GET /gen HTTP/1.1\r\n{h}\r\nconnection: close\r\n\r\n"
    );
    let out = raw(p.addr, requests.as_bytes(), Duration::from_secs(5)).await;
    let answers: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
    // The bodies hold "HTTP/1.1 " too: 3 bodies, one each.
    assert_eq!(out.matches(BODY).count(), 3, "{out}");

    let first = &out[..out.find(BODY).unwrap()];
    for line in [
        "\r\nX-RateLimit-Limit: 4\r\n",
        "\r\nX-RateLimit-Remaining: 3\r\n",
        "\r\nX-RateLimit-Reset: ",
        "\r\nRateLimit-Policy: ",
        "\r\nRateLimit: ",
        "\r\nX-MCP-Calls-Limit: 100\r\n",
        "\r\nX-MCP-Calls-Remaining: 99\r\n",
        // The upstream's names, as it spelled them.
        "\r\nX-Upstream-MiXed: yes\r\n",
        "\r\ncontent-type: text/plain\r\n",
    ] {
        assert!(first.contains(line), "{line:?} missing from {first}");
    }
    assert!(answers.len() >= 5, "{out}");

    // The HEAD answer carries the upstream's length and no body; the
    // chunked answer's body is intact and the answers after it respelled.
    assert!(out.contains("\r\ncontent-LENGTH: "), "{out}");
    assert!(
        out.contains(&format!("\r\n{:X}\r\n{BODY}\r\n0\r\n\r\n", BODY.len())),
        "{out}"
    );
    let last = &out[out.rfind("HTTP/1.1 429").expect("the fifth is refused")..];
    for line in [
        "\r\nX-RateLimit-Limit: 4\r\n",
        "\r\nX-RateLimit-Remaining: 0\r\n",
        "\r\nX-RateLimit-Type: minute\r\n",
        "\r\nRetry-After: ",
        "\r\nContent-Type: application/json\r\n",
        "\r\nContent-Length: ",
    ] {
        assert!(last.contains(line), "{line:?} missing from {last}");
    }
    assert!(!out.contains("x-ratelimit-remaining"), "{out}");
}

/// A 401 has `WWW-Authenticate` as RFC 9110 spells it.
#[tokio::test]
async fn refusals_spell_www_authenticate() {
    let upstream = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"

[[routes]]
name = "gen"
path = "/gen"

[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 4
window = "1m"
"#;
    let p = Proxy::start_with(config, &upstream, &[("keys.toml", KEYS)]).await;
    let out = raw(
        p.addr,
        b"GET /gen HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.contains("\r\nWWW-Authenticate: Bearer"), "{out}");
    assert_eq!(upstream.hits(), 0);
}
