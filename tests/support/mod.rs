//! Test harness: a real upstream and the real proxy, both on 127.0.0.1:0,
//! and a small HTTP client. The proxy runs in-process with a manual clock so
//! window tests are exact and instant.

#![allow(dead_code)]

pub mod ledger;
pub mod redis_server;
#[allow(unused_imports)]
pub use ledger::{admin_at, ledger_history, of_type, ACCOUNT_KEYS};
#[allow(unused_imports)]
pub use redis_server::{redis_cli, require_redis, Redis};

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify, Semaphore};
use turnstile::clock::SECOND;
use turnstile::wire::body::{full, Body};
use turnstile::ManualClock;

/// 2026-05-05T16:00:00Z: a whole hour, so windows are easy to reason about.
pub const T0: u64 = 1_777_996_800;

/// What the upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

struct UpstreamState {
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    hits: AtomicUsize,
    /// Released by tests to let `/hold` requests finish.
    gate: Semaphore,
    /// Signals the second chunk of `/sse`.
    sse_next: Notify,
    /// Ids handed out by the job endpoints.
    jobs: AtomicUsize,
}

/// A fake generation API recording everything it receives.
///
/// - `/hold` (or any path with `hold` in its query): waits until the test opens the gate, then 200;
/// - `/sse`: one event, then a second once the test calls `sse_next`;
/// - `/slow...`: answers after 5 s;
/// - `/reset`: sends a chunk, then cuts the connection mid-body;
/// - `/status/{code}`: answers with that status and a JSON body;
/// - `/hop`: answers with hop-by-hop headers that must not reach the client;
/// - `POST /gen`: starts a job, `{"id":"job-N","status":"queued"}` (query
///   `hold`: after the gate opens; `noid`: no id; `fail`: 500; `location`:
///   the id in `Location` only); `GET /gen/status?id=ID&state=S` answers
///   `{"id":ID,"status":S}`; `POST /gen/{id}/cancel` answers 200 (`fail`: 404);
/// - `POST /mcp-gen` (or `/mcp?jobs`): a JSON-RPC tool call answered as SSE
///   (a progress notification, then the result): `generate_*` tools give a
///   new id as `structuredContent.job_id` and `.generation_id`, any other
///   tool echoes `arguments.state` for the id it is given;
/// - `/bill?used=N`: 200 with `x-credits-used: N` and `{"credits_used":N}`
///   (no `used`: neither); `/bill?status=S`: answers S;
/// - anything else: 200 `{"ok":true}` after reading the whole body.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            seen: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            hits: AtomicUsize::new(0),
            gate: Semaphore::new(0),
            sse_next: Notify::new(),
            jobs: AtomicUsize::new(0),
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| serve(s.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An upstream address where nothing listens.
    pub async fn dead() -> Self {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        Self {
            addr,
            ..Self::start().await
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen()
            .last()
            .cloned()
            .expect("the upstream saw no request")
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn release(&self, n: usize) {
        self.state.gate.add_permits(n);
    }

    pub fn sse_next(&self) {
        self.state.sse_next.notify_one();
    }
}

async fn serve(
    s: Arc<UpstreamState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    s.hits.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            s.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Ok(Response::new(full("body error")));
        }
    };
    s.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let hold = path == "/hold" || parts.uri.query().is_some_and(|q| q.contains("hold"));
    let jobs_mcp = path == "/mcp" && parts.uri.query().is_some_and(|q| q.contains("jobs"));
    let response = if path.starts_with("/gen") || path == "/mcp-gen" || jobs_mcp {
        jobs_api(&s, &path, parts.uri.query().unwrap_or(""), &body).await
    } else if hold {
        s.gate.acquire().await.unwrap().forget();
        json(200, "{\"held\":true}")
    } else if path == "/sse" {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, turnstile::wire::body::BoxError>>(4);
        let s2 = s.clone();
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"data: one\n\n"))))
                .await;
            s2.sse_next.notified().await;
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"data: two\n\n"))))
                .await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        r
    } else if path == "/reset" {
        // One chunk, then the stream fails: the connection is cut mid-body.
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, turnstile::wire::body::BoxError>>(2);
        let _ = tx.try_send(Ok(Frame::data(Bytes::from_static(b"partial"))));
        let _ = tx.try_send(Err("upstream reset".into()));
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Response::new(BodyExt::boxed(StreamBody::new(stream)))
    } else if path.starts_with("/slow") {
        tokio::time::sleep(Duration::from_secs(5)).await;
        json(200, "{\"slow\":true}")
    } else if let Some(code) = path.strip_prefix("/status/") {
        json(
            code.parse().unwrap_or(500),
            &format!("{{\"upstream_status\":{code}}}"),
        )
    } else if path == "/bill" {
        bill(parts.uri.query().unwrap_or(""))
    } else if path == "/hop" {
        let mut r = json(200, "{}");
        let h = r.headers_mut();
        h.insert("connection", "x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        r
    } else {
        json(200, "{\"ok\":true}")
    };
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    Ok(response)
}

