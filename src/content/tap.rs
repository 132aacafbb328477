//! Reading an upstream answer while it streams to the client (response-side value
//! sources, docs/configuration.md). A [`Tap`] passes every frame on as it
//! comes, unchanged, and keeps a copy of at most `max` bytes (decoded, when
//! the answer is compressed: [`crate::content::decode`]); once it has the JSON
//! document the answer carries — the whole body for `application/json` and
//! `*+json`, or for `text/event-stream` the `data` of the event carrying the
//! JSON-RPC response to the request's id, or without one the first event
//! in which a pointer looked for has a value — it hands the [`Doc`] to its
//! reader, once. A body that is too long, cannot be decoded, breaks off, or
//! whose stream ends without the answer hands over [`Doc::Unreadable`].
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

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::content::decode::{DecodeError, Decoder};
use crate::content::json::pointer::{lookup, Malformed};
use crate::wire::body::{Body, BoxError};

/// Work a reader does with the document, polled before the answer ends.
pub type Follow = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What receives the document, once.
pub type Reader = Box<dyn FnOnce(Doc) -> Option<Follow> + Send>;

/// What an answer carried, as far as turnstile could read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Doc {
    /// The JSON document (a whole body, or one event's data), checked only
    /// where a value is looked up ([`Doc::value`]).
    Json(Bytes),
    /// Read to its end, and nothing in it is what was looked for (an event
    /// stream whose events carry none of the pointers); also what an answer
    /// read for headers alone has.
    Nothing,
    /// Could not be read, and why.
    Unreadable(&'static str),
}

impl Doc {
    /// The value at `pointer`: `Ok(None)` when the document is readable and
    /// has nothing there.
    pub fn value(&self, pointer: &str) -> Result<Option<Value>, Malformed> {
        match self {
            Doc::Json(bytes) => lookup(bytes, pointer),
            Doc::Nothing => Ok(None),
            Doc::Unreadable(why) => Err(Malformed(why)),
        }
    }
}

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
        let ct =
            crate::wire::body::media_type(headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?);
        if crate::wire::body::is_json(&ct) {
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
    buf: Vec<u8>,
    /// Decoded bytes seen, in all (the bound counts these).
    seen: usize,
    /// SSE: the JSON-RPC id to look for (`None`: the pointers instead).
    rpc_id: Option<Value>,
    /// SSE without an id: the pointers whose value makes an event the one.
    wanted: Vec<String>,
    /// SSE: an event that was not JSON went by.
    malformed: bool,
    /// The answer's content coding, decoded on the side.
    decoder: Option<Decoder>,
}

enum Scan {
    /// Not yet.
    More,
    /// Found, or given up.
    Done(Doc),
}

impl Scanner {
    fn feed(&mut self, data: &[u8]) -> Scan {
        let before = self.buf.len();
        match &mut self.decoder {
            Some(decoder) => {
                if let Err(e) = decoder.feed(data, &mut self.buf) {
                    return Scan::Done(Doc::Unreadable(decode_problem(e)));
                }
            }
            None => {
                if self.seen + data.len() > self.max {
                    return Scan::Done(Doc::Unreadable(TOO_LARGE));
                }
                self.buf.extend_from_slice(data);
            }
        }
        self.seen += self.buf.len() - before;
        if self.seen > self.max {
            return Scan::Done(Doc::Unreadable(TOO_LARGE));
        }
        match self.framing {
            Framing::Json => Scan::More,
            Framing::Sse => self.events(),
        }
    }

    /// The end of the body: a JSON body is complete now.
    fn finish(&mut self) -> Doc {
        if let Some(decoder) = &mut self.decoder {
            if let Err(e) = decoder.finish(&mut self.buf) {
                return Doc::Unreadable(decode_problem(e));
            }
            if self.buf.len() > self.max {
                return Doc::Unreadable(TOO_LARGE);
            }
        }
        match self.framing {
            Framing::Json => Doc::Json(Bytes::from(std::mem::take(&mut self.buf))),
            Framing::Sse => match self.events() {
                Scan::Done(doc) => doc,
                Scan::More if self.rpc_id.is_some() => {
                    Doc::Unreadable("the event stream ended without the answer to the request")
                }
                Scan::More if self.malformed => Doc::Unreadable("an event was not JSON"),
                Scan::More => Doc::Nothing,
            },
        }
    }

