//! Body types shared by the proxy and the refusal renderer, and the body
//! wrappers that enforce limits while streaming (never buffering).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

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

/// Renders a byte count the way operators write it: `10 MB`, `20 MiB`, or `1234 bytes`.
pub fn display_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 6] = [
        (1 << 30, "GiB"),
        (1_000_000_000, "GB"),
        (1 << 20, "MiB"),
        (1_000_000, "MB"),
        (1 << 10, "KiB"),
        (1_000, "KB"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

/// A route's body limits: the whole body, and by content type
/// (`image/png`, `image/*`, `*/*`; the most specific pattern wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyLimits {
    /// Default limit of the whole body, in bytes.
    pub max: u64,
    /// `(lower-case pattern, bytes)` pairs.
    pub by_type: Vec<(String, u64)>,
}

/// Which limit a body crossed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyTooLarge {
    /// The limit in bytes.
    pub limit: u64,
    /// The content-type pattern that set it, if any (`image/*`).
    pub pattern: Option<String>,
}

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body exceeds {} bytes", self.limit)?;
        if let Some(p) = &self.pattern {
            write!(f, " for {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BodyTooLarge {}

/// The media type of a `Content-Type` value, lower-cased, without parameters.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether a media type (as [`media_type`] gives it) is JSON:
/// `application/json` or `application/*+json`.
pub fn is_json(media: &str) -> bool {
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// The most specific entry of `(pattern, value)` pairs for a media type:
/// `image/png` over `image/*` over `*/*`.
pub fn most_specific<'a, T: Copy>(
    entries: &'a [(String, T)],
    media_type: &str,
) -> Option<(&'a str, T)> {
    let major = media_type.split('/').next().unwrap_or("");
    let rank = |pattern: &str| {
        if pattern == media_type {
            Some(3)
        } else if pattern.strip_suffix("/*") == Some(major) {
            Some(2)
        } else if pattern == "*/*" {
            Some(1)
        } else {
            None
        }
    };
    entries
        .iter()
        .filter_map(|(p, n)| rank(p).map(|r| (r, p.as_str(), *n)))
        .max_by_key(|(r, _, _)| *r)
        .map(|(_, p, n)| (p, n))
}

impl BodyLimits {
    /// The most specific `max_body_by_type` entry for a media type.
    pub fn for_type(&self, media_type: &str) -> Option<(&str, u64)> {
        most_specific(&self.by_type, media_type)
    }

    /// The limit on the whole body for a request `Content-Type`.
    pub fn whole(&self, content_type: Option<&str>) -> BodyTooLarge {
        let found = content_type.and_then(|ct| {
            let media = media_type(ct);
            self.for_type(&media).map(|(p, n)| (p.to_owned(), n))
        });
        match found {
            Some((pattern, limit)) => BodyTooLarge {
                limit,
                pattern: Some(pattern),
            },
            None => BodyTooLarge {
                limit: self.max,
                pattern: None,
            },
        }
    }
}

/// Why a request body stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFault {
    /// It crossed a size limit (413).
    TooLarge(BodyTooLarge),
    /// No byte came for `[server] body_timeout` (408).
    Stalled(std::time::Duration),
    /// The client's framing broke (malformed chunked encoding, connection
    /// cut mid-body): 400, and the connection is closed.
    Broken(String),
}

impl std::fmt::Display for BodyFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyFault::TooLarge(t) => t.fmt(f),
            BodyFault::Stalled(d) => {
                write!(f, "request body stalled: no data for {} s", d.as_secs_f64())
            }
            BodyFault::Broken(e) => write!(f, "malformed request body: {e}"),
        }
    }
}

impl std::error::Error for BodyFault {}

/// Where a [`LimitedBody`] body records why it stopped.
pub type Trip = Arc<OnceLock<BodyFault>>;

pin_project! {
    /// Passes a request body through while enforcing its limits: the whole
    /// body, for `multipart/form-data` each part against its own
    /// `Content-Type`, and the longest wait between two chunks. Past a limit,
    /// on a stall or on a framing error it fails (aborting the upstream
    /// request, which therefore never receives a complete request) and
    /// records why in its [`Trip`].
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        seen: u64,
        whole: BodyTooLarge,
        parts: Option<Box<MultipartScanner>>,
        trip: Trip,
        idle: std::time::Duration,
        // Armed the first time the client makes us wait: bodies that arrive
        // with their headers never touch the timer.
        stall: Option<Pin<Box<tokio::time::Sleep>>>,
        waiting: bool,
    }
}

impl<B> LimitedBody<B> {
    /// Guards `inner`, a body sent with `content_type`, against `limits`,
    /// cutting it when no chunk comes for `idle`.
    pub fn new(
        inner: B,
        limits: &BodyLimits,
        content_type: Option<&str>,
        idle: std::time::Duration,
        trip: Trip,
    ) -> Self {
        let parts = content_type
            .filter(|ct| media_type(ct) == "multipart/form-data" && !limits.by_type.is_empty())
            .and_then(multipart_boundary)
            .map(|boundary| Box::new(MultipartScanner::new(&boundary, limits.clone())));
        Self {
            inner,
            seen: 0,
            whole: limits.whole(content_type),
            parts,
            trip,
            idle,
            stall: None,
            waiting: false,
        }
    }
}