/// A billed answer: the cost the upstream says it charged (see [`Upstream`]).
fn bill(query: &str) -> Response<Body> {
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    let status = param("status").and_then(|s| s.parse().ok()).unwrap_or(200);
    match param("used") {
        Some(used) => {
            let mut r = json(status, &format!("{{\"credits_used\":{used}}}"));
            r.headers_mut()
                .insert("x-credits-used", used.parse().unwrap());
            r
        }
        None => json(status, "{\"billed\":false}"),
    }
}

/// The fake asynchronous generation API (see [`Upstream`]).
async fn jobs_api(s: &UpstreamState, path: &str, query: &str, body: &[u8]) -> Response<Body> {
    let has = |flag: &str| query.split('&').any(|p| p == flag);
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .unwrap_or("")
            .to_owned()
    };
    if path == "/gen" {
        if has("hold") {
            s.gate.acquire().await.unwrap().forget();
        }
        if has("fail") {
            return json(500, "{\"error\":\"overloaded\"}");
        }
        if has("noid") {
            return json(200, "{\"status\":\"queued\"}");
        }
        let id = format!("job-{}", s.jobs.fetch_add(1, Ordering::SeqCst) + 1);
        if has("location") {
            let mut r = json(202, "{}");
            r.headers_mut().insert("location", id.parse().unwrap());
            return r;
        }
        return json(200, &format!("{{\"id\":\"{id}\",\"status\":\"queued\"}}"));
    }
    if path == "/gen/status" {
        let body = serde_json::json!({"id": param("id"), "status": param("state")});
        return json(200, &body.to_string());
    }
    if path.ends_with("/cancel") {
        return if has("fail") {
            json(404, "{\"error\":\"unknown job\"}")
        } else {
            json(200, "{\"cancelled\":true}")
        };
    }
    // /mcp-gen: JSON-RPC over SSE.
    let call: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let args = &call["params"]["arguments"];
    let name = call["params"]["name"].as_str().unwrap_or("");
    let content = if name.starts_with("generate_") {
        let id = format!("job-{}", s.jobs.fetch_add(1, Ordering::SeqCst) + 1);
        let mut c = serde_json::json!({"job_id": id, "generation_id": id});
        if !args["credits_used"].is_null() {
            c["credits_used"] = args["credits_used"].clone();
        }
        c
    } else {
        let id = if args["job_id"].is_null() {
            &args["generation_id"]
        } else {
            &args["job_id"]
        };
        serde_json::json!({"job_id": id, "generation_id": id, "status": args["state"]})
    };
    let result = serde_json::json!({
        "jsonrpc": "2.0",
        "id": call["id"],
        "result": {"content": [{"type": "text", "text": "ok"}], "structuredContent": content},
    });
    let progress = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}"#;
    let text = format!("event: message\ndata: {progress}\n\nevent: message\ndata: {result}\n\n");
    let mut r = Response::new(full(text));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    r
}

