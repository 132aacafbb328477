//! Body limits (SPEC §1 step 4, §3): whole body, by content type, and per
//! multipart part, enforced before and while streaming, consuming no quota.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

const CONFIG: &str = r#"
[upstream]
url = "{upstream}"

[[routes]]
name = "up"
path = "/up"
max_body = 100
max_body_by_type = { "image/*" = 10, "image/png" = 15, "audio/*" = 20, "video/*" = 200 }

[plans.p]
[[plans.p.limits]]
name = "minute"
requests = 100
window = "1m"
"#;

async fn post(p: &Proxy, content_type: &str, body: Vec<u8>) -> Got {
    send(
        req("POST", &p.url("/up"))
            .header("authorization", "Bearer k")
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn content_length_is_checked_against_the_most_specific_type() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let cases = [
        ("image/jpeg", 10, 200),
        ("image/jpeg", 11, 413),
        ("image/png", 15, 200), // exact type beats image/*
        ("image/png", 16, 413),
        ("audio/mpeg", 20, 200),
        ("audio/mpeg; rate=44100", 21, 413),
        ("text/plain", 100, 200), // no type entry: max_body
        ("text/plain", 101, 413),
        ("video/mp4", 150, 200), // a type limit may exceed max_body
    ];
    let mut admitted = 0;
    for (ct, len, status) in cases {
        let r = post(&p, ct, vec![b'x'; len]).await;
        assert_eq!(r.status, status, "{ct} {len} bytes");
        admitted += usize::from(status == 200);
    }
    let r = post(&p, "image/gif", vec![b'x'; 11]).await;
    assert_eq!(
        r.body,
        r#"{"error":"payload_too_large","message":"body exceeds 10 bytes for image/* on route up","limit_bytes":10}"#
    );
    let r = post(&p, "text/plain", vec![b'x'; 101]).await;
    assert_eq!(r.json()["message"], "body exceeds 100 bytes on route up");
    assert_eq!(up.hits(), admitted);
    // None of the 413s consumed quota.
    let r = post(&p, "text/plain", vec![]).await;
    assert_eq!(
        r.h("x-ratelimit-remaining"),
        (100 - admitted - 1).to_string()
    );
}

fn multipart(parts: &[(&str, usize)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, (ct, len)) in parts.iter().enumerate() {
        body.extend_from_slice(format!("--b0undary\r\nContent-Disposition: form-data; name=\"f{i}\"; filename=\"f{i}\"\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
        body.extend(std::iter::repeat_n(b'z', *len));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--b0undary--\r\n");
    body
}

#[tokio::test]
async fn each_multipart_part_is_held_to_its_own_type() {
    let up = Upstream::start().await;
    let config = CONFIG.replace("max_body = 100", "max_body = 1000");
    let p = Proxy::start(&config, &up).await;
    let ct = "multipart/form-data; boundary=b0undary";
    let ok = multipart(&[("image/jpeg", 10), ("audio/wav", 20), ("text/plain", 300)]);
    let r = post(&p, ct, ok.clone()).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().body, ok, "forwarded byte for byte");

    let over = multipart(&[("audio/wav", 5), ("image/jpeg", 12)]);
    let r = post(&p, ct, over).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.json()["message"],
        "body exceeds 10 bytes for image/* on route up"
    );
    assert_eq!(
        up.seen().len(),
        1,
        "the upstream never received the over-limit upload as a complete request"
    );
    let r = post(&p, "text/plain", vec![]).await;
    assert_eq!(
        r.h("x-ratelimit-remaining"),
        "98",
        "the 413 consumed no quota"
    );
}

#[tokio::test]
async fn a_chunked_upload_is_cut_at_its_type_limit() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..4)
        .map(|_| Ok(Frame::data(Bytes::from_static(b"1234"))))
        .collect();
    let client: Client<HttpConnector, _> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let request = req("POST", &p.url("/up"))
        .header("authorization", "Bearer k")
        .header("content-type", "image/webp")
        .body(StreamBody::new(tokio_stream::iter(chunks)))
        .unwrap();
    let resp = client.request(request).await.unwrap();
    assert_eq!(resp.status(), 413);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("for image/*"),
        "{body:?}"
    );
    assert!(up.seen().is_empty());
}
