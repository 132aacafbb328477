//! Reading an upstream answer while it streams to the client (response-side value
//! sources, docs/configuration.md). A [`Tap`] passes every frame on as it
//! comes and keeps a copy of at most `max` bytes; once it has the JSON
//! document the answer carries — the whole body for `application/json` and
//! `*+json`, or for `text/event-stream` the `data` of the event carrying the
//! JSON-RPC response to the request's id (the first event when the request
//! had none) — it hands the document to its reader, once. A body that is
//! not JSON, too long or broken hands over `None`.
//!
//! What the reader does (end a job, settle a cost) happens before the
//! client sees the end of the answer: a reader's future is polled to
//! completion before the frame that completed the document is passed on
//! (SSE) or before the end of the body is (JSON). If the client goes away
//! first, the rest of the answer is read in the background, bounded by
//! `max` and by the exchange's deadline, so the reader still runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::body::{Body, BoxError};

/// Work a reader does with the document, polled before the answer ends.
pub type Follow = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What receives the document (or `None`), once.
pub type Reader = Box<dyn FnOnce(Option<Value>) -> Option<Follow> + Send>;

/// How an answer carries its document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The whole body is one JSON document.
    Json,
    /// Server-sent events; the document is one event's `data`.
    Sse,
}

impl Framing {
    /// The framing of an answer with these headers, if it is readable.
    pub fn of(headers: &HeaderMap) -> Option<Self> {
        let ct = headers
            .get(http::header::CONTENT_TYPE)?
            .to_str()
            .ok()?
            .split(';')
            .next()?
            .trim()
            .to_ascii_lowercase();
        if ct == "application/json" || (ct.starts_with("application/") && ct.ends_with("+json")) {
            Some(Framing::Json)
        } else if ct == "text/event-stream" {
            Some(Framing::Sse)
        } else {
            None
        }
    }
}

/// Finds the document in the bytes seen so far.
struct Scanner {
    framing: Framing,
    max: usize,
    buf: BytesMut,
    /// SSE: bytes of `buf` already split into events.
    scanned: usize,
    /// SSE: the JSON-RPC id to look for (`None`: the first event).
    rpc_id: Option<Value>,
}

enum Scan {
    /// Not yet.
    More,
    /// Found (or given up: `None`).
    Done(Option<Value>),
}

impl Scanner {
    fn feed(&mut self, data: &[u8]) -> Scan {
        if self.buf.len() + data.len() > self.max {
            return Scan::Done(None);
        }
        self.buf.extend_from_slice(data);
        match self.framing {
            Framing::Json => Scan::More,
            Framing::Sse => self.events(),
        }
    }

    /// The end of the body: a JSON body is complete now.
    fn finish(&mut self) -> Option<Value> {
        match self.framing {
            Framing::Json => crate::json::parse_strict(&self.buf).ok(),
            Framing::Sse => match self.events() {
                Scan::Done(v) => v,
                Scan::More => None,
            },
        }
    }

    /// Looks at every complete event not yet looked at.
    fn events(&mut self) -> Scan {
        loop {
            let rest = &self.buf[self.scanned..];
            let Some((len, sep)) = event_end(rest) else {
                return Scan::More;
            };
            let event = &rest[..len];
            self.scanned += len + sep;
            let Some(doc) = event_data(event) else {
                continue;
            };
            match &self.rpc_id {
                None => return Scan::Done(Some(doc)),
                Some(id) => {
                    let answers = doc.get("id") == Some(id)
                        && (doc.get("result").is_some() || doc.get("error").is_some());
                    if answers {
                        return Scan::Done(Some(doc));
                    }
                }
            }
        }
    }
}

