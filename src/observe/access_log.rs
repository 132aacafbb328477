//! The access log (`[log] access = true`, docs/configuration.md, "Access
//! log"): one line per exchange, written when its response body is done
//! with. Lines travel over a bounded channel to a thread of their own, which
//! formats them (JSON in the shape of the other log lines, or pretty, as
//! `--log-format` says) and writes whatever is queued in one write to
//! standard error, where the other log lines go; a full channel drops the
//! line and counts it, so a request never waits for the log.

use std::fmt::Write as _;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::wire::body::BoxError;

/// Lines waiting to be written before new ones are dropped.
const CAPACITY: usize = 32_768;

/// How often the writer wakes to write what is queued. It is never woken
/// by a request: a wake-up per line would cost every request a context
/// switch. (Up to 3.2 million lines a second fit; past that they drop.)
const EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Most bytes gathered for one write.
const BATCH: usize = 64 * 1024;

/// Whether lines are JSON (`--log-format json`); set once at startup.
static JSON: AtomicBool = AtomicBool::new(false);

/// Makes access lines JSON (`true`) or pretty, like the other log lines.
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

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
    /// The exchange's id (`X-Request-Id`).
    pub request_id: Option<String>,
    /// What the request cost at admission (routes with a `cost`).
    pub cost: Option<u32>,
    /// The credits balance after admission (routes a credits limit covers).
    pub credits_balance: Option<i64>,
    /// The job the exchange started (known once its answer is read), polled
    /// or cancelled.
    pub job: Option<JobNote>,
}

/// Where an exchange notes the job it is about, for its access line (the
/// id of a submission's job is read from the answer while it streams).
pub type JobNote = Arc<std::sync::OnceLock<String>>;

/// What travels to the writer thread.
#[derive(Debug)]
enum Message {
    /// One line to write.
    Line(Box<AccessLine>),
    /// Write everything queued before this, then answer.
    Flush(SyncSender<()>),
}

/// The access log's sending end; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Starts the writer thread.
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<Message>(CAPACITY);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut batch = String::with_capacity(BATCH);
                loop {
                    std::thread::sleep(EVERY);
                    loop {
                        match rx.try_recv() {
                            Ok(Message::Line(l)) => format_line(&l, &mut batch),
                            Ok(Message::Flush(done)) => {
                                let _ = std::io::stderr().lock().write_all(batch.as_bytes());
                                batch.clear();
                                let _ = done.send(());
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => return,
                        }
                        if batch.len() >= BATCH {
                            let _ = std::io::stderr().lock().write_all(batch.as_bytes());
                            batch.clear();
                        }
                    }
                    if !batch.is_empty() {
                        let _ = std::io::stderr().lock().write_all(batch.as_bytes());
                        batch.clear();
                    }
                }
            })?;
        Ok(Self {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Queues a line, or drops and counts it if the writer is behind.
    pub fn send(&self, line: AccessLine) {
        match self.tx.try_send(Message::Line(Box::new(line))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits (up to `within`) until every line sent before the call is
    /// written: a graceful stop loses none.
    pub fn flush(&self, within: std::time::Duration) {
        let (done, written) = sync_channel(1);
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = written.recv_timeout(within);
        }
    }

    /// Lines dropped since start (`turnstile_access_log_dropped_total`).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Appends one line, JSON or pretty.
fn format_line(l: &AccessLine, out: &mut String) {
    let now = time::OffsetDateTime::now_utc();
    let stamp = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let json = JSON.load(Ordering::Relaxed);
    let mut fields = Fields {
        out,
        json,
        first: true,
    };
    if json {
        let _ = write!(
            fields.out,
            "{{\"timestamp\":\"{stamp}\",\"level\":\"INFO\",\"fields\":{{\"message\":\"access\""
        );
        fields.first = false;
    } else {
        let _ = write!(fields.out, "{stamp}  INFO turnstile::access: access");
    }
    fields.text("request_id", l.request_id.as_deref());
    fields.text("method", Some(&l.method));
    fields.text("path", Some(&l.path));
    fields.text("route", Some(&l.route));
    fields.text("plan", l.plan.as_deref());
    fields.text("key_fp", l.key_fp.as_deref());
    fields.text("account", l.account.as_deref());
    fields.number("status", Some(f64::from(l.status)));
    fields.text("decision", Some(l.decision));
    fields.text("limit", l.limit.as_deref());
    fields.number("upstream_ms", l.upstream_ms);
    fields.number("bytes_in", l.bytes_in.map(|n| n as f64));
    fields.number("bytes_out", Some(l.bytes_out as f64));
    fields.number(
        "duration_ms",
        Some((l.duration_ms * 1000.0).round() / 1000.0),
    );
    fields.number("cost", l.cost.map(f64::from));
    fields.number("credits_balance", l.credits_balance.map(|b| b as f64));
    fields.text(
        "job_id",
        l.job.as_ref().and_then(|j| j.get()).map(String::as_str),
    );
    if json {
        out.push_str("},\"target\":\"turnstile::access\"}\n");
    } else {
        out.push('\n');
    }
}

/// Writes `name=value` pairs (pretty) or `"name":value` members (JSON);
/// absent values are left out.
struct Fields<'a> {
    out: &'a mut String,
    json: bool,
    first: bool,
}

impl Fields<'_> {
    fn name(&mut self, name: &str) {
        if self.json {
            if !self.first {
                self.out.push(',');
            }
            self.out.push('"');
            self.out.push_str(name);
            self.out.push_str("\":");
        } else {
            self.out.push(' ');
            self.out.push_str(name);
            self.out.push('=');
        }
        self.first = false;
    }

    fn text(&mut self, name: &str, value: Option<&str>) {
        let Some(v) = value else { return };
        self.name(name);
        if self.json {
            self.out.push('"');
            crate::respond::json_escape_into(v, self.out);
            self.out.push('"');
        } else {
            // Pretty lines quote only what needs it.
            if v.contains([' ', '"', '=']) || v.is_empty() {
                let _ = write!(self.out, "{v:?}");
            } else {
                self.out.push_str(v);
            }
        }
    }

    fn number(&mut self, name: &str, value: Option<f64>) {
        let Some(v) = value else { return };
        self.name(name);
        let _ = write!(self.out, "{v}");
    }
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
        let (tx, _rx) = sync_channel::<Message>(2);
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
