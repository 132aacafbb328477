//! A tiny fake generation API for trying turnstile: `cargo run --example mock-upstream`.
//!
//! Listens on 127.0.0.1:9000 (or `MOCK_UPSTREAM_ADDR`) and answers:
//! - `POST /v1/images/generations` → `{"id":"job_1","status":"queued",...}`
//! - `GET /v1/jobs/{id}` → the job, succeeded
//! - `GET /v1/events` → a server-sent event stream of 5 progress events
//! - `GET /health` → `{"status":"ok"}`
//!
//! Every JSON answer echoes the account and plan turnstile sent upstream.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use turnstile::body::{full, Body, BoxError};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("MOCK_UPSTREAM_ADDR").unwrap_or_else(|_| "127.0.0.1:9000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("mock generation API listening on http://{addr}");
    let jobs = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, jobs.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    jobs: Arc<AtomicU64>,
) -> Result<Response<Body>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let who = format!(
        "\"account\":\"{}\",\"plan\":\"{}\"",
        header("x-turnstile-account"),
        header("x-turnstile-plan")
    );
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // Drain the request body (uploads, prompts) before answering.
    let _ = req.into_body().collect().await;
    let response = match (method.as_str(), path.as_str()) {
        ("POST", "/v1/images/generations") => {
            let id = jobs.fetch_add(1, Ordering::Relaxed) + 1;
            json(
                200,
                format!("{{\"id\":\"job_{id}\",\"status\":\"queued\",{who}}}"),
            )
        }
        ("GET", p) if p.starts_with("/v1/jobs/") => {
            let id = &p["/v1/jobs/".len()..];
            json(200, format!("{{\"id\":\"{id}\",\"status\":\"succeeded\",\"url\":\"https://cdn.example.invalid/{id}.png\",{who}}}"))
        }
        ("GET", "/v1/events") => events(),
        (_, "/health") => json(200, "{\"status\":\"ok\"}".into()),
        _ => json(
            404,
            format!("{{\"error\":\"no such endpoint\",\"path\":\"{path}\"}}"),
        ),
    };
    Ok(response)
}

fn json(status: u16, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn events() -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    tokio::spawn(async move {
        for pct in [20, 40, 60, 80, 100] {
            let event = format!("event: progress\ndata: {{\"progress\":{pct}}}\n\n");
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/event-stream"),
    );
    r
}