fn json(status: u16, body: &str) -> Response<Body> {
    let mut r = Response::new(full(body.to_owned()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut().insert("x-upstream", "yes".parse().unwrap());
    r
}

/// The real proxy, in-process, on an ephemeral port.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener, when the config has `[admin]`.
    pub admin: Option<SocketAddr>,
    /// The HTTP decision endpoint and the rate limit service, with `[decision]`.
    pub decision: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub clock: ManualClock,
    pub dir: tempfile::TempDir,
    pub app: Arc<turnstile::pipeline::Turnstile>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Proxy {
    /// Starts turnstile with `config` (`{upstream}` replaced by the upstream
    /// URL) and extra files (name, text) written beside it. The clock stands at
    /// `T0 + 10 s`.
    pub async fn start_with(config: &str, upstream: &Upstream, files: &[(&str, &str)]) -> Self {
        Self::start_url(config, &upstream.url(), files).await
    }

    /// As [`Proxy::start_with`], with `{upstream}` replaced by `url`.
    pub async fn start_url(config: &str, url: &str, files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let config = config.replace("{upstream}", url);
        let config = if config.contains("[server]") {
            config.replace("[server]", "[server]\nlisten = \"127.0.0.1:0\"")
        } else {
            format!("[server]\nlisten = \"127.0.0.1:0\"\n{config}")
        };
        let path = dir.path().join("turnstile.toml");
        std::fs::write(&path, config).unwrap();
        let policy = turnstile::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let clock = ManualClock::at_secs(T0 + 10);
        let server = turnstile::Server::bind(policy, Arc::new(clock.clone()))
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let admin = server.admin_addr();
        let (decision, grpc) = (server.decision_addr(), server.grpc_addr());
        let app = server.app().clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin,
            decision,
            grpc,
            clock,
            dir,
            app,
            stop: Some(tx),
        }
    }

    /// Starts a shipped example from `config/examples/` (its keys files
    /// beside it), pointed at `upstream` and an ephemeral port.
    pub async fn start_example(name: &str, upstream: &Upstream) -> Self {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            files.push((file, std::fs::read_to_string(&path).unwrap()));
        }
        let config = files
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, t)| t.clone())
            .expect("no such example");
        let config = config
            .replace("url = \"http://127.0.0.1:9000\"", "url = \"{upstream}\"")
            .replace("listen = \"127.0.0.1:8080\"", "")
            .replace("listen = \"127.0.0.1:9090\"", "listen = \"127.0.0.1:0\"");
        assert!(
            config.contains("{upstream}"),
            "example {name} must point at http://127.0.0.1:9000"
        );
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(f, t)| (f.as_str(), t.as_str()))
            .collect();
        Self::start_with(&config, upstream, &files).await
    }

    pub async fn start(config: &str, upstream: &Upstream) -> Self {
        Self::start_with(config, upstream, &[]).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A URL on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.admin.expect("the config has no [admin]"),
            path
        )
    }

    pub fn advance_secs(&self, secs: u64) {
        self.clock.advance(secs * SECOND);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Polls `cond` until it holds (bounded: fails after 10 s).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls the async `cond` until it holds (bounded: fails after 10 s).
pub async fn eventually_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A response with its body read.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn h(&self, name: &str) -> &str {
        self.header(name)
            .unwrap_or_else(|| panic!("missing header {name} in {:?}", self.headers))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A keep-alive HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends one request and reads the whole response.
pub async fn send(req: Request<Full<Bytes>>) -> Got {
    let resp = client().request(req).await.expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Request builder shorthand: `req("POST", url).header(..)`.
pub fn req(method: &str, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

/// `method url` with a bearer key and no body.
pub async fn call(method: &str, url: &str, key: Option<&str>) -> Got {
    let mut b = req(method, url);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    send(b.body(Full::new(Bytes::new())).unwrap()).await
}

/// Writes raw bytes on a fresh connection and reads until the server closes
/// it or `limit` passes; returns what came back.
pub async fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The counter named `name` in an admin usage answer (`counters`).
pub fn counter_named(usage: &serde_json::Value, name: &str) -> serde_json::Value {
    usage["counters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no counter {name} in {usage}"))
}

/// Map of counts per status.
pub fn tally(statuses: impl IntoIterator<Item = u16>) -> HashMap<u16, usize> {
    let mut m = HashMap::new();
    for s in statuses {
        *m.entry(s).or_default() += 1;
    }
    m
}

/// The real `turnstile` binary, run as a child process on free ports, with
/// its logs (JSON) captured to a file in its own directory.
pub struct Binary {
    pub child: std::process::Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: std::path::PathBuf,
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Binary {
    /// Writes `config` (with `{upstream}`, `{port}`, `{admin_port}` filled in)
    /// to `dir/turnstile.toml` and starts the binary; waits until it listens.
    pub async fn start(dir: &std::path::Path, config: &str, upstream: &Upstream) -> Self {
        Self::start_with_nofile(dir, config, upstream, None).await
    }

    /// As [`Binary::start`], with at most `nofile` open file descriptors
    /// (`ulimit -n`).
    pub async fn start_limited(
        dir: &std::path::Path,
        config: &str,
        upstream: &Upstream,
        nofile: u32,
    ) -> Self {
        Self::start_with_nofile(dir, config, upstream, Some(nofile)).await
    }

    async fn start_with_nofile(
        dir: &std::path::Path,
        config: &str,
        upstream: &Upstream,
        nofile: Option<u32>,
    ) -> Self {
        let (port, admin_port) = (free_port(), free_port());
        let config = config
            .replace("{upstream}", &upstream.url())
            .replace("{port}", &port.to_string())
            .replace("{admin_port}", &admin_port.to_string());
        std::fs::write(dir.join("turnstile.toml"), config).unwrap();
        Self::spawn(dir, port, admin_port, nofile).await
    }

    /// Starts the binary again on the config already in `dir`.
    pub async fn restart(dir: &std::path::Path, port: u16, admin_port: u16) -> Self {
        Self::spawn(dir, port, admin_port, None).await
    }

    /// Waits until the admin listener accepts connections (it may open
    /// after the proxy port `spawn` waits for).
    pub async fn wait_admin(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the admin listener never opened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn spawn(dir: &std::path::Path, port: u16, admin_port: u16, nofile: Option<u32>) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("turnstile.log"))
            .unwrap();
        let mut command = match nofile {
            None => std::process::Command::new(env!("CARGO_BIN_EXE_turnstile")),
            Some(n) => {
                let mut c = std::process::Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\"")])
                    .arg(env!("CARGO_BIN_EXE_turnstile"));
                c
            }
        };
        let child = command
            .arg("--config")
            .arg(dir.join("turnstile.toml"))
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let b = Self {
            child,
            port,
            admin_port,
            dir: dir.to_path_buf(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "turnstile did not start: {}",
                b.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        b
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("turnstile.log")).unwrap_or_default()
    }

    /// Sends a signal (`"HUP"`, `"TERM"`, `"KILL"`).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "turnstile did not exit"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (bounded) until the logs contain `needle` (after `skip` bytes).
    pub async fn log_line(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {needle:?} in:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The balance `GET url` (an admin `/v1/credits?...` URL) answers, when it
/// answers 200.
pub async fn balance_at(url: &str) -> Option<i64> {
    let r = call("GET", url, None).await;
    (r.status == 200).then(|| r.json()["balance"].as_i64().unwrap())
}