/// Length of the first event in `bytes` and of the blank line ending it.
fn event_end(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            if bytes.get(i + 1) == Some(&b'\n') {
                return Some((i, 2));
            }
            if bytes.get(i + 1) == Some(&b'\r') && bytes.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

/// The JSON of an event's `data:` lines (joined with newlines).
fn event_data(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data = String::new();
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    if data.is_empty() {
        return None;
    }
    crate::json::parse_strict(data.as_bytes()).ok()
}

/// A response body that hands its document to a [`Reader`] as it streams.
/// (The reader and its future sit in mutexes only to make the body `Sync`,
/// as hyper's boxed bodies must be; they are reached through `get_mut`,
/// never locked.)
pub struct Tap {
    inner: Option<Body>,
    scanner: Scanner,
    reader: Mutex<Option<Reader>>,
    follow: Mutex<Option<Follow>>,
    /// A frame held while `follow` runs.
    held: Option<Frame<Bytes>>,
    /// The inner body ended while `follow` runs.
    ended: bool,
}

impl Tap {
    /// Wraps `inner`, whose answer is framed as `framing`; at most `max`
    /// bytes are kept. `rpc_id`: the request's JSON-RPC id, for SSE.
    pub fn new(
        inner: Body,
        framing: Framing,
        max: u64,
        rpc_id: Option<Value>,
        reader: Reader,
    ) -> Self {
        Self {
            inner: Some(inner),
            scanner: Scanner {
                framing,
                max: usize::try_from(max).unwrap_or(usize::MAX),
                buf: BytesMut::new(),
                scanned: 0,
                rpc_id: rpc_id.filter(|id| !id.is_null()),
            },
            reader: Mutex::new(Some(reader)),
            follow: Mutex::new(None),
            held: None,
            ended: false,
        }
    }

    fn hand_over(&mut self, doc: Option<Value>) {
        if let Some(reader) = slot(&mut self.reader).take() {
            *slot(&mut self.follow) = reader(doc);
            self.scanner.buf = BytesMut::new();
        }
    }

    fn reading(&mut self) -> bool {
        slot(&mut self.reader).is_some()
    }
}

/// The value in a mutex only ever reached through `&mut`.
fn slot<T>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Tap {}

impl HttpBody for Tap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(follow) = slot(&mut this.follow) {
            if follow.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            *slot(&mut this.follow) = None;
        }
        if let Some(frame) = this.held.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if !this.reading() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                let mut scan = match frame.data_ref() {
                    Some(data) => this.scanner.feed(data),
                    None => Scan::More,
                };
                // The last bytes of a body of known length: the client may
                // consider the answer complete once it has them, so the
                // document is handed over before they are passed on.
                if matches!(scan, Scan::More) && this.scanner.framing == Framing::Json {
                    let body = this.inner.as_ref();
                    let complete =
                        body.is_some_and(|b| b.is_end_stream() || b.size_hint().exact() == Some(0));
                    if complete {
                        scan = Scan::Done(this.scanner.finish());
                    }
                }
                match scan {
                    Scan::More => Poll::Ready(Some(Ok(frame))),
                    Scan::Done(doc) => {
                        this.hand_over(doc);
                        this.held = Some(frame);
                        Pin::new(this).poll_frame(cx)
                    }
                }
            }
            Poll::Ready(None) => {
                if this.reading() {
                    let doc = this.scanner.finish();
                    this.hand_over(doc);
                    this.ended = true;
                    return Pin::new(this).poll_frame(cx);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.hand_over(None);
                this.inner = None;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // The end is reported only once the reader has run: while it may
        // still run, say "not yet" (the mutexes are never held, so
        // `try_lock` only fails if poisoned).
        matches!(self.reader.try_lock().as_deref(), Ok(None))
            && matches!(self.follow.try_lock().as_deref(), Ok(None))
            && self.held.is_none()
            && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}

impl Drop for Tap {
    /// The client went away before the document was found: read on in the
    /// background (the inner body carries the exchange's deadline).
    fn drop(&mut self) {
        let follow = slot(&mut self.follow).take();
        let Some(reader) = slot(&mut self.reader).take() else {
            if let (Some(follow), Ok(rt)) = (follow, tokio::runtime::Handle::try_current()) {
                rt.spawn(follow);
            }
            return;
        };
        let (Some(mut inner), Ok(rt)) = (self.inner.take(), tokio::runtime::Handle::try_current())
        else {
            reader(None);
            return;
        };
        let mut scanner = Scanner {
            buf: std::mem::take(&mut self.scanner.buf),
            rpc_id: self.scanner.rpc_id.take(),
            ..self.scanner
        };
        rt.spawn(async move {
            let doc = loop {
                match inner.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            if let Scan::Done(doc) = scanner.feed(data) {
                                break doc;
                            }
                        }
                    }
                    Some(Err(_)) => break None,
                    None => break scanner.finish(),
                }
            };
            if let Some(follow) = reader(doc) {
                follow.await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn scanner(framing: Framing, rpc_id: Option<Value>) -> Scanner {
        Scanner {
            framing,
            max: 1024,
            buf: BytesMut::new(),
            scanned: 0,
            rpc_id,
        }
    }

    #[test]
    fn finds_the_event_answering_the_request_id() {
        let mut s = scanner(Framing::Sse, Some(Value::from(7)));
        let stream = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n\
                      data: {\"jsonrpc\":\"2.0\",\"id\":7,\r\ndata: \"result\":{\"job_id\":\"j-1\"}}\r\n\r\n";
        let (a, b) = stream.split_at(40);
        assert!(matches!(s.feed(a.as_bytes()), Scan::More));
        match s.feed(b.as_bytes()) {
            Scan::Done(Some(doc)) => assert_eq!(doc["result"]["job_id"], "j-1"),
            _ => panic!("the answer was not found"),
        }
    }

    #[test]
    fn json_is_complete_only_at_the_end_and_bounded() {
        let mut s = scanner(Framing::Json, None);
        assert!(matches!(s.feed(b"{\"id\":"), Scan::More));
        assert!(matches!(s.feed(b"\"x\"}"), Scan::More));
        assert_eq!(s.finish(), Some(serde_json::json!({"id": "x"})));
        let mut s = scanner(Framing::Json, None);
        assert!(matches!(s.feed(&[b' '; 1025]), Scan::Done(None)));
    }

    #[test]
    fn framing_by_content_type() {
        let h = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert("content-type", ct.parse().unwrap());
            Framing::of(&h)
        };
        assert_eq!(h("application/json; charset=utf-8"), Some(Framing::Json));
        assert_eq!(h("application/problem+json"), Some(Framing::Json));
        assert_eq!(h("text/event-stream"), Some(Framing::Sse));
        assert_eq!(h("text/plain"), None);
    }

    #[tokio::test]
    async fn the_reader_runs_before_the_body_ends_and_every_byte_passes() {
        let seen = Arc::new(Mutex::new(None));
        let s2 = seen.clone();
        let reader: Reader = Box::new(move |doc| {
            *s2.lock().unwrap() = Some(doc);
            None
        });
        let body = crate::body::full("{\"id\":\"abc\"}");
        let mut tap = Tap::new(body, Framing::Json, 1024, None, reader);
        let mut out = Vec::new();
        while let Some(frame) = tap.frame().await {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(out, b"{\"id\":\"abc\"}");
        assert_eq!(
            seen.lock().unwrap().clone(),
            Some(Some(serde_json::json!({"id": "abc"})))
        );
    }

    #[tokio::test]
    async fn a_client_gone_early_still_gets_the_document_read() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reader: Reader = Box::new(move |doc| {
            let _ = tx.send(doc);
            None
        });
        let body = crate::body::full("{\"id\":\"late\"}");
        drop(Tap::new(body, Framing::Json, 1024, None, reader));
        assert_eq!(rx.await.unwrap(), Some(serde_json::json!({"id": "late"})));
    }
}
