//! `[[routes]]`: matchers, body limits, jobs, argument limits, plan gating.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use http::Method;
use toml::Spanned;

use crate::content::mcp::ArgLimit;
use crate::content::routing::{PathPattern, RouteMatcher};
use crate::content::values::{Side, ValueSource};
use crate::jobs::JobRole;
use crate::respond::ResponseSet;
use crate::wire::body::BodyLimits;

use super::raw::{RawArgLimit, RawFormat, RawRoute};
use super::server::add_responses;
use super::units::{parse_size, RawSize};
use super::{
    content, duration, plan_index, size, ConfigError, Format, Plans, Route, ServerSettings, Source,
    UpstreamSettings,
};

/// Every `[[routes]]` entry in file order; names must be unique.
pub(super) fn compile_routes(
    src: &Source,
    raw: &[Spanned<RawRoute>],
    server: &ServerSettings,
    upstreams: Upstreams<'_>,
    global: &Arc<ResponseSet>,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes = Vec::with_capacity(raw.len());
    let mut names = HashSet::new();
    for r in raw {
        let r = r.get_ref();
        if !names.insert(r.name.get_ref().clone()) {
            return Err(src.at(
                r.name.span(),
                format!("duplicate route name {:?}", r.name.get_ref()),
            ));
        }
        let upstream = route_upstream(src, r, upstreams)?;
        let settings = upstream.map_or(upstreams.0, |i| &upstreams.1[i].1);
        let mut route = compile_route(src, r, server, settings, global)?;
        route.upstream = upstream;
        route.index = routes.len();
        routes.push(route);
    }
    Ok(routes)
}

/// `[upstream]` and the named `[upstreams.NAME]`.
type Upstreams<'a> = (&'a UpstreamSettings, &'a [(Arc<str>, UpstreamSettings)]);

/// The named upstream a route's `upstream` names, if it names one.
fn route_upstream(
    src: &Source,
    r: &RawRoute,
    (_, named): Upstreams<'_>,
) -> Result<Option<usize>, ConfigError> {
    let Some(name) = &r.upstream else {
        return Ok(None);
    };
    match named.iter().position(|(n, _)| **n == **name.get_ref()) {
        Some(i) => Ok(Some(i)),
        None if named.is_empty() => Err(src.at(
            name.span(),
            format!(
                "unknown upstream {:?}: no [upstreams.NAME] table is defined",
                name.get_ref()
            ),
        )),
        None => {
            let names: Vec<&str> = named.iter().map(|(n, _)| &**n).collect();
            Err(src.at(
                name.span(),
                format!(
                    "unknown upstream {:?}: upstreams are {}",
                    name.get_ref(),
                    names.join(", ")
                ),
            ))
        }
    }
}

/// Plan gating: each route's `plans = [...]` resolved to plan indices.
pub(super) fn gate_routes(
    src: &Source,
    routes: &mut [Route],
    raw: &[Spanned<RawRoute>],
    known: &Plans<'_>,
) -> Result<(), ConfigError> {
    for (route, raw_route) in routes.iter_mut().zip(raw) {
        let Some(names) = &raw_route.get_ref().plans else {
            continue;
        };
        let mut allowed = Vec::new();
        for name in names.get_ref() {
            // Without [plans] there is no plan to gate on.
            let index = plan_index(known.plans, name)
                .filter(|_| !known.names.is_empty())
                .ok_or_else(|| known.unknown(src, name, names.span()))?;
            allowed.push(index);
            route.plan_names.push(known.plans[index].name.clone());
        }
        route.plans = Some(allowed);
    }
    Ok(())
}

fn compile_route(
    src: &Source,
    r: &RawRoute,
    server: &ServerSettings,
    upstream: &UpstreamSettings,
    global: &Arc<ResponseSet>,
) -> Result<Route, ConfigError> {
    let method = match &r.method {
        None => None,
        Some(m) => Some(
            Method::from_bytes(m.get_ref().to_ascii_uppercase().as_bytes())
                .map_err(|_| src.at(m.span(), format!("invalid method {:?}", m.get_ref())))?,
        ),
    };
    let path = PathPattern::parse_with_case(r.path.get_ref(), server.case_sensitive_paths)
        .map_err(|m| src.at(r.path.span(), m))?;
    let host = r
        .host
        .as_ref()
        .map(|h| crate::content::routing::strip_port(h.get_ref()).to_ascii_lowercase());
    let when = content::when(src, r, &path)?;
    let job = job_role(src, r, &path)?;
    let settle = content::settle(src, r, &path)?;
    let responses = match &r.responses {
        None => global.clone(),
        Some(own) => {
            let mut set = (**global).clone();
            add_responses(src, own, &mut set)?;
            Arc::new(set)
        }
    };
    Ok(Route {
        index: 0,
        name: r.name.get_ref().as_str().into(),
        body: BodyLimits {
            max: size(src, &r.max_body, server.max_body)?,
            by_type: by_type(src, r.max_body_by_type.as_ref())?,
        },
        timeout: duration(src, &r.timeout, upstream.timeout)?,
        auth: r.auth.unwrap_or(true),
        path_text: r.path.get_ref().clone(),
        mcp_tool: r.mcp_tool.as_ref().map(|t| t.get_ref().clone()),
        format: match r.format {
            Some(RawFormat::Mcp) => Format::Mcp,
            _ => Format::Json,
        },
        plans: None,
        plan_names: Vec::new(),
        arg_limits: arg_limits(src, r.arg_limits.as_deref())?,
        media: content::media_limits(src, r)?,
        url_args: content::url_args(src, r)?,
        cost: content::cost(src, r, &path)?,
        refund_on: content::refund_on(src, r)?,
        match_reads_json: r.mcp_tool.is_some() || crate::content::conditions::need_json(&when),
        reads_answer: !matches!(job, JobRole::None) || settle.is_some(),
        job,
        settle,
        when,
        matcher: RouteMatcher { method, path, host },
        responses,
        upstream: None,
        capacity: None,
    })
}

