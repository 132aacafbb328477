//! Delivery: each sink reads the ledger from the position it last
//! acknowledged, in order, one batch at a time (so each account's events
//! arrive in order), and moves its position only when the batch is
//! acknowledged — at least once, across restarts. A sink that fails is
//! retried with backoff; requests never wait for one. With Redis, every
//! instance holds the same events under the same ids, and one at a time
//! delivers each sink: its turn and position are kept in Redis.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use rusqlite::Connection;

use super::{db, event, lock, Ledger, SinkKind, SinkSettings};
use crate::wire::client::{tls_config, OriginClient};

/// The first retry's wait; doubled each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// One HTTP delivery's time limit.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Events a file sink appends at once.
const FILE_BATCH: usize = 1000;

/// Starts one delivery task per sink, and the hourly retention pass.
pub fn spawn_sinks(ledger: &Ledger) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks: Vec<_> = ledger
        .settings()
        .sinks
        .iter()
        .map(|s| tokio::spawn(deliver_forever(ledger.clone(), s.clone())))
        .collect();
    tasks.push(tokio::spawn(forget_forever(ledger.clone())));
    tasks
}

/// A sink's own connection to the ledger, used off the async threads.
#[derive(Clone)]
struct Reader(Arc<Mutex<Connection>>);

