//! Request bodies read for a decision (a tool route, argument limits): read
//! whole, within the route's size limit, the body timeout and the global
//! `[server] max_buffered` budget, parsed strictly, then forwarded byte for
//! byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use crate::respond::Refusal;
use crate::wire::body::{Body, WithGuard};

/// Bytes of request bodies held for inspection, all requests together.
#[derive(Debug, Default)]
pub struct Budget {
    used: AtomicU64,
    max: AtomicU64,
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicU64::new(0),
            max: AtomicU64::new(max),
        })
    }

    /// Changes the ceiling (reload); bytes already held stay held.
    pub fn set_max(&self, max: u64) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes taken from a [`Budget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    fn new(budget: &Arc<Budget>) -> Self {
        Self {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Takes `n` more bytes, unless that would cross the ceiling.
    fn grow(&mut self, n: u64) -> bool {
        let max = self.budget.max.load(Ordering::Relaxed);
        let taken = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                (used + n <= max).then_some(used + n)
            });
        if taken.is_ok() {
            self.bytes += n;
        }
        taken.is_ok()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// How a body may be read for inspection.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits<'a> {
    /// Most bytes read (`[server] mcp_max_body`).
    pub max: u64,
    /// Longest wait between two chunks (`[server] body_timeout`).
    pub idle: Duration,
    /// The shared budget (`[server] max_buffered`).
    pub budget: &'a Arc<Budget>,
}

/// Why a body could not be inspected as JSON.
#[derive(Debug)]
pub enum BodyProblem {
    /// Longer than the limit (bytes).
    TooLarge(u64),
    /// The client's framing broke, or it went away.
    Broken(String),
    /// No chunk for this long.
    Stalled(Duration),
    /// The budget is spent.
    Overloaded(u64),
    /// A `Content-Encoding` other than identity.
    Encoded(String),
    /// Not declared JSON (`Content-Type`, as sent, if any).
    NotDeclaredJson(Option<String>),
    /// Not strict JSON.
    NotJson(String),
}

impl BodyProblem {
    /// As a refusal: JSON-RPC shaped (`rpc`, MCP endpoints) or plain.
    /// `route` names where the body was sent.
    pub fn refusal(&self, rpc: bool, route: &Arc<str>) -> Refusal {
        match self {
            BodyProblem::TooLarge(limit) if rpc => Refusal::JsonRpc {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: crate::content::mcp::INVALID_REQUEST,
                message: format!(
                    "request body exceeds {} (mcp_max_body)",
                    crate::wire::body::display_size(*limit)
                ),
            },
            BodyProblem::TooLarge(limit) => Refusal::PayloadTooLarge {
                limit: *limit,
                pattern: None,
                route: route.clone(),
            },
            BodyProblem::NotJson(e) if rpc => Refusal::JsonRpc {
                status: StatusCode::BAD_REQUEST,
                code: crate::content::mcp::PARSE_ERROR,
                message: format!("Parse error: {e}"),
            },
            BodyProblem::NotJson(e) => {
                Refusal::InvalidArguments(format!("request body is not valid JSON: {e}"))
            }
            BodyProblem::Broken(e) => {
                Refusal::BrokenBody(format!("could not read the request body: {e}"))
            }
            BodyProblem::Stalled(idle) => Refusal::RequestTimeout(*idle),
            BodyProblem::Overloaded(max) => Refusal::Overloaded(format!(
                "too many request bodies are held for inspection (max_buffered {}): retry shortly",
                crate::wire::body::display_size(*max)
            )),
            BodyProblem::Encoded(encoding) => Refusal::UnsupportedEncoding {
                encoding: encoding.clone(),
                route: route.clone(),
            },
            BodyProblem::NotDeclaredJson(_) if rpc => Refusal::JsonRpc {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code: crate::content::mcp::INVALID_REQUEST,
                message: "send the JSON-RPC message with Content-Type: application/json".into(),
            },
            BodyProblem::NotDeclaredJson(sent) => Refusal::NotJson {
                content_type: sent.clone(),
                route: route.clone(),
            },
        }
    }
}

/// The request body: streamed as it comes, or read whole once it had to be
/// inspected (then forwarded byte for byte, its budget held until then).
pub enum RequestBody {
    /// Not read.
    Streaming(Incoming),
    /// Read whole.
    Read {
        /// Exactly what the client sent.
        bytes: Bytes,
        /// Those bytes as strict JSON.
        json: Result<Value, String>,
        /// The budget the bytes take.
        held: Reservation,
    },
    /// Reading failed; nothing left to forward.
    Gone,
}

/// The declared `Content-Length`, if it is a number.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether a body is declared JSON: one `Content-Type`, `application/json`
/// or `application/*+json` (any parameters). Otherwise what was sent.
pub fn declared_json(headers: &HeaderMap) -> Result<(), Option<String>> {
    let mut all = headers.get_all(CONTENT_TYPE).iter();
    let first = all.next();
    let sent = || first.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let (Some(value), None) = (first, all.next()) else {
        return Err(sent());
    };
    let json = value.to_str().is_ok_and(|v| {
        crate::wire::body::is_media_type(v)
            && crate::wire::body::is_json(&crate::wire::body::media_type(v))
    });
    if json {
        Ok(())
    } else {
        Err(sent())
    }
}

/// The `Content-Encoding` of a body, unless it is absent or `identity`.
fn encoding(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CONTENT_ENCODING)?;
    let text = String::from_utf8_lossy(value.as_bytes()).trim().to_owned();
    (!text.eq_ignore_ascii_case("identity")).then_some(text)
}

async fn read_whole(
    mut incoming: Incoming,
    limits: ReadLimits<'_>,
) -> Result<(Bytes, Reservation), BodyProblem> {
    let mut held = Reservation::new(limits.budget);
    let mut buf: Vec<u8> = Vec::new();
    // The budget counts bytes received, never bytes merely declared. The
    // buffer for a declared length is reserved once, when its first bytes
    // arrive (exact, instead of doubling and copying as it grows; pages the
    // client never fills are never touched, so they cost no memory).
    let declared = hyper::body::Body::size_hint(&incoming)
        .exact()
        .unwrap_or(0)
        .min(limits.max);
    let declared = usize::try_from(declared).unwrap_or(0);
    loop {
        let frame = match tokio::time::timeout(limits.idle, incoming.frame()).await {
            Err(_) => return Err(BodyProblem::Stalled(limits.idle)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyProblem::Broken(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = data.len() as u64;
        if buf.len() as u64 + len > limits.max {
            return Err(BodyProblem::TooLarge(limits.max));
        }
        if !held.grow(len) {
            return Err(BodyProblem::Overloaded(
                limits.budget.max.load(Ordering::Relaxed),
            ));
        }
        if buf.capacity() == 0 {
            buf.reserve_exact(declared.max(data.len()));
        }
        buf.extend_from_slice(&data);
    }
    Ok((Bytes::from(buf), held))
}

impl RequestBody {
    /// The body as strict JSON, reading it first if needed.
    pub async fn json(
        &mut self,
        headers: &HeaderMap,
        limits: ReadLimits<'_>,
    ) -> Result<&Value, BodyProblem> {
        if let RequestBody::Streaming(_) = self {
            if let Some(encoding) = encoding(headers) {
                return Err(BodyProblem::Encoded(encoding));
            }
            declared_json(headers).map_err(BodyProblem::NotDeclaredJson)?;
            if content_length(headers).is_some_and(|len| len > limits.max) {
                return Err(BodyProblem::TooLarge(limits.max));
            }
            let RequestBody::Streaming(incoming) = std::mem::replace(self, RequestBody::Gone)
            else {
                return Err(BodyProblem::Broken("body already consumed".into()));
            };
            let (bytes, held) = read_whole(incoming, limits).await?;
            let json = crate::content::json::parse_strict(&bytes);
            *self = RequestBody::Read { bytes, json, held };
        }
        match self {
            RequestBody::Read { json: Ok(v), .. } => Ok(v),
            RequestBody::Read { json: Err(e), .. } => Err(BodyProblem::NotJson(e.clone())),
            _ => Err(BodyProblem::Broken("body already consumed".into())),
        }
    }

    /// The whole body, reading it first if needed (within `limits`, whose
    /// `max` is the route's body limit): for checks on the bytes themselves
    /// (media durations). Forwarded byte for byte afterwards.
    pub async fn hold(
        &mut self,
        headers: &HeaderMap,
        limits: ReadLimits<'_>,
    ) -> Result<&Bytes, BodyProblem> {
        if let RequestBody::Streaming(_) = self {
            if let Some(encoding) = encoding(headers) {
                return Err(BodyProblem::Encoded(encoding));
            }
            let RequestBody::Streaming(incoming) = std::mem::replace(self, RequestBody::Gone)
            else {
                return Err(BodyProblem::Broken("body already consumed".into()));
            };
            let (bytes, held) = read_whole(incoming, limits).await?;
            let json = Err("held as media, not read as JSON".to_owned());
            *self = RequestBody::Read { bytes, json, held };
        }
        match self {
            RequestBody::Read { bytes, .. } => Ok(bytes),
            _ => Err(BodyProblem::Broken("body already consumed".into())),
        }
    }

    /// Whether the request has no body at all (nothing to read as JSON).
    pub fn is_empty(&self) -> bool {
        match self {
            RequestBody::Streaming(incoming) => hyper::body::Body::is_end_stream(incoming),
            RequestBody::Read { bytes, .. } => bytes.is_empty(),
            RequestBody::Gone => true,
        }
    }

    /// The body as JSON, if it was read and parsed.
    pub fn parsed(&self) -> Option<&Value> {
        match self {
            RequestBody::Read { json: Ok(v), .. } => Some(v),
            _ => None,
        }
    }

    /// The JSON-RPC id, when the body was read and is a JSON object.
    pub fn rpc_id(&self) -> Option<&Value> {
        match self {
            RequestBody::Read { json: Ok(v), .. } => Some(v.get("id").unwrap_or(&Value::Null)),
            _ => None,
        }
    }

    /// The body to forward.
    pub fn into_body(self) -> Body {
        match self {
            RequestBody::Streaming(incoming) => incoming.map_err(Into::into).boxed(),
            RequestBody::Read { bytes, held, .. } => {
                WithGuard::new(crate::wire::body::full(bytes), held).boxed()
            }
            RequestBody::Gone => crate::wire::body::empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_never_overdrawn_and_comes_back() {
        let budget = Budget::new(100);
        let mut a = Reservation::new(&budget);
        let mut b = Reservation::new(&budget);
        assert!(a.grow(60));
        assert!(!b.grow(41));
        assert!(b.grow(40));
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(b.grow(60));
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
