//! Fail closed (docs/security.md, "Values read, and answers turnstile cannot
//! read"): an answer turnstile cannot read is assumed to have started the work, and a request
//! value it could read otherwise than the upstream is refused. Probed
//! against an upstream that compresses whatever it is told to, echoes
//! prompts, serves partial answers and says "not cancelled".

mod support;

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;

/// What the adversarial upstream received.
#[derive(Debug, Clone)]
struct Got2 {
    headers: HeaderMap,
}

/// An upstream that answers as the query says (see `answer`).
#[derive(Clone)]
struct Tricky {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Got2>>>,
    jobs: Arc<AtomicUsize>,
}

impl Tricky {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = Self {
            addr,
            seen: Arc::default(),
            jobs: Arc::default(),
        };
        let m = me.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let m = m.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| m.clone().serve(req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        me
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn last(&self) -> Got2 {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    async fn serve(self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        self.seen.lock().unwrap().push(Got2 {
            headers: parts.headers.clone(),
        });
        let q = parts.uri.query().unwrap_or("").to_owned();
        let param = |name: &str| {
            q.split('&')
                .find_map(|p| p.strip_prefix(&format!("{name}=")))
                .unwrap_or("")
                .to_owned()
        };
        let path = parts.uri.path();
        let (status, ct, text): (u16, &str, String) = if path == "/gen" {
            if param("mode") == "slow" {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            let n = self.jobs.fetch_add(1, Ordering::SeqCst) + 1;
            let echo = if body.is_empty() {
                "null".to_owned()
            } else {
                String::from_utf8_lossy(&body).into_owned()
            };
            let doc = format!("{{\"echo\":{echo},\"id\":\"job-{n}\",\"status\":\"queued\"}}");
            match param("mode").as_str() {
                "html" => (200, "text/html", format!("<p>{doc}</p>")),
                "truncated" => (200, "application/json", doc[..doc.len() - 3].to_owned()),
                "noid" => (200, "application/json", "{\"status\":\"queued\"}".into()),
                "partial" => (206, "application/json", doc),
                _ => (200, "application/json", doc),
            }
        } else if path == "/gen/status" {
            if param("mode") == "partial" {
                (206, "application/json", "{\"status\":\"completed\"}".into())
            } else {
                let doc = serde_json::json!({"id": param("id"), "status": param("state")});
                (200, "application/json", doc.to_string())
            }
        } else if path.ends_with("/cancel") {
            let state = if param("refuse") == "1" {
                "running"
            } else {
                "cancelled"
            };
            let doc = serde_json::json!({"cancelled": state == "cancelled", "state": state});
            (200, "application/json", doc.to_string())
        } else if path == "/bill" {
            (
                200,
                "application/json",
                format!("{{\"credits_used\":{}}}", param("used")),
            )
        } else {
            (200, "application/json", "{\"ok\":true}".into())
        };
        let enc = param("enc");
        let bytes = encode(&enc, text.as_bytes());
        let mut r = Response::new(Full::new(Bytes::from(bytes)));
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        r.headers_mut().insert("content-type", ct.parse().unwrap());
        if !enc.is_empty() {
            r.headers_mut()
                .insert("content-encoding", enc.parse().unwrap());
        }
        Ok(r)
    }
}

fn encode(enc: &str, text: &[u8]) -> Vec<u8> {
    match enc {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(text).unwrap();
            e.finish().unwrap()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(text).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(text).unwrap();
            }
            out
        }
        "zstd" => zstd::encode_all(text, 3).unwrap(),
        // "compress" and anything else: sent as is, labelled as coded.
        _ => text.to_vec(),
    }
}

fn decode(enc: &str, bytes: &[u8]) -> String {
    use std::io::Read as _;
    let mut out = String::new();
    match enc {
        "gzip" => flate2::read::GzDecoder::new(bytes).read_to_string(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(bytes).read_to_string(&mut out),
        "br" => brotli::Decompressor::new(bytes, 4096).read_to_string(&mut out),
        "zstd" => zstd::Decoder::new(bytes).unwrap().read_to_string(&mut out),
        _ => return String::from_utf8_lossy(bytes).into_owned(),
    }
    .unwrap();
    out
}

const CONFIG: &str = r#"
[server]
mcp_max_body = "4KB"

[upstream]
url = "{upstream}"

[identity]
unknown_key = "default"
default_plan = "free"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "gen"
method = "POST"
path = "/gen"
timeout = "1s"
job = { id = "json:/id" }

[[routes]]
name = "status"
method = "GET"
path = "/gen/status"
job_status = { id = "query:id", state = "json:/status", done = ["completed"] }

[[routes]]
name = "cancel"
method = "POST"
path = "/gen/{id}/cancel"
job_cancel = { id = "path:id", state = "json:/state", done = ["cancelled"] }

[[routes]]
name = "bill"
method = "POST"
path = "/bill"
cost = 10
settle = "json:/credits_used"

[plans.free]
[[plans.free.limits]]
name = "jobs"
kind = "jobs"
max = 2
routes = ["gen"]
max_duration = "1h"

[[plans.free.limits]]
name = "credits"
kind = "credits"
grant = 1000
routes = ["bill"]
"#;

/// Sends `method path` with key `key`, `Accept-Encoding: gzip` and `body`
/// (JSON); returns status, headers and the raw body bytes.
async fn go(p: &Proxy, method: &str, path: &str, key: &str, body: &str) -> (u16, HeaderMap, Bytes) {
    let mut b = req(method, &p.url(path))
        .header("authorization", format!("Bearer {key}"))
        .header("accept-encoding", "gzip, br, zstd, deflate");
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    let resp = client()
        .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, bytes)
}

async fn usage(p: &Proxy, key: &str) -> serde_json::Value {
    let r = call("GET", &p.admin_url(&format!("/v1/usage?key={key}")), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn jobs_of(u: &serde_json::Value) -> Vec<serde_json::Value> {
    let limits = u["counters"].as_array().unwrap();
    let jobs = limits.iter().find(|l| l["name"] == "jobs").unwrap();
    jobs["jobs"].as_array().unwrap().clone()
}

async fn metric(p: &Proxy, name: &str) -> String {
    let m = call("GET", &p.admin_url("/metrics"), None).await.body;
    m.lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn compressed_answers_count_and_end_jobs_as_uncompressed_ones() {
    let t = Tricky::start().await;
    let p = Proxy::start_url(CONFIG, &t.url(), &[]).await;
    for enc in ["gzip", "deflate", "br", "zstd"] {
        let key = format!("k-{enc}");
        let mut ids = Vec::new();
        for _ in 0..2 {
            let (status, h, body) = go(&p, "POST", &format!("/gen?enc={enc}"), &key, "").await;
            assert_eq!(status, 200, "{enc}");
            // The client gets the upstream's bytes, still coded.
            assert_eq!(h["content-encoding"], enc);
            let doc: serde_json::Value = serde_json::from_str(&decode(enc, &body)).unwrap();
            ids.push(doc["id"].as_str().unwrap().to_owned());
        }
        // turnstile asked for an uncompressed answer all the same.
        assert_eq!(t.last().headers["accept-encoding"], "identity");
        let (status, _, _) = go(&p, "POST", &format!("/gen?enc={enc}"), &key, "").await;
        assert_eq!(status, 429, "{enc}: max 2 jobs");
        let listed: Vec<_> = jobs_of(&usage(&p, &key).await)
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(listed, ids, "{enc}");
        // A coded status answer ends the first; a coded "cancelled" the second.
        let path = format!("/gen/status?id={}&state=completed&enc={enc}", ids[0]);
        assert_eq!(go(&p, "GET", &path, &key, "").await.0, 200);
        let path = format!("/gen/{}/cancel?enc={enc}", ids[1]);
        assert_eq!(go(&p, "POST", &path, &key, "").await.0, 200);
        assert!(jobs_of(&usage(&p, &key).await).is_empty(), "{enc}");
        // A coded settlement charges what the answer says.
        let (status, _, _) = go(&p, "POST", &format!("/bill?used=200&enc={enc}"), &key, "").await;
        assert_eq!(status, 200);
        let u = usage(&p, &key).await;
        let credits = u["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "credits")
            .cloned()
            .unwrap();
        assert_eq!(
            credits["balance"], 800,
            "{enc}: settled at 200, not the estimate of 10"
        );
    }
}

#[tokio::test]
async fn every_unreadable_answer_holds_the_slot() {
    let t = Tricky::start().await;
    let p = Proxy::start_url(CONFIG, &t.url(), &[]).await;
    let big = format!("{{\"prompt\":\"{}\"}}", "x".repeat(5000));
    let cases: [(&str, &str, &str); 6] = [
        ("compress", "/gen?enc=compress", ""),
        ("html", "/gen?mode=html", ""),
        ("truncated", "/gen?mode=truncated", ""),
        ("over the read bound", "/gen", big.as_str()),
        ("partial", "/gen?mode=partial", ""),
        ("timed out", "/gen?mode=slow", ""),
    ];
    for (what, path, body) in cases {
        let key = format!("u-{}", what.replace(' ', "-"));
        let (first, _, _) = go(&p, "POST", path, &key, body).await;
        let (second, _, _) = go(&p, "POST", path, &key, body).await;
        if what == "timed out" {
            assert_eq!((first, second), (504, 504), "{what}");
        } else {
            assert!(
                matches!(first, 200 | 206) && first == second,
                "{what}: {first} {second}"
            );
        }
        let (third, _, _) = go(&p, "POST", "/gen", &key, "").await;
        assert_eq!(
            third, 429,
            "{what}: two unreadable submissions hold both slots"
        );
        let jobs = jobs_of(&usage(&p, &key).await);
        assert_eq!(jobs.len(), 2, "{what}");
        assert!(jobs.iter().all(|j| j["id"].is_null()), "{what}: {jobs:?}");
        // No request can name such a job; the admin API ends them.
        let del = call(
            "DELETE",
            &p.admin_url(&format!("/v1/jobs?key={key}&unreadable=all")),
            None,
        )
        .await;
        assert_eq!(
            (del.status, del.json()["ended_unreadable"].as_u64()),
            (200, Some(2)),
            "{what}"
        );
        assert_eq!(go(&p, "POST", "/gen", &key, "").await.0, 200, "{what}");
    }
    let m = metric(&p, "turnstile_jobs_unreadable_total").await;
    assert!(m.contains("route=\"gen\"} 12"), "{m}");
}

#[tokio::test]
async fn echoed_prompts_do_not_make_an_answer_unreadable_and_no_id_starts_nothing() {
    let t = Tricky::start().await;
    let p = Proxy::start_url(CONFIG, &t.url(), &[]).await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    for prompt in [
        r#"{"prompt":"\ud800"}"#.to_owned(),
        format!("{{\"prompt\":{deep}}}"),
    ] {
        let key = format!("e-{}", prompt.len());
        for _ in 0..2 {
            assert_eq!(go(&p, "POST", "/gen", &key, &prompt).await.0, 200);
        }
        let jobs = jobs_of(&usage(&p, &key).await);
        assert!(
            jobs.iter()
                .all(|j| j["id"].as_str().is_some_and(|i| i.starts_with("job-"))),
            "{jobs:?}"
        );
        assert_eq!(go(&p, "POST", "/gen", &key, &prompt).await.0, 429);
    }
    // Readable, and no id: no job, the slot goes back.
    for _ in 0..3 {
        assert_eq!(go(&p, "POST", "/gen?mode=noid", "noid", "").await.0, 200);
    }
    assert!(jobs_of(&usage(&p, "noid").await).is_empty());
}

#[tokio::test]
async fn partial_and_refused_answers_end_nothing() {
    let t = Tricky::start().await;
    let p = Proxy::start_url(CONFIG, &t.url(), &[]).await;
    for _ in 0..2 {
        assert_eq!(go(&p, "POST", "/gen", "r", "").await.0, 200);
    }
    // A Range on a status route never reaches the upstream...
    let r = send(
        req("GET", &p.url("/gen/status?id=job-1&state=processing"))
            .header("authorization", "Bearer r")
            .header("range", "bytes=10-40")
            .header("if-range", "\"etag\"")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(t.last().headers.get("range").is_none() && t.last().headers.get("if-range").is_none());
    // ...and a 206 "completed" (a slice of another document) ends nothing.
    assert_eq!(
        go(&p, "GET", "/gen/status?id=job-1&mode=partial", "r", "")
            .await
            .0,
        206
    );
    // A cancel the upstream declines ends nothing either.
    assert_eq!(
        go(&p, "POST", "/gen/job-2/cancel?refuse=1", "r", "")
            .await
            .0,
        200
    );
    assert_eq!(jobs_of(&usage(&p, "r").await).len(), 2);
    // A job id twice: refused before the upstream, nothing ended.
    let before = t.count();
    let (status, _, body) = go(
        &p,
        "GET",
        "/gen/status?id=job-1&id=job-2&state=completed",
        "r",
        "",
    )
    .await;
    assert_eq!(status, 400, "{body:?}");
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body["message"],
        "ambiguous value: query parameter \"id\" appears 2 times"
    );
    assert_eq!(t.count(), before);
    assert_eq!(jobs_of(&usage(&p, "r").await).len(), 2);
    assert_eq!(go(&p, "POST", "/gen/job-2/cancel", "r", "").await.0, 200);
    assert_eq!(jobs_of(&usage(&p, "r").await).len(), 1);
}

const SPELLINGS: &str = r#"
[upstream]
url = "{upstream}"

[identity]
unknown_key = "default"
default_plan = "free"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "video-by-query"
method = "POST"
path = "/q"
when = { "query:model" = "veo-3" }
cost = 800

[[routes]]
name = "cheap-by-query"
method = "POST"
path = "/q"
cost = 2

[[routes]]
name = "video-by-header"
method = "POST"
path = "/h"
when = { "header:x-model" = "veo-3" }
cost = 800

[[routes]]
name = "cheap-by-header"
method = "POST"
path = "/h"
cost = 2

[[routes]]
name = "priced-json"
method = "POST"
path = "/j"
cost = { by = "json:/model", prices = { "flux" = 2, "veo-3" = 800 }, default = 5 }

[[routes]]
name = "priced-query"
method = "POST"
path = "/pq"
cost = { by = "query:model", prices = { "flux" = 2, "veo-3" = 800 } }

[plans.free]
[[plans.free.limits]]
name = "credits"
kind = "credits"
grant = 100000
"#;

/// One request spelling and what must come of it: the status, and the
/// credits it cost (0 for a refusal, which never reaches the upstream).
struct Spelling {
    path: &'static str,
    content_type: Option<&'static str>,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    status: u16,
    cost: i64,
    message: &'static str,
}

#[tokio::test]
async fn a_request_read_two_ways_is_refused_never_priced_cheap() {
    let up = Upstream::start().await;
    let p = Proxy::start(SPELLINGS, &up).await;
    let form = Some("application/x-www-form-urlencoded");
    let json = Some("application/json");
    let table = [
        // The body is a form: the upstream reads model=veo-3; turnstile does not guess.
        Spelling {
            path: "/j",
            content_type: form,
            headers: &[],
            body: "model=veo-3",
            status: 415,
            cost: 0,
            message: "Content-Type: application/json",
        },
        Spelling {
            path: "/j",
            content_type: None,
            headers: &[],
            body: "{\"model\":\"veo-3\"}",
            status: 415,
            cost: 0,
            message: "application/json",
        },
        Spelling {
            path: "/j",
            content_type: Some("text/plain"),
            headers: &[],
            body: "{\"model\":\"veo-3\"}",
            status: 415,
            cost: 0,
            message: "text/plain",
        },
        Spelling {
            path: "/j",
            content_type: Some("application/vnd.api+json; charset=utf-8"),
            headers: &[],
            body: "{\"model\":\"veo-3\"}",
            status: 200,
            cost: 800,
            message: "",
        },
        Spelling {
            path: "/j",
            content_type: json,
            headers: &[],
            body: "{\"model\":\"veo-3\"}",
            status: 200,
            cost: 800,
            message: "",
        },
        // No body: no json: values, so the default price applies.
        Spelling {
            path: "/j",
            content_type: None,
            headers: &[],
            body: "",
            status: 200,
            cost: 5,
            message: "",
        },
        Spelling {
            path: "/j",
            content_type: json,
            headers: &[],
            body: "{\"model\":\"flux\",\"model\":\"veo-3\"}",
            status: 400,
            cost: 0,
            message: "duplicate object key",
        },
        // Repeated query parameters: frameworks take the first or the last.
        Spelling {
            path: "/q?model=flux&model=veo-3",
            content_type: None,
            headers: &[],
            body: "",
            status: 400,
            cost: 0,
            message: "query parameter \"model\" appears 2 times",
        },
        Spelling {
            path: "/q?model=veo-3&mod%65l=flux",
            content_type: None,
            headers: &[],
            body: "",
            status: 400,
            cost: 0,
            message: "appears 2 times",
        },
        Spelling {
            path: "/q?model=veo-3",
            content_type: None,
            headers: &[],
            body: "",
            status: 200,
            cost: 800,
            message: "",
        },
        Spelling {
            path: "/q?model=",
            content_type: None,
            headers: &[],
            body: "",
            status: 200,
            cost: 2,
            message: "",
        },
        Spelling {
            path: "/pq?model=",
            content_type: None,
            headers: &[],
            body: "",
            status: 400,
            cost: 0,
            message: "no price for \"\"",
        },
        Spelling {
            path: "/pq?model=veo-3&model=veo-3",
            content_type: None,
            headers: &[],
            body: "",
            status: 400,
            cost: 0,
            message: "appears 2 times",
        },
        // Repeated headers, or one header with a list.
        Spelling {
            path: "/h",
            content_type: None,
            headers: &[("x-model", "flux"), ("x-model", "veo-3")],
            body: "",
            status: 400,
            cost: 0,
            message: "header \"x-model\" appears 2 times",
        },
        Spelling {
            path: "/h",
            content_type: None,
            headers: &[("x-model", "veo-3, flux")],
            body: "",
            status: 400,
            cost: 0,
            message: "comma-separated",
        },
        Spelling {
            path: "/h",
            content_type: None,
            headers: &[("x-model", " veo-3 ")],
            body: "",
            status: 200,
            cost: 800,
            message: "",
        },
        Spelling {
            path: "/h",
            content_type: None,
            headers: &[("x-model", "")],
            body: "",
            status: 200,
            cost: 2,
            message: "",
        },
    ];
    let mut balance = 100_000i64;
    for (i, s) in table.iter().enumerate() {
        let before = up.hits();
        let mut b = req("POST", &p.url(s.path)).header("authorization", "Bearer spell");
        if let Some(ct) = s.content_type {
            b = b.header("content-type", ct);
        }
        for (name, value) in s.headers {
            b = b.header(*name, *value);
        }
        let r = send(
            b.body(Full::new(Bytes::from_static(s.body.as_bytes())))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, s.status, "#{i} {}: {}", s.path, r.body);
        let said = if s.status == 200 {
            String::new()
        } else {
            r.json()["message"].as_str().unwrap().to_owned()
        };
        assert!(said.contains(s.message), "#{i}: {}", r.body);
        if s.status == 200 {
            assert_eq!(up.hits(), before + 1, "#{i}");
            assert_eq!(up.last().body, s.body.as_bytes(), "#{i}: forwarded as sent");
        } else {
            assert_eq!(up.hits(), before, "#{i}: refused before the upstream");
            if s.status == 415 {
                assert_eq!(r.json()["error"], "unsupported_media_type");
            } else {
                assert!(matches!(
                    r.json()["error"].as_str(),
                    Some("bad_request" | "invalid_arguments")
                ));
            }
        }
        balance -= s.cost;
        let u = usage(&p, "spell").await;
        assert_eq!(u["counters"][0]["balance"], balance, "#{i} {}", s.path);
    }
}

const PLANS: &str = r#"
[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"

[[routes]]
name = "gen"
method = "POST"
path = "/gen"
job = { id = "json:/id" }

[[routes]]
name = "status"
method = "GET"
path = "/gen/status"
job_status = { id = "query:id", state = "json:/status", done = ["completed"] }

[[routes]]
name = "bill"
method = "POST"
path = "/bill"
cost = 600

[plans.free]
[[plans.free.limits]]
name = "jobs"
kind = "jobs"
max = 2
routes = ["gen"]

[[plans.free.limits]]
name = "credits"
kind = "credits"
grant = 1000
per = "account"
routes = ["bill"]

[plans.pro]
[[plans.pro.limits]]
name = "jobs"
kind = "jobs"
max = 3
routes = ["gen"]

[[plans.pro.limits]]
name = "credits"
kind = "credits"
grant = 1000
per = "account"
routes = ["bill"]
"#;

fn keys(plan_of_k: &str) -> String {
    format!(
        "[[keys]]\nkey = \"k\"\nplan = \"{plan_of_k}\"\n\n\
         [[keys]]\nkey = \"a\"\naccount = \"acme\"\nplan = \"free\"\n\n\
         [[keys]]\nkey = \"b\"\naccount = \"acme\"\nplan = \"pro\"\n"
    )
}

async fn post(p: &Proxy, path: &str, key: &str) -> Got {
    call("POST", &p.url(path), Some(key)).await
}

#[tokio::test]
async fn counters_belong_to_the_subject_whatever_its_plan() {
    let up = Upstream::start().await;
    let p = Proxy::start_with(PLANS, &up, &[("keys.toml", &keys("free"))]).await;
    assert_eq!(post(&p, "/gen", "k").await.status, 200);
    assert_eq!(post(&p, "/gen", "k").await.status, 200);
    assert_eq!(post(&p, "/gen", "k").await.status, 429);
    // Moved to pro (max 3): its two jobs go with it, one more fits.
    std::fs::write(p.dir.path().join("keys.toml"), keys("pro")).unwrap();
    p.app.reload().unwrap();
    assert_eq!(post(&p, "/gen", "k").await.status, 200);
    assert_eq!(
        post(&p, "/gen", "k").await.status,
        429,
        "2 + 1 of 3, not 2 more"
    );
    // A job started on free is ended by a poll on pro.
    let r = call(
        "GET",
        &p.url("/gen/status?id=job-1&state=completed"),
        Some("k"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(post(&p, "/gen", "k").await.status, 200);
    // Keys of one account on two plans share its balance: 600 + 600 > 1000.
    assert_eq!(call("POST", &p.url("/bill"), Some("a")).await.status, 200);
    let second = call("POST", &p.url("/bill"), Some("b")).await;
    assert_eq!(second.status, 402, "{}", second.body);
}

const FULL: &str = r#"
[upstream]
url = "{upstream}"

[identity]
unknown_key = "default"
default_plan = "free"

[store]
max_counters = 4

[[routes]]
name = "gen"
method = "POST"
path = "/gen"
job = { id = "json:/id" }

[[routes]]
name = "status"
method = "GET"
path = "/gen/status"
job_status = { id = "query:id", state = "json:/status", done = ["completed"] }

[plans.free]
[[plans.free.limits]]
name = "jobs"
kind = "jobs"
max = 1
routes = ["gen"]
"#;

#[tokio::test]
async fn counter_memory_full_of_jobs_refuses_new_subjects_and_gives_nothing_away() {
    let up = Upstream::start().await;
    let p = Proxy::start(FULL, &up).await;
    for k in ["k1", "k2", "k3", "k4"] {
        assert_eq!(call("POST", &p.url("/gen"), Some(k)).await.status, 200);
    }
    // Every counter holds a job: none is evicted (that would free its slot).
    let r = call("POST", &p.url("/gen"), Some("k5")).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (503, Some("overloaded")),
        "{}",
        r.body
    );
    assert_eq!(
        call("POST", &p.url("/gen"), Some("k1")).await.status,
        429,
        "k1's job is kept"
    );
    assert_eq!(up.hits(), 4);
    // Once a job ends, its counter can go and a new subject fits.
    let r = call(
        "GET",
        &p.url("/gen/status?id=job-1&state=completed"),
        Some("k1"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(call("POST", &p.url("/gen"), Some("k5")).await.status, 200);
}

/// An upstream that frames its answer with chunked encoding and also
/// sends a (wrong) Content-Length.
async fn both_framings() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n9\r\n\"whole\"}\n\r\n0\r\n\r\n";
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_answer_with_both_framings_reaches_the_client_whole() {
    let url = both_framings().await;
    let p = Proxy::start_url(CONFIG, &url, &[]).await;
    let c = client();
    for _ in 0..3 {
        let r = c
            .request(
                req("GET", &p.url("/other"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            b"{\"a\":\"whole\"}\n",
            "never cut at the Content-Length"
        );
    }
}

const IDLE: &str = r#"
[server]
header_timeout = "1s"
idle_timeout = "30s"

[upstream]
url = "{upstream}"
"#;

#[tokio::test]
async fn an_idle_keep_alive_connection_lives_past_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let p = Proxy::start(IDLE, &up).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut buf = vec![0u8; 4096];
    s.write_all(get).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    s.write_all(get).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // A head that began must still be complete within header_timeout.
    s.write_all(b"GET /a HTTP/1.1\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("a slow head is cut")
        .unwrap_or(0);
    assert!(n == 0 || buf[..n].starts_with(b"HTTP/1.1 408"));
    assert!(started.elapsed() < Duration::from_secs(3));
}

const H2: &str = r#"
[upstream]
url = "{upstream}"

[identity]
unknown_key = "default"
default_plan = "free"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "upload"
method = "POST"
path = "/upload"
cost = 10

[plans.free]
[[plans.free.limits]]
name = "credits"
kind = "credits"
grant = 100
"#;

#[tokio::test]
async fn an_http2_stream_reset_mid_body_is_refunded_like_http1() {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let up = Upstream::start().await;
    let p = Proxy::start(H2, &up).await;
    let h2 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
    let request = req("POST", &p.url("/upload"))
        .header("authorization", "Bearer h2")
        .body(body)
        .unwrap();
    let pending = tokio::spawn(async move { h2.request(request).await });
    tx.send(Ok(Frame::data(Bytes::from_static(b"part of it"))))
        .await
        .unwrap();
    eventually("the request was admitted", || {
        p.app
            .metrics()
            .render(Default::default())
            .contains("turnstile_in_flight_exchanges 1")
    })
    .await;
    // The client gives up mid-body: its stream is reset.
    tx.send(Err(std::io::Error::other("client gave up")))
        .await
        .unwrap();
    drop(tx);
    let _ = pending.await;
    let mut balance = serde_json::Value::Null;
    for _ in 0..200 {
        balance = usage(&p, "h2").await["counters"][0]["balance"].clone();
        if balance == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(balance, 100, "the 10 credits came back");
    assert!(up.seen().is_empty(), "nothing reached the upstream whole");
}