    /// Looks at every complete event not yet looked at (and forgets it).
    fn events(&mut self) -> Scan {
        let mut scanned = 0;
        let found = loop {
            let rest = &self.buf[scanned..];
            let Some((len, sep)) = event_end(rest) else {
                break None;
            };
            let data = event_data(&rest[..len]);
            scanned += len + sep;
            let Some(data) = data else { continue };
            if self.is_the_answer(&data) {
                break Some(data);
            }
        };
        self.buf.drain(..scanned);
        match found {
            Some(data) => Scan::Done(Doc::Json(Bytes::from(data))),
            None => Scan::More,
        }
    }

    /// Whether an event's data is the document looked for.
    fn is_the_answer(&mut self, data: &[u8]) -> bool {
        let Some(id) = &self.rpc_id else {
            let mut any = false;
            for p in &self.wanted {
                match lookup(data, p) {
                    Ok(Some(_)) => return true,
                    Ok(None) => {}
                    Err(_) => any = true,
                }
            }
            self.malformed |= any;
            return false;
        };
        let answers = |p: &str| matches!(lookup(data, p), Ok(Some(_)));
        match lookup(data, "/id") {
            Ok(Some(v)) => {
                crate::content::mcp::same_id(&v, id) && (answers("/result") || answers("/error"))
            }
            Ok(None) => false,
            Err(_) => {
                self.malformed = true;
                false
            }
        }
    }
}

const BROKE_OFF: &str = "the answer broke off";

const TOO_LARGE: &str = "larger than the read bound (mcp_max_body)";

fn decode_problem(e: DecodeError) -> &'static str {
    match e {
        DecodeError::TooLarge => TOO_LARGE,
        DecodeError::Corrupt => "its content coding could not be decoded",
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

/// An event's `data:` lines, joined with newlines (`None`: it has none).
fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    let mut any = false;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(d) = line.strip_prefix(b"data:") {
            if any {
                data.push(b'\n');
            }
            any = true;
            data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
        }
    }
    any.then_some(data)
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

/// How an answer is to be read.
#[derive(Debug)]
pub struct Reading {
    /// How it carries its document.
    pub framing: Framing,
    /// Most (decoded) bytes read.
    pub max: u64,
    /// The request's JSON-RPC id, to find its answer in an event stream.
    pub rpc_id: Option<Value>,
    /// Without an id: the pointers whose value makes an event the one.
    pub wanted: Vec<String>,
    /// The answer's content coding, when it has one.
    pub decoder: Option<Decoder>,
}

impl Tap {
    /// Wraps `inner`, an answer read as `reading` says.
    pub fn new(inner: Body, reading: Reading, reader: Reader) -> Self {
        Self {
            inner: Some(inner),
            scanner: Scanner {
                framing: reading.framing,
                max: usize::try_from(reading.max).unwrap_or(usize::MAX),
                buf: Vec::new(),
                seen: 0,
                rpc_id: reading.rpc_id.filter(|id| !id.is_null()),
                wanted: reading.wanted,
                malformed: false,
                decoder: reading.decoder,
            },
            reader: Mutex::new(Some(reader)),
            follow: Mutex::new(None),
            held: None,
            ended: false,
        }
    }

