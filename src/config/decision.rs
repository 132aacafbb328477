//! `[decision]`: turnstile answering another gateway's "may this request
//! pass?" (forward auth, `ext_authz`, `auth_request`, Envoy's rate limit
//! service) instead of proxying. Only what can be decided before the
//! upstream answers, from the request line and headers, can be served
//! there: a route that needs the answer or the body is refused at load.

use std::net::SocketAddr;

use super::raw::{RawConfig, RawDecision};
use super::{listen_address, ConfigError, Plan, Route, Source};

/// Validated `[decision]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionSettings {
    /// The HTTP decision endpoint (`listen`).
    pub listen: Option<SocketAddr>,
    /// Stripped from the path of a request that carries no original URI
    /// header (Envoy `ext_authz` HTTP); empty: none.
    pub path_prefix: String,
    /// Envoy's rate limit service over gRPC (`grpc_listen`).
    pub grpc_listen: Option<SocketAddr>,
    /// Which routes are decided here, by index (every route when `routes`
    /// is not given).
    pub served: Vec<bool>,
    /// `[decision.envoy]`.
    pub envoy: EnvoySettings,
}

impl DecisionSettings {
    /// Whether `route` is decided by the decision endpoints.
    pub fn serves(&self, route: &Route) -> bool {
        self.served.get(route.index).copied().unwrap_or(false)
    }
}

/// How descriptors of Envoy's rate limit service map to turnstile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoySettings {
    /// The domain answered (another domain: OVER_LIMIT with the 401 body).
    pub domain: String,
    /// The descriptor entry whose value is the API key.
    pub key: String,
    /// The descriptor entry whose value names a route.
    pub route: String,
}

/// `[decision]` of `raw`, checked against the compiled routes and plans.
pub(super) fn compile_decision(
    src: &Source,
    raw: &RawConfig,
    routes: &[Route],
    plans: &[Plan],
) -> Result<Option<DecisionSettings>, ConfigError> {
    let Some(table) = &raw.decision else {
        return Ok(None);
    };
    let d: &RawDecision = table.get_ref();
    let listen = listen_address(src, d.listen.as_ref())?;
    let grpc_listen = listen_address(src, d.grpc_listen.as_ref())?;
    if listen.is_none() && grpc_listen.is_none() {
        return Err(src.at(
            table.span(),
            "[decision] needs listen (the HTTP decision endpoint), grpc_listen (Envoy's rate limit service) or both",
        ));
    }
    let path_prefix = match &d.path_prefix {
        None => String::new(),
        Some(p) if p.get_ref().starts_with('/') && !p.get_ref().contains(['?', '#']) => {
            p.get_ref().trim_end_matches('/').to_owned()
        }
        Some(p) => {
            return Err(src.at(
                p.span(),
                format!(
                    "path_prefix {:?} must be a path starting with '/'",
                    p.get_ref()
                ),
            ))
        }
    };
    let served = served_routes(src, raw, d, routes, plans)?;
    let envoy = &d.envoy;
    Ok(Some(DecisionSettings {
        listen,
        path_prefix,
        grpc_listen,
        served,
        envoy: EnvoySettings {
            domain: envoy.domain.clone().unwrap_or_else(|| "turnstile".into()),
            key: envoy.key.clone().unwrap_or_else(|| "api_key".into()),
            route: envoy.route.clone().unwrap_or_else(|| "route".into()),
        },
    }))
}

/// The routes decided here (all unless `routes` lists some), each checked:
/// a route that cannot be decided without the answer or the body is an
/// error at its name (or at its entry in `routes`).
fn served_routes(
    src: &Source,
    raw: &RawConfig,
    d: &RawDecision,
    routes: &[Route],
    plans: &[Plan],
) -> Result<Vec<bool>, ConfigError> {
    let mut served = vec![d.routes.is_none(); routes.len()];
    let mut at: Vec<std::ops::Range<usize>> =
        raw.routes.iter().map(|r| r.get_ref().name.span()).collect();
    for name in d.routes.iter().flatten() {
        let Some(route) = routes.iter().find(|r| *r.name == **name.get_ref()) else {
            let names: Vec<&str> = routes.iter().map(|r| &*r.name).collect();
            return Err(src.at(
                name.span(),
                format!(
                    "[decision] routes: unknown route {:?}: routes are {}",
                    name.get_ref(),
                    names.join(", ")
                ),
            ));
        };
        served[route.index] = true;
        at[route.index] = name.span();
    }
    for route in routes.iter().filter(|r| served[r.index]) {
        if let Some(why) = undecidable(route, plans) {
            return Err(src.at(
                at[route.index].clone(),
                format!(
                    "route {:?} cannot be decided by [decision]: {why}; list the routes a gateway asks about in [decision] routes = [...]",
                    route.name
                ),
            ));
        }
    }
    Ok(served)
}

/// Why a route cannot be decided before the upstream answers from the
/// request line and headers alone, if it cannot.
pub fn undecidable(route: &Route, plans: &[Plan]) -> Option<String> {
    let answer =
        "which needs the upstream's answer, and a gateway asking for a decision never shows it";
    let body = "which needs the request body, and a gateway asking for a decision does not send it";
    if !matches!(route.job, crate::jobs::JobRole::None) {
        return Some(format!(
            "it counts jobs (job, job_status or job_cancel), {answer}"
        ));
    }
    if route.capacity.is_some() {
        return Some(format!(
            "it takes a slot of a capacity pool, held until the exchange or the job ends, {answer}"
        ));
    }
    if route.settle.is_some() {
        return Some(format!("settle reads the cost from the answer, {answer}"));
    }
    if route.refund_on != crate::content::cost::RefundOn::default() {
        return Some(format!(
            "refund_on gives back on the answer's outcome, {answer}"
        ));
    }
    for plan in plans {
        let applied = plan.by_route.get(route.index).into_iter().flatten();
        for spec in applied.filter_map(|a| plan.limits.get(a.limit)) {
            if spec.rule.holds_slot() {
                return Some(format!(
                    "limit {:?} of plan {:?} holds a slot until the answer ends, {answer}",
                    spec.name, plan.name
                ));
            }
        }
    }
    if route.mcp_tool.is_some() || route.match_reads_json {
        return Some(format!(
            "its match reads the JSON body (mcp_tool or a json: condition), {body}"
        ));
    }
    if !route.arg_limits.is_empty() || !route.url_args.is_empty() {
        return Some(format!(
            "arg_limits and url_args read the JSON body, {body}"
        ));
    }
    if route.cost.as_ref().is_some_and(|c| c.needs_json()) {
        return Some(format!("its cost reads a json: value, {body}"));
    }
    if !route.media.is_empty() {
        return Some(format!(
            "max_duration_by_type measures uploaded media, {body}"
        ));
    }
    None
}