impl Reader {
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, String> {
        let conn = self.0.clone();
        match tokio::task::spawn_blocking(move || f(&lock(&conn))).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

async fn deliver_forever(ledger: Ledger, sink: SinkSettings) {
    let path = ledger.settings().path.clone();
    let reader = match tokio::task::spawn_blocking(move || db::open(&path)).await {
        Ok(Ok(c)) => Reader(Arc::new(Mutex::new(c))),
        _ => {
            tracing::error!(
                sink = &*sink.name,
                "ledger sink cannot open the ledger: nothing delivered"
            );
            return;
        }
    };
    let name = sink.name.to_string();
    let mut acked = reader.run(move |c| db::acked(c, &name)).await.unwrap_or(0);
    let mut client = match origin_client(&sink.kind) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(sink = &*sink.name, error = %e, "ledger sink cannot send: nothing delivered");
            return;
        }
    };
    let metrics = ledger.inner.metrics.clone();
    let mut written = ledger.inner.written.subscribe();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mine = my_turn(&ledger, &reader, &sink.name, &mut acked).await;
        let last = written.borrow().seq;
        let backlog = backlog(&ledger, &reader, last, acked).await;
        metrics.ledger().backlog(&sink.name, backlog);
        ledger.sink_status(&sink.name, |s| s.backlog = backlog);
        if !mine {
            let _ = tokio::time::timeout(Duration::from_secs(1), written.changed()).await;
            continue;
        }
        let batch = match &sink.kind {
            SinkKind::Http { batch, .. } => *batch,
            SinkKind::File { .. } => FILE_BATCH,
        };
        let rows = reader
            .run(move |c| db::after(c, acked, batch))
            .await
            .unwrap_or_default();
        let Some(last) = rows.last().map(|(seq, _)| *seq) else {
            // Caught up: wait for the next commit (or a second).
            let _ = tokio::time::timeout(Duration::from_secs(1), written.changed()).await;
            continue;
        };
        let bodies: Vec<String> = rows.into_iter().map(|(_, b)| b).collect();
        let n = bodies.len() as u64;
        match send(client.as_mut(), &ledger, &sink.kind, bodies).await {
            Ok(()) => {
                if let Some(redis) = ledger.redis() {
                    if !matches!(redis.move_sink(&sink.name, last).await, Ok(true)) {
                        tracing::warn!(sink = &*sink.name, "another instance took this ledger sink's turn during a delivery: its next batch may repeat events");
                    }
                }
                let name = sink.name.to_string();
                if let Err(e) = reader.run(move |c| db::ack(c, &name, last)).await {
                    tracing::warn!(sink = &*sink.name, error = %e, "ledger sink position not saved: the batch may be sent again after a restart");
                }
                acked = last;
                metrics.ledger().delivered(&sink.name, n);
                ledger.sink_status(&sink.name, |s| {
                    s.delivered += n;
                    s.error = None;
                });
                backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                metrics.ledger().failed(&sink.name);
                ledger.sink_status(&sink.name, |s| s.error = Some(e.clone()));
                if backoff == FIRST_BACKOFF {
                    tracing::warn!(sink = &*sink.name, error = %e, "ledger sink failed: retrying with backoff");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Events on disk after position `acked` (the last written is `last`).
/// Positions are dense without Redis; with it they are the stream's ids,
/// so the events are counted.
async fn backlog(ledger: &Ledger, reader: &Reader, last: u64, acked: u64) -> u64 {
    if ledger.redis().is_none() || last <= acked {
        return last.saturating_sub(acked);
    }
    reader
        .run(move |c| db::count_after(c, acked))
        .await
        .unwrap_or(0)
}

/// Whether this instance delivers `sink` now: always without Redis; with
/// it, while it holds the sink's turn (one instance at a time). `acked`
/// moves to where any instance delivered it (saved on this disk too).
async fn my_turn(ledger: &Ledger, reader: &Reader, sink: &str, acked: &mut u64) -> bool {
    let Some(redis) = ledger.redis() else {
        return true;
    };
    let mine = redis.sink_turn(sink).await.unwrap_or(false);
    let at = redis.sink_position(sink).await.unwrap_or(0);
    if at > *acked {
        let name = sink.to_owned();
        let _ = reader.run(move |c| db::ack(c, &name, at)).await;
        *acked = at;
    }
    mine
}

/// The client of an HTTP sink (none for a file).
fn origin_client(kind: &SinkKind) -> Result<Option<OriginClient>, String> {
    let SinkKind::Http { url, ca, .. } = kind else {
        return Ok(None);
    };
    let tls = match url.scheme_str() {
        Some("https") => Some(tls_config(ca.as_deref())?),
        _ => None,
    };
    OriginClient::new(url, tls).map(Some)
}

/// Delivers one batch; `Ok` once the sink has it.
async fn send(
    client: Option<&mut OriginClient>,
    ledger: &Ledger,
    kind: &SinkKind,
    bodies: Vec<String>,
) -> Result<(), String> {
    match (kind, client) {
        (SinkKind::Http { url, headers, .. }, Some(client)) => {
            let body = event::cloudevents(&ledger.inner.source, &bodies);
            let target = url.path_and_query().map_or("/", |p| p.as_str());
            let mut req = http::Request::post(target).header(
                http::header::CONTENT_TYPE,
                "application/cloudevents-batch+json",
            );
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let req = req
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let answer = tokio::time::timeout(HTTP_TIMEOUT, client.send(req))
                .await
                .map_err(|_| "no answer in time".to_owned())??;
            if answer.is_success() {
                Ok(())
            } else {
                Err(format!("answered {answer}"))
            }
        }
        (SinkKind::Http { .. }, None) => Err("no client".into()),
        (SinkKind::File { path }, _) => {
            let path = path.clone();
            let done = tokio::task::spawn_blocking(move || append_lines(&path, &bodies)).await;
            match done {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

/// Appends one line per event and syncs the file.
fn append_lines(path: &std::path::Path, bodies: &[String]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut buf = Vec::with_capacity(bodies.iter().map(|b| b.len() + 1).sum());
    for b in bodies {
        buf.extend_from_slice(b.as_bytes());
        buf.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&buf)?;
    f.sync_data()
}

/// Once an hour: drops the delivered events older than `retain`.
async fn forget_forever(ledger: Ledger) {
    let path = ledger.settings().path.clone();
    let Ok(Ok(conn)) = tokio::task::spawn_blocking(move || db::open(&path)).await else {
        return;
    };
    let reader = Reader(Arc::new(Mutex::new(conn)));
    let sinks: Vec<String> = ledger
        .settings()
        .sinks
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    let retain = ledger.settings().retain;
    loop {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let before = now_ms.saturating_sub(retain.as_millis() as i64);
        let sinks = sinks.clone();
        match reader.run(move |c| db::forget(c, before, &sinks)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "ledger: delivered events past retain dropped"),
            Err(e) => tracing::warn!(error = %e, "ledger retention pass failed"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
