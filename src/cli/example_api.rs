//! The bundled example generation API (`turnstile example-api`): a tiny fake
//! upstream for the quickstart and the Docker compose example, so a newcomer
//! has something real behind the proxy without writing a server.
//!
//! It answers:
//! - `POST /v1/images/generations` → `{"id":"job_N","status":"queued",...}`
//! - `GET /v1/jobs/{id}` → the job, succeeded
//! - `POST /v1/videos` → `{"id":"vid_N","status":"queued"}`: an asynchronous
//!   generation that runs for [`VIDEO_TAKES`]; `GET /v1/videos/{id}` says
//!   `processing`, then `completed`; `POST /v1/videos/{id}/cancel` cancels it
//! - `GET /v1/events` → a server-sent event stream of 5 progress events
//! - `POST /billing/events` → receives turnstile's ledger events (a
//!   CloudEvents batch, as a billing system would); `GET
//!   /billing/events?account=A` lists those received for account `A`
//! - `GET /health` → `{"status":"ok"}`
//!
//! Every JSON answer echoes the account and plan turnstile sent upstream.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::wire::body::{full, Body, BoxError};

/// How long an example video generation runs.
pub const VIDEO_TAKES: Duration = Duration::from_secs(20);

/// Videos remembered at most (a demo: the oldest finished ones are forgotten).
const MAX_VIDEOS: usize = 10_000;

/// Billing events remembered at most (the oldest are forgotten).
const MAX_BILLED: usize = 10_000;

/// The example API's state: ids handed out (images and videos counted
/// apart, so the first video is `vid_1` whatever came before), and when
/// each video started.
#[derive(Default)]
struct State {
    ids: AtomicU64,
    video_ids: AtomicU64,
    videos: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Ledger events received, oldest first (each event's `data`).
    billed: Mutex<std::collections::VecDeque<serde_json::Value>>,
}

impl State {
    fn start_video(&self) -> String {
        let id = format!("vid_{}", self.video_ids.fetch_add(1, Ordering::Relaxed) + 1);
        let mut videos = self.videos.lock().unwrap_or_else(|p| p.into_inner());
        if videos.len() >= MAX_VIDEOS {
            videos.retain(|_, started| started.elapsed() < VIDEO_TAKES);
        }
        videos.insert(id.clone(), tokio::time::Instant::now());
        id
    }

    /// `processing` or `completed`; `None` for an unknown or cancelled id.
    fn video_status(&self, id: &str) -> Option<&'static str> {
        let videos = self.videos.lock().unwrap_or_else(|p| p.into_inner());
        let started = videos.get(id)?;
        Some(if started.elapsed() < VIDEO_TAKES {
            "processing"
        } else {
            "completed"
        })
    }

    fn cancel_video(&self, id: &str) -> bool {
        let mut videos = self.videos.lock().unwrap_or_else(|p| p.into_inner());
        videos.remove(id).is_some()
    }
}

/// Serves the example API on `listener` until the task is dropped; a
/// failing connection never stops the accept loop.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let jobs = Arc::new(State::default());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "example API: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, jobs.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, jobs: Arc<State>) -> Result<Response<Body>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let who = format!(
        "\"account\":{},\"plan\":{}",
        serde_json::Value::from(header("x-turnstile-account")),
        serde_json::Value::from(header("x-turnstile-plan"))
    );
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    // Read the request body (uploads, prompts) before answering.
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let response = match (method.as_str(), path.as_str()) {
        ("POST", "/billing/events") => jobs.bill(&body),
        ("GET", "/billing/events") => jobs.billed(&query),
        ("POST", "/v1/images/generations") => {
            let id = jobs.ids.fetch_add(1, Ordering::Relaxed) + 1;
            json(
                StatusCode::OK,
                format!("{{\"id\":\"job_{id}\",\"status\":\"queued\",{who}}}"),
            )
        }
        ("GET", p) if p.starts_with("/v1/jobs/") => {
            let id = serde_json::Value::from(&p["/v1/jobs/".len()..]);
            json(
                StatusCode::OK,
                format!("{{\"id\":{id},\"status\":\"succeeded\",{who}}}"),
            )
        }
        ("POST", "/v1/videos") => {
            let id = jobs.start_video();
            json(
                StatusCode::OK,
                format!("{{\"id\":\"{id}\",\"status\":\"queued\",{who}}}"),
            )
        }
        ("GET", p) if p.starts_with("/v1/videos/") => {
            let id = &p["/v1/videos/".len()..];
            video_answer(id, jobs.video_status(id), &who)
        }
        ("POST", p) if p.starts_with("/v1/videos/") && p.ends_with("/cancel") => {
            let id = &p["/v1/videos/".len()..p.len() - "/cancel".len()];
            video_answer(id, jobs.cancel_video(id).then_some("cancelled"), &who)
        }
        ("GET", "/v1/events") => events(),
        (_, "/health") => json(StatusCode::OK, "{\"status\":\"ok\"}".into()),
        _ => json(
            StatusCode::NOT_FOUND,
            format!(
                "{{\"error\":\"no such endpoint\",\"path\":{}}}",
                serde_json::Value::from(path)
            ),
        ),
    };
    Ok(response)
}

