//! Step 6: the request streamed to the upstream and its answer back —
//! the target and headers as the upstream gets them (hop-by-hop headers
//! removed, `X-Forwarded-*`, the caller's account and plan), the body under
//! its size limits and stall timer, the exchange under the route's timeout.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use smallvec::SmallVec;

use super::{unmatched_label, Exchange, Identified, Turnstile};
use crate::config::{Policy, UpstreamSettings};
use crate::jobs::answer;
use crate::observe::trace::annotate;
use crate::respond::Refusal;
use crate::wire::body::{Body, BodyFault, BodyLimits, Deadline, LimitedBody, Trip};
use crate::wire::upstream::UpstreamError;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client end of a connection, its address formatted once for
/// `X-Forwarded-For` rather than once per request.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    ip: HeaderValue,
    /// `X-Forwarded-Proto`: `https` on a TLS connection.
    proto: HeaderValue,
    /// The connection's last key and its digest.
    memo: std::sync::Arc<crate::keys::identity::KeyMemo>,
}

impl Peer {
    /// Describes the client at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        // An IP address is always a valid header value.
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            addr,
            ip,
            proto: HeaderValue::from_static("http"),
            memo: Default::default(),
        }
    }

    /// The connection's last key and its digest.
    pub fn memo(&self) -> &crate::keys::identity::KeyMemo {
        &self.memo
    }

    /// The same client, on a TLS connection.
    pub fn over_tls(mut self) -> Self {
        self.proto = HeaderValue::from_static("https");
        self
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction
/// (`transfer-encoding` too: hyper frames each side's body itself).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

impl Turnstile {
    /// Streams the request to the upstream and its response back. With a
    /// job `watcher`, the exchange with the upstream runs on as its own task
    /// even if the client goes away (the job runs whether or not
    /// anyone waits for the answer).
    pub(super) async fn forward(
        &self,
        cx: &Exchange<'_>,
        parts: Parts,
        body: Body,
        watcher: Option<answer::Watcher>,
    ) -> Result<Response<Body>, Refusal> {
        let (live, route) = (cx.live, cx.route);
        let policy = &*live.policy;
        let timeout = route.map_or(policy.upstream.timeout, |r| r.timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let trip = Trip::default();
        let mut request = upstream_request(cx, parts, body, trip.clone())?;
        let span = self.child_span(cx, "turnstile.upstream", SpanKind::Client);
        self.inject(cx, span.as_ref(), request.headers_mut());

        let sent = std::time::Instant::now();
        let has_watcher = watcher.is_some();
        let upstream = live.upstream_of(route).clone();
        let exchange = async move {
            match tokio::time::timeout_at(deadline, upstream.send(request)).await {
                Err(_) => {
                    // The upstream may be running the work it did not answer for.
                    if let Some(w) = watcher {
                        w.unanswered().await;
                    }
                    Err(None)
                }
                Ok(Err(e)) => Err(Some(e)),
                Ok(Ok(response)) => {
                    let response = streamed_back(response, deadline);
                    Ok(match watcher {
                        Some(w) => w.answer(response).await,
                        None => response,
                    })
                }
            }
        };
        let result = if has_watcher {
            tokio::spawn(exchange)
                .await
                .unwrap_or_else(|e| Err(Some(UpstreamError::Task(e.to_string()))))
        } else {
            exchange.await
        };
        let took = sent.elapsed();
        if let Some(span) = &span {
            let status = result
                .as_ref()
                .map_or(0, |r| i64::from(r.status().as_u16()));
            annotate(span, [KeyValue::new("http.response.status_code", status)]);
        }
        drop(span);
        live.route_metrics(route).upstream_latency(took);
        cx.upstream_us.store(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1),
            std::sync::atomic::Ordering::Relaxed,
        );
        match result {
            Ok(response) => Ok(response),
            Err(None) => Err(Refusal::UpstreamTimeout(timeout)),
            Err(Some(e)) => Err(match trip.get() {
                Some(BodyFault::TooLarge(over)) => Refusal::PayloadTooLarge {
                    limit: over.limit,
                    pattern: over.pattern.clone(),
                    route: route.map_or_else(unmatched_label, |r| r.name.clone()),
                },
                Some(BodyFault::Stalled(idle)) => Refusal::RequestTimeout(*idle),
                Some(BodyFault::Broken(why)) => {
                    Refusal::BrokenBody(format!("malformed request body: {why}"))
                }
                None => Refusal::BadGateway(e.to_string()),
            }),
        }
    }
}

/// The request as the upstream gets it: its target and headers rewritten,
/// its body under the route's size limits and stall timer (`trip` records
/// why the body failed, if it does).
fn upstream_request(
    cx: &Exchange<'_>,
    parts: Parts,
    body: Body,
    trip: Trip,
) -> Result<Request<Body>, Refusal> {
    let policy = &*cx.live.policy;
    let unmatched_limits;
    let limits = match cx.route {
        Some(r) => &r.body,
        None => {
            unmatched_limits = BodyLimits {
                max: policy.server.max_body,
                by_type: Vec::new(),
            };
            &unmatched_limits
        }
    };
    let up = policy.upstream_of(cx.route);
    let uri = upstream_uri(up, &parts.uri)?;
    let mut headers = parts.headers;
    upstream_headers(
        policy,
        up,
        &mut headers,
        &parts.uri,
        cx.peer,
        cx.who.as_ref(),
    );
    headers.insert(
        super::request_id::X_REQUEST_ID.clone(),
        cx.request_id.clone(),
    );
    if cx.route.is_some_and(|r| r.reads_answer) {
        ask_for_whole_answer(&mut headers);
    }
    let body = LimitedBody::new(
        body,
        limits,
        content_type(&headers),
        policy.server.body_timeout,
        trip,
    )
    .boxed();
    let mut request = Request::new(body);
    *request.method_mut() = parts.method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok(request)
}

/// On a route whose answer is read: a partial or compressed answer is
/// never what is read, so the upstream is asked for the whole answer,
/// uncompressed (one compressed all the same is still decoded).
fn ask_for_whole_answer(headers: &mut HeaderMap) {
    headers.remove(header::RANGE);
    headers.remove(header::IF_RANGE);
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
}

/// The upstream's answer as the client gets it: hop-by-hop headers removed,
/// the body bounded by the exchange's deadline.
fn streamed_back(response: Response<Incoming>, deadline: tokio::time::Instant) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    // Framed by its chunked encoding (RFC 9112 §6.3): a Content-Length
    // beside it is not the body's length, and passed on would cut it.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Deadline::new(body, deadline).boxed())
}

