//! One client connection's bounds in time: a connection that sends no
//! request within `header_timeout` of being accepted (silent clients, half
//! an HTTP/2 preface) is closed, and so is one with no exchange in flight for
//! `idle_timeout` (HTTP/1.1 keep-alive and HTTP/2 alike, the admin listener
//! too). On shutdown a connection is drained: what is in flight finishes,
//! then it closes.
//!
//! The clock is looked at where a connection waits for its client: reads
//! that find nothing to read while no exchange is in flight ([`Watched`]).
//! An exchange in progress costs one timestamp when it ends, nothing more.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// The time bounds of one client connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// From accept to the first complete request head.
    pub header_timeout: Duration,
    /// With no exchange in flight.
    pub idle_timeout: Duration,
}

/// What one connection is doing, shared by its exchanges and its reads.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    /// Bit `n % 64` set: the connection's `n`th request was a HEAD (its
    /// answer has no body, which the header-case writer needs to know).
    heads: AtomicU64,
    /// Bit `n % 64` set: the `n`th answer was made by turnstile.
    generated: AtomicU64,
    /// Milliseconds after `opened` of the last exchange's end.
    last_end_ms: AtomicU64,
    /// One more than the milliseconds after `opened` at which the first
    /// byte of the next request's head arrived (0: none yet).
    head_started_ms: AtomicU64,
    /// Bumped whenever a deadline may have moved earlier.
    epoch: AtomicU64,
}

impl Activity {
    /// A connection accepted now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            heads: AtomicU64::new(0),
            generated: AtomicU64::new(0),
            last_end_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
        })
    }

    /// An exchange begins; it ends when the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.begin_request(false)
    }

    /// An exchange for a request begins (`head`: a HEAD request); it ends
    /// when the guard is dropped.
    pub fn begin_request(self: &Arc<Self>, head: bool) -> Busy {
        let index = self.requests.fetch_add(1, Ordering::Relaxed);
        set_bit(&self.heads, index, head);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(0, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Release);
        Busy(self.clone(), index)
    }

    /// Bytes of a request arrived (on an HTTP/1.1 connection): when nothing
    /// is in flight they begin the next request's head, which must then be
    /// complete within `header_timeout`. (An idle keep-alive connection
    /// with no byte waits `idle_timeout`.)
    pub fn bytes_arrived(&self) {
        if self.busy()
            || self.requests.load(Ordering::Relaxed) == 0
            || self.head_started_ms.load(Ordering::Relaxed) != 0
        {
            return;
        }
        let ms = self.opened.elapsed().as_millis() as u64;
        self.head_started_ms.store(ms + 1, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Release);
    }

    /// Notes whether the `index`th answer is one turnstile made (before
    /// hyper writes it).
    pub fn set_generated(&self, index: u64, generated: bool) {
        set_bit(&self.generated, index, generated);
    }

    /// What the connection's `index`th exchange (from 0) was; good for the
    /// 64 most recent.
    pub fn marks(&self, index: u64) -> Marks {
        let bit = 1u64 << (index % 64);
        Marks {
            head: self.heads.load(Ordering::Acquire) & bit != 0,
            generated: self.generated.load(Ordering::Acquire) & bit != 0,
        }
    }
}

/// What the connection's `n`th exchange was: a HEAD request (no body in
/// the answer), an answer turnstile made itself (every name of it is
/// turnstile's to spell).
#[derive(Debug, Clone, Copy, Default)]
pub struct Marks {
    /// The request was a HEAD.
    pub head: bool,
    /// The response was made by turnstile, not forwarded.
    pub generated: bool,
}

/// Sets bit `index % 64` of `bits` to `on` (no write when it already is
/// off: the common case costs a load).
fn set_bit(bits: &AtomicU64, index: u64, on: bool) {
    let bit = 1u64 << (index % 64);
    if on {
        bits.fetch_or(bit, Ordering::Release);
    } else if bits.load(Ordering::Relaxed) & bit != 0 {
        bits.fetch_and(!bit, Ordering::Release);
    }
}