/// The route's `job`, `job_status` or `job_cancel` (at most one).
fn job_role(src: &Source, r: &RawRoute, pattern: &PathPattern) -> Result<JobRole, ConfigError> {
    let source = |s: &Spanned<String>, side: Side| {
        ValueSource::parse(s.get_ref(), side, pattern).map_err(|m| src.at(s.span(), m))
    };
    let mut roles = Vec::new();
    if let Some(j) = &r.job {
        roles.push((
            j.span(),
            JobRole::Submit {
                id: source(&j.get_ref().id, Side::Response)?,
            },
        ));
    }
    if let Some(j) = &r.job_status {
        let raw = j.get_ref();
        if raw.done.get_ref().is_empty() {
            return Err(src.at(raw.done.span(), "`done` lists at least one state"));
        }
        roles.push((
            j.span(),
            JobRole::Status {
                id: source(&raw.id, Side::Request)?,
                state: source(&raw.state, Side::Response)?,
                done: raw.done.get_ref().clone(),
            },
        ));
    }
    if let Some(j) = &r.job_cancel {
        let raw = j.get_ref();
        let check = match (&raw.state, &raw.done) {
            (None, None) => None,
            (Some(state), Some(done)) if !done.get_ref().is_empty() => {
                Some((source(state, Side::Response)?, done.get_ref().clone()))
            }
            (Some(_), Some(done)) => {
                return Err(src.at(done.span(), "`done` lists at least one state"))
            }
            (Some(state), None) => {
                return Err(src.at(
                    state.span(),
                    "`state` needs `done`: the states in which the job was cancelled",
                ))
            }
            (None, Some(done)) => {
                return Err(src.at(
                    done.span(),
                    "`done` needs `state`: where the answer says the job's state",
                ))
            }
        };
        roles.push((
            j.span(),
            JobRole::Cancel {
                id: source(&raw.id, Side::Request)?,
                check,
            },
        ));
    }
    match roles.len() {
        0 => Ok(JobRole::None),
        1 => Ok(roles.remove(0).1),
        _ => Err(src.at(
            roles[1].0.clone(),
            format!(
                "route {:?}: `job`, `job_status` and `job_cancel` exclude each other",
                r.name.get_ref()
            ),
        )),
    }
}

fn arg_limits(
    src: &Source,
    raw: Option<&[Spanned<RawArgLimit>]>,
) -> Result<Vec<ArgLimit>, ConfigError> {
    let mut out = Vec::new();
    for a in raw.into_iter().flatten() {
        let span = a.span();
        let a = a.get_ref();
        if a.pointers.is_empty() {
            return Err(src.at(
                span,
                "arg_limits needs at least one pointer, e.g. \"/params/arguments/text\"",
            ));
        }
        if let Some(bad) = a
            .pointers
            .iter()
            .find(|p| !p.is_empty() && !p.starts_with('/'))
        {
            return Err(src.at(
                span,
                format!("invalid JSON pointer {bad:?}: it must be empty or start with '/'"),
            ));
        }
        match (a.min_chars, a.max_chars) {
            (None, None) => {
                return Err(src.at(span, "arg_limits needs min_chars, max_chars or both"))
            }
            (Some(min), Some(max)) if min > max => {
                return Err(src.at(
                    span,
                    format!("min_chars ({min}) is above max_chars ({max})"),
                ))
            }
            _ => {}
        }
        out.push(ArgLimit {
            pointers: a.pointers.clone(),
            min_chars: a.min_chars,
            max_chars: a.max_chars,
        });
    }
    Ok(out)
}

fn by_type(
    src: &Source,
    raw: Option<&std::collections::BTreeMap<String, Spanned<RawSize>>>,
) -> Result<Vec<(String, u64)>, ConfigError> {
    let mut out = Vec::new();
    for (pattern, limit) in raw.into_iter().flatten() {
        out.push((
            type_pattern(src, pattern, limit.span())?,
            parse_size(limit.get_ref()).map_err(|m| src.at(limit.span(), m))?,
        ));
    }
    Ok(out)
}

/// A content-type pattern of a `*_by_type` table, lower-cased: `type/subtype`,
/// `type/*` or `*/*`.
pub(super) fn type_pattern(
    src: &Source,
    pattern: &str,
    span: Range<usize>,
) -> Result<String, ConfigError> {
    let p = pattern.trim().to_ascii_lowercase();
    let valid = match p.split_once('/') {
        Some((major, minor)) => {
            !major.is_empty()
                && !minor.is_empty()
                && (major != "*" || minor == "*")
                && !minor.contains('/')
        }
        None => false,
    };
    if !valid {
        return Err(src.at(
            span,
            format!("invalid content type {pattern:?}: expected \"type/subtype\", \"type/*\" or \"*/*\""),
        ));
    }
    Ok(p)
}

pub(super) fn route_index(
    src: &Source,
    routes: &[Route],
    name: &str,
    span: Range<usize>,
) -> Result<usize, ConfigError> {
    routes.iter().position(|r| &*r.name == name).ok_or_else(|| {
        let names: Vec<&str> = routes.iter().map(|r| &*r.name).collect();
        src.at(
            span,
            format!("unknown route {name:?}: routes are {}", names.join(", ")),
        )
    })
}