fn video_answer(id: &str, status: Option<&str>, who: &str) -> Response<Body> {
    let id = serde_json::Value::from(id);
    match status {
        Some(status) => json(
            StatusCode::OK,
            format!("{{\"id\":{id},\"status\":\"{status}\",{who}}}"),
        ),
        None => json(
            StatusCode::NOT_FOUND,
            format!("{{\"error\":\"no such video\",\"id\":{id}}}"),
        ),
    }
}

impl State {
    /// Keeps a CloudEvents batch's events; 400 if it is not one.
    fn bill(&self, body: &[u8]) -> Response<Body> {
        let Ok(serde_json::Value::Array(batch)) = serde_json::from_slice(body) else {
            return json(
                StatusCode::BAD_REQUEST,
                "{\"error\":\"expected a CloudEvents batch (a JSON array)\"}".into(),
            );
        };
        let mut billed = self.billed.lock().unwrap_or_else(|p| p.into_inner());
        let n = batch.len();
        for mut event in batch {
            billed.push_back(event["data"].take());
            if billed.len() > MAX_BILLED {
                billed.pop_front();
            }
        }
        json(StatusCode::OK, format!("{{\"received\":{n}}}"))
    }

    /// The events received for `?account=A` (all of them without one).
    fn billed(&self, query: &str) -> Response<Body> {
        let account = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "account")
            .map(|(_, v)| v.into_owned());
        let billed = self.billed.lock().unwrap_or_else(|p| p.into_inner());
        let events: Vec<&serde_json::Value> = billed
            .iter()
            .filter(|e| account.as_deref().is_none_or(|a| e["account"] == a))
            .collect();
        json(
            StatusCode::OK,
            serde_json::json!({ "events": events }).to_string(),
        )
    }
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Five progress events, 300 ms apart.
fn events() -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        for pct in [20, 40, 60, 80, 100] {
            let event = format!("event: progress\ndata: {{\"progress\":{pct}}}\n\n");
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut r = Response::new(BodyExt::boxed(ChannelBody(rx)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// A response body fed by a channel; it ends when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener));
        addr
    }

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_jobs_with_the_caller_echoed() {
        let addr = start().await;
        let out = get(
            addr,
            "POST /v1/images/generations HTTP/1.1\r\nhost: x\r\nx-turnstile-plan: pro\r\n\
             content-length: 2\r\nconnection: close\r\n\r\n{}",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(
            out.ends_with(
                "{\"id\":\"job_1\",\"status\":\"queued\",\"account\":\"\",\"plan\":\"pro\"}"
            ),
            "{out}"
        );
        let out = get(
            addr,
            "GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn videos_run_for_a_while_and_can_be_cancelled() {
        let addr = start().await;
        let post = |path: &str| {
            format!(
                "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
        };
        let get_req =
            |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        // Images before it (as in the quickstart) do not move the video ids.
        for _ in 0..3 {
            let out = get(addr, &post("/v1/images/generations")).await;
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        }
        let out = get(addr, &post("/v1/videos")).await;
        assert!(
            out.contains("{\"id\":\"vid_1\",\"status\":\"queued\""),
            "{out}"
        );
        let out = get(addr, &get_req("/v1/videos/vid_1")).await;
        assert!(out.contains("\"status\":\"processing\""), "{out}");
        tokio::time::advance(VIDEO_TAKES).await;
        let out = get(addr, &get_req("/v1/videos/vid_1")).await;
        assert!(out.contains("\"status\":\"completed\""), "{out}");
        get(addr, &post("/v1/videos")).await;
        let out = get(addr, &post("/v1/videos/vid_2/cancel")).await;
        assert!(out.contains("\"status\":\"cancelled\""), "{out}");
        let out = get(addr, &get_req("/v1/videos/vid_2")).await;
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn streams_five_progress_events() {
        let addr = start().await;
        let out = get(
            addr,
            "GET /v1/events HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(out.contains("text/event-stream"), "{out}");
        assert_eq!(out.matches("event: progress").count(), 5, "{out}");
        assert!(out.contains("{\"progress\":100}"), "{out}");
    }
}
