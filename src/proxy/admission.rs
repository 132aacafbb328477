//! Steps 0, 2, 3 and 4: the request target in normal form, the caller and
//! its plan, then the checks that refuse before any limit is counted (plan
//! gating, declared body size, argument limits). None consumes quota.

use std::sync::Arc;

use http::header::{HeaderMap, HOST};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Uri};

use super::forward::content_type;
use super::Identified;
use crate::config::{Format, Policy, Route};
use crate::identity::{AuthError, Caller};
use crate::inspect::{content_length, Budget, ReadLimits, RequestBody};
use crate::mcp;
use crate::responses::Refusal;
use crate::values::RequestValues;

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
    let bad = |e: crate::path::PathError| Refusal::BadRequest(e.to_string());
    let raw = parts.uri.path();
    if parts
        .uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str() == "*")
    {
        return Err(bad(crate::path::PathError::NotOriginForm));
    }
    let normal = match crate::path::normalise(raw).map_err(bad)? {
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
    let cost_reads_json = route.cost.as_ref().is_some_and(|c| c.needs_json());
    if !route.arg_limits.is_empty() || route.job.needs_request_json() || cost_reads_json {
        let subject = route.mcp_tool.as_deref().unwrap_or(&route.name);
        let limits = ReadLimits {
            max: policy.server.mcp_max_body,
            idle: policy.server.body_timeout,
            budget,
        };
        return match body.json(headers, limits).await {
            Ok(message) => mcp::check_args(&route.arg_limits, message, subject)
                .map_err(Refusal::InvalidArguments),
            Err(problem) => Err(problem.refusal(route.format == Format::Mcp, &route.name)),
        };
    }
    Ok(())
}

/// What the request costs on `route` (docs/configuration.md, "Cost"): 1
/// without a `cost`; a value that cannot be priced is a 400.
pub(super) fn price(route: &Route, parts: &Parts, body: &RequestBody) -> Result<u32, Refusal> {
    let Some(cost) = &route.cost else {
        return Ok(1);
    };
    let form = crate::path::match_form(parts.uri.path());
    let values = RequestValues {
        headers: &parts.headers,
        path: &form,
        query: parts.uri.query(),
        pattern: &route.matcher.path,
        json: body.parsed(),
    };
    cost.of(|s| values.get(s))
        .map_err(Refusal::InvalidArguments)
}

/// The request's `Host`, or the authority of an absolute-form target.
pub(super) fn request_host(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
}