impl<B> HttpBody for LimitedBody<B>
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
        let fail = |trip: &Trip, fault: BodyFault| {
            let _ = trip.set(fault.clone());
            Poll::Ready(Some(Err(Box::new(fault) as BoxError)))
        };
        let polled = match this.inner.poll_frame(cx) {
            Poll::Ready(polled) => polled,
            Poll::Pending => {
                // The wait for the client starts now (not at the last chunk:
                // the upstream may have been slow to ask for the next one).
                let deadline = tokio::time::Instant::now() + *this.idle;
                let stall = match this.stall {
                    Some(stall) => {
                        if !*this.waiting {
                            stall.as_mut().reset(deadline);
                        }
                        stall
                    }
                    None => this
                        .stall
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                *this.waiting = true;
                return match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => fail(this.trip, BodyFault::Stalled(*this.idle)),
                    Poll::Pending => Poll::Pending,
                };
            }
        };
        *this.waiting = false;
        match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    let fault = if *this.seen > this.whole.limit {
                        Some(BodyFault::TooLarge(this.whole.clone()))
                    } else {
                        this.parts.as_mut().and_then(|p| p.feed(data))
                    };
                    if let Some(fault) = fault {
                        return fail(this.trip, fault);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let e: BoxError = e.into();
                fail(this.trip, BodyFault::Broken(e.to_string()))
            }
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

/// Whether a `Content-Type` value is one media type: `type/subtype` of
/// token characters, then parameters.
pub fn is_media_type(value: &str) -> bool {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    matches!(essence.split_once('/'), Some((t, sub)) if token(t) && token(sub))
}

/// The `boundary` parameter of a multipart `Content-Type`.
pub fn multipart_boundary(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim().trim_matches('"');
        (!value.is_empty() && value.len() <= 70).then(|| value.to_owned())
    })
}

/// Where the scanner is within a multipart body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Inside a part's content (or the preamble), looking for the delimiter.
    Content,
    /// Just after a delimiter: `--` ends the body, CRLF starts part headers.
    AfterDelimiter { dashes: u8 },
    /// Reading a part's headers up to the blank line.
    Headers,
    /// After the closing delimiter: ignored.
    Epilogue,
}

/// Follows a `multipart/form-data` body byte by byte, without buffering
/// content, and reports the first part whose size exceeds the limit of its
/// own `Content-Type`.
#[derive(Debug)]
pub struct MultipartScanner {
    delimiter: Vec<u8>,
    matched: usize,
    state: Scan,
    headers: Vec<u8>,
    part_bytes: u64,
    part_limit: Option<(String, u64)>,
    limits: BodyLimits,
}

/// Part headers longer than this are not kept (their Content-Type is then unknown).
const MAX_PART_HEADERS: usize = 16 * 1024;

impl MultipartScanner {
    /// A scanner for bodies delimited by `boundary`.
    pub fn new(boundary: &str, limits: BodyLimits) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        // The first delimiter may open the body without a preceding CRLF.
        Self {
            delimiter,
            matched: 2,
            state: Scan::Content,
            headers: Vec::new(),
            part_bytes: 0,
            part_limit: None,
            limits,
        }
    }

    /// Consumes the next bytes; returns the limit crossed or the part
    /// headers that cannot be read one way, if any.
    pub fn feed(&mut self, data: &[u8]) -> Option<BodyFault> {
        for &b in data {
            match self.state {
                Scan::Content => {
                    if b == self.delimiter[self.matched] {
                        self.matched += 1;
                        if self.matched == self.delimiter.len() {
                            self.matched = 0;
                            self.state = Scan::AfterDelimiter { dashes: 0 };
                        }
                        continue;
                    }
                    // The tentatively matched bytes were content after all.
                    let mut content = self.matched as u64;
                    self.matched = usize::from(b == self.delimiter[0]);
                    content += u64::from(self.matched == 0);
                    self.part_bytes += content;
                    if let Some((pattern, limit)) = &self.part_limit {
                        if self.part_bytes > *limit {
                            return Some(BodyFault::TooLarge(BodyTooLarge {
                                limit: *limit,
                                pattern: Some(pattern.clone()),
                            }));
                        }
                    }
                }
                Scan::AfterDelimiter { dashes } => match b {
                    b'-' if dashes == 1 => self.state = Scan::Epilogue,
                    b'-' => self.state = Scan::AfterDelimiter { dashes: 1 },
                    b'\n' => {
                        self.state = Scan::Headers;
                        self.headers.clear();
                    }
                    _ => {} // CR and transport padding
                },
                Scan::Headers => {
                    if self.headers.len() < MAX_PART_HEADERS {
                        self.headers.push(b);
                    }
                    if self.headers.ends_with(b"\r\n\r\n") || self.headers == b"\r\n" {
                        if let Err(fault) = self.start_part() {
                            return Some(fault);
                        }
                    }
                }
                Scan::Epilogue => return None,
            }
        }
        None
    }

    /// A part's headers are complete: its limit, by its one `Content-Type`.
    /// Two of them, or one that is not a media type, could be read two ways.
    fn start_part(&mut self) -> Result<(), BodyFault> {
        let text = String::from_utf8_lossy(&self.headers);
        let mut types = text.split("\r\n").filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-type")
                .then_some(value)
        });
        let content_type = types.next();
        if types.next().is_some() {
            return Err(BodyFault::Broken(
                "a multipart part has more than one Content-Type".into(),
            ));
        }
        if let Some(ct) = content_type {
            if !is_media_type(ct) {
                return Err(BodyFault::Broken(format!(
                    "a multipart part's Content-Type {:?} is not a media type",
                    ct.trim()
                )));
            }
        }
        self.part_limit = content_type
            .map(media_type)
            .and_then(|ct| self.limits.for_type(&ct).map(|(p, n)| (p.to_owned(), n)));
        self.part_bytes = 0;
        self.matched = 0;
        self.state = Scan::Content;
        Ok(())
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

