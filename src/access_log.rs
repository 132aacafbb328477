//! The access log (`[log] access = true`, docs/configuration.md, "Access
//! log"): one line per exchange, written when its response body is done
//! with. Lines travel over a bounded channel to a thread of their own, which
//! writes them through `tracing` (JSON or pretty, like every log line); a
//! full channel drops the line and counts it, so a request never waits for
//! the log.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::body::BoxError;

/// Lines waiting to be written before new ones are dropped.
const CAPACITY: usize = 8192;

/// One exchange as the access log shows it.
#[derive(Debug, Clone, Default)]
pub struct AccessLine {
    /// Request method.
    pub method: String,
    /// Request path (normal form, no query: it may carry keys).
    pub path: String,
    /// The route, or `(unmatched)`.
    pub route: Arc<str>,
    /// The caller's plan, once identified.
    pub plan: Option<Arc<str>>,
    /// The key's fingerprint (also for a refused key).
    pub key_fp: Option<String>,
    /// The caller's account.
    pub account: Option<Arc<str>>,
    /// The status sent.
    pub status: u16,
    /// `forwarded`, or the refusal's `error` code.
    pub decision: &'static str,
    /// The refusing limit (429, 402).
    pub limit: Option<Arc<str>>,
    /// Time to the upstream's response headers, when it was asked.
    pub upstream_ms: Option<f64>,
    /// The request body's declared length, when declared.
    pub bytes_in: Option<u64>,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// From the request's arrival to the end of its response body.
    pub duration_ms: f64,
}

/// The access log's sending end; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: SyncSender<AccessLine>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Starts the writer thread.
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<AccessLine>(CAPACITY);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                while let Ok(l) = rx.recv() {
                    write(&l);
                }
            })?;
        Ok(Self {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Queues a line, or drops and counts it if the writer is behind.
    pub fn send(&self, line: AccessLine) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines dropped since start (`turnstile_access_log_dropped_total`).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn write(l: &AccessLine) {
    tracing::info!(
        target: "turnstile::access",
        method = %l.method,
        path = %l.path,
        route = &*l.route,
        plan = l.plan.as_deref(),
        key_fp = l.key_fp.as_deref(),
        account = l.account.as_deref(),
        status = l.status,
        decision = l.decision,
        limit = l.limit.as_deref(),
        upstream_ms = l.upstream_ms,
        bytes_in = l.bytes_in,
        bytes_out = l.bytes_out,
        duration_ms = l.duration_ms,
        "access"
    );
}

pin_project_lite::pin_project! {
    /// A response body that counts what it sends and logs its exchange
    /// when it is dropped (sent in full, cut, or the client gone).
    pub struct Logged<B> {
        #[pin]
        inner: B,
        line: Option<AccessLine>,
        started: Instant,
        log: AccessLog,
    }

    impl<B> PinnedDrop for Logged<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut line) = this.line.take() {
                line.duration_ms = this.started.elapsed().as_secs_f64() * 1000.0;
                this.log.send(line);
            }
        }
    }
}

impl<B> Logged<B> {
    /// Wraps `inner`; `line` is sent with its byte count and duration.
    pub fn new(inner: B, line: AccessLine, started: Instant, log: AccessLog) -> Self {
        Self {
            inner,
            line: Some(line),
            started,
            log,
        }
    }
}

impl<B> HttpBody for Logged<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let (Some(data), Some(line)) = (frame.data_ref(), this.line.as_mut()) {
                line.bytes_out += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_waiting() {
        let (tx, _rx) = sync_channel::<AccessLine>(2);
        let log = AccessLog {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        for _ in 0..5 {
            log.send(AccessLine::default());
        }
        assert_eq!(log.dropped(), 3);
    }
}
