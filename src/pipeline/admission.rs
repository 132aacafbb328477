//! Steps 0, 2, 3 and 4: the request target in normal form, the caller and
//! its plan, then the checks that refuse before any limit is counted (plan
//! gating, declared body size, media durations, argument limits, fetchable
//! URLs, the request's cost). None consumes quota.

use std::sync::Arc;

use http::header::{HeaderMap, HOST};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Uri};

use super::forward::content_type;
use super::Identified;
use crate::config::{Format, Policy, Route};
use crate::content::cost::Unpriced;
use crate::content::mcp;
use crate::content::media::MediaProblem;
use crate::content::values::RequestValues;
use crate::keys::identity::{AuthError, Caller};
use crate::pipeline::inspect::BodyProblem;
use crate::pipeline::inspect::{content_length, Budget, ReadLimits, RequestBody};
use crate::respond::{MediaTooLong, Refusal};
use crate::wire::body::{multipart_boundary, BodyFault, BodyTooLarge, MultipartScanner};

impl super::Turnstile {
    /// Identifies the caller of a request: keys file, runtime keys, default plan.
    pub(crate) fn identify(
        &self,
        policy: &Policy,
        peer: &super::Peer,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) -> Result<crate::keys::identity::Caller, crate::keys::identity::AuthError> {
        let plan = |name: &str| policy.plans.binary_search_by(|p| (*p.name).cmp(name)).ok();
        let lookup = crate::keys::identity::Lookup {
            runtime: self.keys.cache(),
            now: self.store.in_process().now() / crate::clock::SECOND,
            plan: &plan,
            memo: Some(peer.memo()),
        };
        policy.identity.identify(headers, query, &lookup)
    }

    /// Step 2: the caller (found early, or identified now) and its plan,
    /// kept in `cx.who`; the fingerprint of a refused key in `cx.refused_key`.
    pub(super) fn identify_caller(
        &self,
        cx: &mut super::Exchange<'_>,
        parts: &http::request::Parts,
    ) -> Result<(), Refusal> {
        let policy = &cx.live.policy;
        let caller = match cx.caller.take() {
            Some(caller) => Ok(caller),
            None => self.identify(policy, cx.peer, &parts.headers, parts.uri.query()),
        };
        if caller.is_err() {
            cx.refused_key = policy.identity.presented(&parts.headers, parts.uri.query());
        }
        cx.who = Some(identified(policy, caller)?);
        Ok(())
    }
}

/// Most header fields a request may carry, HTTP/1.1 and HTTP/2 alike.
pub const MAX_HEADERS: usize = 100;

/// Checks the request line and framing and puts the path in normal form
/// (the upstream receives it so): CONNECT → 405, too many header fields →
/// 431, an ambiguous path or a target that is not a path → 400.
pub(super) fn normalise_target(parts: &mut Parts) -> Result<(), Refusal> {
    if parts.method == Method::CONNECT {
        return Err(Refusal::MethodNotAllowed(Method::CONNECT));
    }
    if parts.headers.len() > MAX_HEADERS {
        return Err(Refusal::HeadersTooLarge(format!(
            "too many header fields ({}; at most {MAX_HEADERS})",
            parts.headers.len()
        )));
    }
    let bad = |e: crate::wire::path::PathError| Refusal::BadRequest(e.to_string());
    let raw = parts.uri.path();
    if parts
        .uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str() == "*")
    {
        return Err(bad(crate::wire::path::PathError::NotOriginForm));
    }
    let normal = match crate::wire::path::normalise(raw).map_err(bad)? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(normal) => normal,
    };
    let pq = match parts.uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = Some(
        PathAndQuery::try_from(pq)
            .map_err(|_| Refusal::BadRequest("invalid request target".into()))?,
    );
    parts.uri =
        Uri::from_parts(uri).map_err(|_| Refusal::BadRequest("invalid request target".into()))?;
    Ok(())
}

/// The caller with its plan, or the 401 to answer.
pub(super) fn identified(
    policy: &Policy,
    caller: Result<Caller, AuthError>,
) -> Result<Identified<'_>, Refusal> {
    let caller = caller.map_err(Refusal::Unauthorized)?;
    match policy.plans.get(caller.plan) {
        Some(plan) => Ok(Identified { plan, caller }),
        None => Err(Refusal::Unauthorized(AuthError::Unknown)),
    }
}