pin_project! {
    /// Keeps `held` alive until the body is dropped: hyper drops a response
    /// body once it has been sent completely, or when the exchange ends any
    /// other way (client gone, upstream error), so a concurrency lease held
    /// here lasts exactly as long as the exchange.
    pub struct WithGuard<B, T> {
        #[pin]
        inner: B,
        held: T,
    }
}

impl<B, T> WithGuard<B, T> {
    /// Wraps `inner`, holding `held` until the body is dropped.
    pub fn new(inner: B, held: T) -> Self {
        Self { inner, held }
    }
}

impl<B: HttpBody, T> HttpBody for WithGuard<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
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

    fn limits() -> BodyLimits {
        BodyLimits {
            max: 100,
            by_type: vec![
                ("image/*".into(), 10),
                ("image/png".into(), 20),
                ("*/*".into(), 50),
            ],
        }
    }

    #[test]
    fn most_specific_type_wins() {
        let l = limits();
        assert_eq!(l.for_type("image/png"), Some(("image/png", 20)));
        assert_eq!(l.for_type("image/jpeg"), Some(("image/*", 10)));
        assert_eq!(l.for_type("text/plain"), Some(("*/*", 50)));
        assert_eq!(l.whole(Some("Image/PNG; q=1")).limit, 20);
        assert_eq!(
            l.whole(None),
            BodyTooLarge {
                limit: 100,
                pattern: None
            }
        );
    }

    fn multipart(parts: &[(&str, usize)]) -> Vec<u8> {
        let mut body = b"preamble\r\n".to_vec();
        for (ct, len) in parts {
            body.extend_from_slice(format!("--XyZ\r\nContent-Disposition: form-data; name=\"f\"\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
            // Content that almost looks like a delimiter must count as content.
            let filler = b"\r\n--Xy-";
            body.extend((0..*len).map(|i| filler[i % filler.len()]));
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--XyZ--\r\nepilogue");
        body
    }

    fn scan(body: &[u8], chunk: usize) -> Option<BodyTooLarge> {
        let mut s = MultipartScanner::new("XyZ", limits());
        body.chunks(chunk).find_map(|c| s.feed(c)).map(|f| match f {
            BodyFault::TooLarge(t) => t,
            other => panic!("{other}"),
        })
    }

    #[test]
    fn a_part_type_read_two_ways_is_refused() {
        for bad in [
            "image/png\r\nContent-Type: text/plain",
            "image",
            "image/png/x",
            "",
            "image /png",
        ] {
            let body = multipart(&[(bad, 20)]);
            let mut s = MultipartScanner::new("XyZ", limits());
            let fault = body.chunks(5).find_map(|c| s.feed(c));
            assert!(
                matches!(fault, Some(BodyFault::Broken(_))),
                "{bad:?}: {fault:?}"
            );
        }
        assert!(is_media_type("image/png; q=1") && is_media_type("application/vnd.a+json"));
    }

    #[test]
    fn multipart_parts_are_checked_against_their_own_type() {
        for chunk in [1, 3, 7, 1000] {
            assert_eq!(
                scan(
                    &multipart(&[("image/jpeg", 10), ("image/png", 20), ("text/plain", 50)]),
                    chunk
                ),
                None,
                "chunk {chunk}"
            );
            let over = scan(&multipart(&[("image/png", 20), ("image/jpeg", 11)]), chunk);
            assert_eq!(
                over,
                Some(BodyTooLarge {
                    limit: 10,
                    pattern: Some("image/*".into())
                }),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn boundary_parameter_is_read_quoted_or_not() {
        assert_eq!(
            multipart_boundary("multipart/form-data; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            multipart_boundary("multipart/form-data; charset=x; Boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(multipart_boundary("multipart/form-data"), None);
    }
}