/// The request headers as the upstream gets them: hop-by-hop headers and
/// spoofed account/plan headers removed, the caller's account and plan set,
/// `X-Forwarded-*` and `Host` as configured.
fn upstream_headers(
    policy: &Policy,
    up: &UpstreamSettings,
    headers: &mut HeaderMap,
    uri: &Uri,
    peer: &Peer,
    who: Option<&Identified<'_>>,
) {
    let original_host = request_host_header(headers, uri);
    strip_hop_by_hop(headers);
    headers.remove(&up.account_header);
    headers.remove(&up.plan_header);
    if let Some(who) = who {
        caller_headers(up, who, headers);
    }
    set_forwarded(
        policy.server.trust_forwarded,
        headers,
        peer,
        original_host.as_ref(),
    );
    match original_host {
        Some(h) if up.preserve_host => headers.insert(HOST, h),
        _ => headers.insert(HOST, up.host_header.clone()),
    };
}

/// The caller's account (its key's fingerprint when it has none) and plan,
/// in the upstream's account and plan headers.
pub(super) fn caller_headers(up: &UpstreamSettings, who: &Identified<'_>, headers: &mut HeaderMap) {
    let account = match &who.caller.account {
        Some(name) => HeaderValue::from_str(name).ok(),
        None => HeaderValue::from_str(who.caller.fingerprint.as_str()).ok(),
    };
    if let Some(account) = account {
        headers.insert(up.account_header.clone(), account);
    }
    headers.insert(up.plan_header.clone(), who.plan.header_value.clone());
}

/// The upstream target for a request: the configured base path plus the
/// path and query of the client's target, in origin-form.
fn upstream_uri(up: &UpstreamSettings, original: &Uri) -> Result<Uri, Refusal> {
    {
        let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
        // Only the path and query of the client's target are used: an
        // absolute-form target never chooses where the request goes.
        let pq = if up.base_path.is_empty() {
            PathAndQuery::try_from(pq)
        } else {
            PathAndQuery::try_from(format!("{}{}", up.base_path, pq))
        };
        let pq = pq.map_err(|_| Refusal::BadRequest("invalid request target".into()))?;
        // Origin-form: the connection already goes to the upstream.
        Ok(Uri::from(pq))
    }
}

/// Sets `X-Forwarded-For/-Proto/-Host`: replaced, or appended to when `trust`.
fn set_forwarded(trust: bool, headers: &mut HeaderMap, peer: &Peer, host: Option<&HeaderValue>) {
    {
        let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) if trust && !prior.trim().is_empty() => {
                HeaderValue::from_str(&format!("{prior}, {}", peer.addr.ip())).ok()
            }
            _ => Some(peer.ip.clone()),
        };
        if let Some(v) = xff {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        if !(trust && headers.contains_key(&X_FORWARDED_PROTO)) {
            headers.insert(X_FORWARDED_PROTO.clone(), peer.proto.clone());
        }
        if !(trust && headers.contains_key(&X_FORWARDED_HOST)) {
            match host {
                Some(h) => {
                    headers.insert(X_FORWARDED_HOST.clone(), h.clone());
                }
                None => {
                    headers.remove(&X_FORWARDED_HOST);
                }
            }
        }
    }
}

/// What step 5 decided for an admitted request.
fn request_host_header(headers: &HeaderMap, uri: &Uri) -> Option<HeaderValue> {
    headers.get(HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// The request's `Content-Type`, if readable.
pub(super) fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_TYPE)?.to_str().ok()
}

/// Removes hop-by-hop headers, including those named in `Connection`.
/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds the ones to drop; most messages carry
    // none, or only `connection: keep-alive`.
    let mut drop: SmallVec<[HeaderName; 4]> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name))
        .cloned()
        .collect();
    if drop.is_empty() {
        return;
    }
    for value in headers.get_all(CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            // `keep-alive` and `close` name no other header worth a lookup.
            if token.is_empty()
                || token.eq_ignore_ascii_case("keep-alive")
                || token.eq_ignore_ascii_case("close")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                drop.push(name);
            }
        }
    }
    for name in drop {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn end_to_end_headers_are_kept_untouched() {
        let mut h = map(&[("content-type", "application/json"), ("x-api-key", "k")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h,
            map(&[("content-type", "application/json"), ("x-api-key", "k")])
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Private"),
            ("connection", "close,x-other"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("x-private", "secret"),
            ("x-other", "secret"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h, map(&[("x-kept", "yes")]));
    }

    #[test]
    fn peer_ip_is_the_forwarded_for_value() {
        let peer = Peer::new("[::1]:4000".parse().unwrap());
        let mut h = HeaderMap::new();
        set_forwarded(false, &mut h, &peer, None);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = map(&[("x-forwarded-for", "10.0.0.1")]);
        set_forwarded(
            true,
            &mut h,
            &Peer::new("127.0.0.1:5".parse().unwrap()),
            None,
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }
}