/// Plan gating, the declared body size, then argument limits (which read
/// the JSON body), in that order.
pub(super) async fn check_admission(
    policy: &Policy,
    budget: &Arc<Budget>,
    route: &Route,
    who: &Identified<'_>,
    headers: &HeaderMap,
    body: &mut RequestBody,
) -> Result<(), Refusal> {
    if let Some(allowed) = &route.plans {
        if !allowed.contains(&who.caller.plan) {
            return Err(Refusal::PlanRequired {
                route: route.name.clone(),
                plans: route.plan_names.clone(),
            });
        }
    }
    let whole = route.body.whole(content_type(headers));
    if content_length(headers).is_some_and(|len| len > whole.limit) {
        return Err(Refusal::PayloadTooLarge {
            limit: whole.limit,
            pattern: whole.pattern,
            route: route.name.clone(),
        });
    }
    if !route.media.is_empty() {
        check_media(policy, budget, route, headers, whole, body).await?;
    }
    // Argument limits and fetchable URLs need the body; `json:` values of a
    // price or a job id are absent from a request without one.
    let needs_body = !route.arg_limits.is_empty() || !route.url_args.is_empty();
    let reads_values =
        route.job.needs_request_json() || route.cost.as_ref().is_some_and(|c| c.needs_json());
    if needs_body || (reads_values && !body.is_empty()) {
        let subject = route.mcp_tool.as_deref().unwrap_or(&route.name);
        let limits = ReadLimits {
            max: policy.server.mcp_max_body,
            idle: policy.server.body_timeout,
            budget,
        };
        let message = match body.json(headers, limits).await {
            Ok(message) => message,
            Err(problem) => return Err(problem.refusal(route.format == Format::Mcp, &route.name)),
        };
        mcp::check_args(&route.arg_limits, message, subject).map_err(Refusal::InvalidArguments)?;
        let resolver = crate::content::urls::SystemResolver;
        let timeout = policy.server.resolve_timeout;
        crate::content::urls::check_args(&route.url_args, message, &resolver, timeout)
            .await
            .map_err(Refusal::InvalidArguments)?;
    }
    Ok(())
}

/// `max_duration_by_type` (docs/configuration.md, "Media duration"): a
/// body of a listed type, or any multipart body, is held (up to the
/// route's body limit) and every listed file in it measured before anything
/// reaches the upstream; the held bytes are forwarded as they came.
async fn check_media(
    policy: &Policy,
    budget: &Arc<Budget>,
    route: &Route,
    headers: &HeaderMap,
    whole: BodyTooLarge,
    body: &mut RequestBody,
) -> Result<(), Refusal> {
    let Some(ct) = content_type(headers) else {
        return Ok(());
    };
    let media = crate::wire::body::media_type(ct);
    let multipart = media == "multipart/form-data";
    if !multipart && route.media.for_type(&media).is_none() {
        return Ok(());
    }
    let limits = ReadLimits {
        max: whole.limit,
        idle: policy.server.body_timeout,
        budget,
    };
    let too_large = |limit: u64, pattern: Option<String>| Refusal::PayloadTooLarge {
        limit,
        pattern,
        route: route.name.clone(),
    };
    let bytes = match body.hold(headers, limits).await {
        Ok(bytes) => bytes,
        Err(BodyProblem::TooLarge(_)) => return Err(too_large(whole.limit, whole.pattern)),
        Err(problem) => return Err(problem.refusal(false, &route.name)),
    };
    // Each part's own size limit, before anything is forwarded.
    if let Some(boundary) = multipart.then(|| multipart_boundary(ct)).flatten() {
        let mut scanner = MultipartScanner::new(&boundary, route.body.clone());
        match scanner.feed(bytes) {
            None => {}
            Some(BodyFault::TooLarge(over)) => return Err(too_large(over.limit, over.pattern)),
            Some(fault) => return Err(Refusal::BadRequest(fault.to_string())),
        }
    }
    crate::content::media::check(bytes, ct, &route.media)
        .await
        .map_err(|problem| match problem {
            MediaProblem::TooLong {
                what,
                seconds,
                limit,
            } => Refusal::MediaTooLong(Box::new(MediaTooLong {
                what,
                duration_seconds: seconds,
                limit_seconds: limit,
                route: route.name.clone(),
            })),
            MediaProblem::Unreadable { what, reason } => Refusal::UnreadableMedia {
                what,
                reason,
                route: route.name.clone(),
            },
            MediaProblem::Malformed(m) => Refusal::BadRequest(m),
        })
}

/// What the request costs on `route` (docs/configuration.md, "Cost"): 1
/// without a `cost`; a value that cannot be priced is a 400, and so is an
/// ambiguous one (never the `default` price).
pub(super) fn price(route: &Route, parts: &Parts, body: &RequestBody) -> Result<u32, Refusal> {
    let Some(cost) = &route.cost else {
        return Ok(1);
    };
    let form = crate::wire::path::match_form(parts.uri.path());
    let values = request_values(route, parts, &form, body);
    cost.of(|s| values.get(s)).map_err(|e| match e {
        Unpriced::Value(m) => Refusal::InvalidArguments(m),
        Unpriced::Unreadable(a) => Refusal::BadRequest(a.to_string()),
    })
}

/// The job a status poll or cancel names (docs/configuration.md, "Jobs"),
/// read before any limit counts: an ambiguous id is a 400.
pub(super) fn job_id(
    route: &Route,
    parts: &Parts,
    body: &RequestBody,
) -> Result<Option<String>, Refusal> {
    let Some(source) = route.job.request_id() else {
        return Ok(None);
    };
    let form = crate::wire::path::match_form(parts.uri.path());
    let values = request_values(route, parts, &form, body);
    values
        .get(source)
        .map(|v| v.map(std::borrow::Cow::into_owned))
        .map_err(|a| Refusal::BadRequest(a.to_string()))
}

fn request_values<'a>(
    route: &'a Route,
    parts: &'a Parts,
    form: &'a str,
    body: &'a RequestBody,
) -> RequestValues<'a> {
    RequestValues {
        headers: &parts.headers,
        path: form,
        query: parts.uri.query(),
        pattern: &route.matcher.path,
        json: body.parsed(),
    }
}

/// The request's `Host`, or the authority of an absolute-form target.
pub(super) fn request_host(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
}