    fn hand_over(&mut self, doc: Doc) {
        if let Some(reader) = slot(&mut self.reader).take() {
            *slot(&mut self.follow) = reader(doc);
            self.scanner.buf = Vec::new();
            self.scanner.decoder = None;
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
                this.hand_over(Doc::Unreadable(BROKE_OFF));
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
            reader(Doc::Unreadable(BROKE_OFF));
            return;
        };
        let mut scanner = Scanner {
            framing: self.scanner.framing,
            max: self.scanner.max,
            buf: std::mem::take(&mut self.scanner.buf),
            seen: self.scanner.seen,
            rpc_id: self.scanner.rpc_id.take(),
            wanted: std::mem::take(&mut self.scanner.wanted),
            malformed: self.scanner.malformed,
            decoder: self.scanner.decoder.take(),
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
                    Some(Err(_)) => break Doc::Unreadable(BROKE_OFF),
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
    use std::io::Write as _;
    use std::sync::{Arc, Mutex};

    fn scanner(framing: Framing, rpc_id: Option<Value>) -> Scanner {
        Scanner {
            framing,
            max: 1024,
            buf: Vec::new(),
            seen: 0,
            rpc_id,
            wanted: vec!["/result/job_id".into()],
            malformed: false,
            decoder: None,
        }
    }

    fn found(scan: Scan) -> Doc {
        match scan {
            Scan::Done(doc) => doc,
            Scan::More => panic!("not found yet"),
        }
    }

    #[test]
    fn finds_the_event_answering_the_request_id() {
        let mut s = scanner(Framing::Sse, Some(Value::from(7)));
        let stream = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n\
                      data: {\"jsonrpc\":\"2.0\",\"id\":7.0,\r\ndata: \"result\":{\"job_id\":\"j-1\"}}\r\n\r\n";
        let (a, b) = stream.split_at(40);
        assert!(matches!(s.feed(a.as_bytes()), Scan::More));
        let doc = found(s.feed(b.as_bytes()));
        assert_eq!(doc.value("/result/job_id"), Ok(Some(Value::from("j-1"))));
    }

    #[test]
    fn without_an_id_each_event_is_searched_in_turn() {
        let mut s = scanner(Framing::Sse, None);
        let stream =
            "data: ping\n\ndata: {\"progress\":1}\n\ndata: {\"result\":{\"job_id\":\"j-2\"}}\n\n";
        let doc = found(s.feed(stream.as_bytes()));
        assert_eq!(doc.value("/result/job_id"), Ok(Some(Value::from("j-2"))));
        // A stream that ends without it: nothing, unless an event was not JSON.
        let mut s = scanner(Framing::Sse, None);
        assert!(matches!(s.feed(b"data: {\"a\":1}\n\n"), Scan::More));
        assert_eq!(s.finish(), Doc::Nothing);
        let mut s = scanner(Framing::Sse, None);
        assert!(matches!(s.feed(b"data: {\"a\":\n\n"), Scan::More));
        assert!(matches!(s.finish(), Doc::Unreadable(_)));
        // With an id, a stream without its answer is unreadable.
        let mut s = scanner(Framing::Sse, Some(Value::from(1)));
        assert!(matches!(
            s.feed(b"data: {\"id\":2,\"result\":{}}\n\n"),
            Scan::More
        ));
        assert!(matches!(s.finish(), Doc::Unreadable(_)));
    }

    #[test]
    fn json_is_complete_only_at_the_end_and_bounded() {
        let mut s = scanner(Framing::Json, None);
        assert!(matches!(s.feed(b"{\"id\":"), Scan::More));
        assert!(matches!(s.feed(b"\"x\"}"), Scan::More));
        assert_eq!(s.finish().value("/id"), Ok(Some(Value::from("x"))));
        let mut s = scanner(Framing::Json, None);
        assert!(matches!(
            s.feed(&[b' '; 1025]),
            Scan::Done(Doc::Unreadable(_))
        ));
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn coded(name: &str, max: usize) -> Decoder {
        let mut h = HeaderMap::new();
        h.insert("content-encoding", name.parse().unwrap());
        match crate::content::decode::Coding::of(&h, max) {
            crate::content::decode::Coding::Known(d) => d,
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn compressed_answers_are_decoded_and_bombs_bounded() {
        let body = gzip(b"{\"id\":\"vid_4\",\"status\":\"queued\"}");
        let mut s = scanner(Framing::Json, None);
        s.decoder = Some(coded("gzip", 1024));
        for chunk in body.chunks(3) {
            assert!(matches!(s.feed(chunk), Scan::More));
        }
        assert_eq!(s.finish().value("/id"), Ok(Some(Value::from("vid_4"))));
        // 1 MB of spaces in a few KB: over the bound, unreadable.
        let bomb = gzip(&vec![b' '; 1 << 20]);
        let mut s = scanner(Framing::Json, None);
        s.decoder = Some(coded("gzip", 1024));
        assert!(matches!(
            s.feed(&bomb),
            Scan::Done(Doc::Unreadable(TOO_LARGE))
        ));
        // Cut short: unreadable.
        let mut s = scanner(Framing::Json, None);
        s.decoder = Some(coded("gzip", 1024));
        let _ = s.feed(&body[..body.len() - 4]);
        assert!(matches!(s.finish(), Doc::Unreadable(_)));
    }

    #[test]
    fn every_supported_coding_round_trips() {
        let text = b"{\"id\":\"j-9\"}";
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(text).unwrap();
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(text).unwrap();
        }
        let zstd = zstd::encode_all(&text[..], 3).unwrap();
        for (name, body) in [
            ("gzip", gzip(text)),
            ("x-gzip", gzip(text)),
            ("deflate", zlib.finish().unwrap()),
            ("br", br),
            ("zstd", zstd.clone()),
        ] {
            let mut s = scanner(Framing::Json, None);
            s.decoder = Some(coded(name, 1024));
            for chunk in body.chunks(2) {
                assert!(matches!(s.feed(chunk), Scan::More), "{name}");
            }
            assert_eq!(
                s.finish().value("/id"),
                Ok(Some(Value::from("j-9"))),
                "{name}"
            );
        }
        let mut s = scanner(Framing::Json, None);
        s.decoder = Some(coded("zstd", 1024));
        let _ = s.feed(&zstd[..zstd.len() - 3]);
        assert!(matches!(s.finish(), Doc::Unreadable(_)), "zstd cut short");
    }

    #[test]
    fn codings_not_decoded_are_unknown() {
        for v in ["compress", "gzip, br", "exotic"] {
            let mut h = HeaderMap::new();
            h.insert("content-encoding", v.parse().unwrap());
            assert!(
                matches!(
                    crate::content::decode::Coding::of(&h, 10),
                    crate::content::decode::Coding::Unknown
                ),
                "{v}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert("content-encoding", "identity".parse().unwrap());
        for h in [h, HeaderMap::new()] {
            assert!(matches!(
                crate::content::decode::Coding::of(&h, 10),
                crate::content::decode::Coding::Identity
            ));
        }
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

    fn reading() -> Reading {
        Reading {
            framing: Framing::Json,
            max: 1024,
            rpc_id: None,
            wanted: Vec::new(),
            decoder: None,
        }
    }

    #[tokio::test]
    async fn the_reader_runs_before_the_body_ends_and_every_byte_passes() {
        let seen = Arc::new(Mutex::new(None));
        let s2 = seen.clone();
        let reader: Reader = Box::new(move |doc| {
            *s2.lock().unwrap() = Some(doc);
            None
        });
        let body = crate::wire::body::full("{\"id\":\"abc\"}");
        let mut tap = Tap::new(body, reading(), reader);
        let mut out = Vec::new();
        while let Some(frame) = tap.frame().await {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(out, b"{\"id\":\"abc\"}");
        let doc = seen.lock().unwrap().clone().unwrap();
        assert_eq!(doc.value("/id"), Ok(Some(Value::from("abc"))));
    }

    #[tokio::test]
    async fn a_client_gone_early_still_gets_the_document_read() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reader: Reader = Box::new(move |doc| {
            let _ = tx.send(doc);
            None
        });
        let body = crate::wire::body::full("{\"id\":\"late\"}");
        drop(Tap::new(body, reading(), reader));
        let doc = rx.await.unwrap();
        assert_eq!(doc.value("/id"), Ok(Some(Value::from("late"))));
    }
}
