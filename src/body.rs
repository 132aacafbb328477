//! Body types shared by the proxy and the refusal renderer, and the body
//! wrappers that enforce limits while streaming (never buffering).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use pin_project_lite::pin_project;

/// Any error a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response turnstile sends and every request it forwards.
pub type Body = BoxBody<Bytes, BoxError>;

/// A complete in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// The request body grew past its size limit while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit in bytes.
    pub limit: u64,
}

pin_project! {
    /// Passes a body through until it exceeds `limit` bytes, then fails (which
    /// aborts the upstream request) and raises `tripped`.
    pub struct Limited<B> {
        #[pin]
        inner: B,
        seen: u64,
        limit: u64,
        tripped: Arc<AtomicBool>,
    }
}

impl<B> Limited<B> {
    /// Wraps `inner`; `tripped` is set once the limit is crossed.
    pub fn new(inner: B, limit: u64, tripped: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            seen: 0,
            limit,
            tripped,
        }
    }
}

impl<B> HttpBody for Limited<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.seen > *this.limit {
                        this.tripped.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: *this.limit,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body outlived the exchange's deadline.
#[derive(Debug, thiserror::Error)]
#[error("exchange exceeded its timeout while streaming the response")]
pub struct StreamDeadline;

pin_project! {
    /// Passes a response body through until `deadline`, then fails (the
    /// client connection is closed: headers were already sent).
    pub struct Deadline<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl<B> Deadline<B> {
    /// Wraps `inner` with a deadline.
    pub fn new(inner: B, deadline: tokio::time::Instant) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep_until(deadline),
        }
    }
}

impl<B> HttpBody for Deadline<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(StreamDeadline)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