impl Activity {
    /// Whether an exchange is in flight.
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// When a connection with nothing in flight is to be closed.
    fn idle_deadline(&self, limits: ConnLimits) -> Instant {
        if self.requests.load(Ordering::Relaxed) == 0 {
            return self.opened + limits.header_timeout;
        }
        let last = Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed));
        let idle = self.opened + last + limits.idle_timeout;
        match self.head_started_ms.load(Ordering::Relaxed) {
            0 => idle,
            started => {
                let head = self.opened + Duration::from_millis(started - 1) + limits.header_timeout;
                idle.min(head)
            }
        }
    }
}

/// One exchange in flight on a connection (and its index on it); dropping
/// it ends the exchange.
#[derive(Debug)]
pub struct Busy(Arc<Activity>, u64);

impl Busy {
    /// The exchange's index on its connection, from 0.
    pub fn index(&self) -> u64 {
        self.1
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_end_ms.fetch_max(ms, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project! {
    /// A client socket that fails its reads (closing the connection) once
    /// the connection has waited for its client past [`ConnLimits`].
    pub struct Watched<T> {
        #[pin]
        io: T,
        activity: Arc<Activity>,
        limits: ConnLimits,
        // Created at the first wait; reset only when the deadline moved
        // earlier or when it fired early. `registered`: polled since, so its
        // waker is set and `is_elapsed` tells whether it fired.
        timer: Option<Pin<Box<Sleep>>>,
        registered: bool,
        // The activity's epoch when the deadline was last computed.
        seen: u64,
    }
}

impl<T> Watched<T> {
    /// Watches `io`, a connection whose exchanges report to `activity`.
    pub fn new(io: T, activity: Arc<Activity>, limits: ConnLimits) -> Self {
        Self {
            io,
            activity,
            limits,
            timer: None,
            registered: false,
            seen: 0,
        }
    }
}

impl<T: AsyncRead> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if let Poll::Ready(read) = this.io.poll_read(cx, buf) {
            return Poll::Ready(read);
        }
        if this.activity.busy() {
            return Poll::Pending;
        }
        // The deadline can only have moved earlier if an exchange happened
        // or a head began since it was last looked at.
        let epoch = this.activity.epoch.load(Ordering::Acquire);
        let timer = match this.timer {
            Some(timer) if *this.seen == epoch => timer,
            Some(timer) => {
                *this.seen = epoch;
                let due = this.activity.idle_deadline(*this.limits);
                if due < timer.deadline() {
                    timer.as_mut().reset(due);
                    *this.registered = false;
                }
                timer
            }
            None => {
                *this.seen = epoch;
                *this.registered = false;
                let due = this.activity.idle_deadline(*this.limits);
                this.timer.insert(Box::pin(tokio::time::sleep_until(due)))
            }
        };
        loop {
            if *this.registered && !timer.is_elapsed() {
                return Poll::Pending;
            }
            if timer.as_mut().poll(cx).is_pending() {
                *this.registered = true;
                return Poll::Pending;
            }
            // Fired: closed, unless the deadline moved on meanwhile.
            let due = this.activity.idle_deadline(*this.limits);
            if due <= Instant::now() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle past header_timeout / idle_timeout",
                )));
            }
            timer.as_mut().reset(due);
            *this.registered = false;
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Drives one connection to its end; on shutdown (`stopping` turning true
/// or its sender gone) drains it with `drain`: in-flight exchanges finish,
/// then it closes.
pub async fn serve<C, E>(conn: C, drain: impl Fn(Pin<&mut C>), mut stopping: watch::Receiver<bool>)
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let mut drained = *stopping.borrow();
    if drained {
        drain(conn.as_mut());
    }
    loop {
        tokio::select! {
            biased;
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = stopping.changed(), if !drained => {
                if changed.is_err() || *stopping.borrow() {
                    drain(conn.as_mut());
                    drained = true;
                }
            }
        }
    }
}
