//! `[[plans]]` and their limits: each limit validated, applied to the routes
//! it covers, with the counter id that names its counters.

use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::num::NonZeroU32;

use http::HeaderValue;
use toml::Spanned;

use crate::jobs::JobRole;
use crate::limits::{HeaderTrio, LimitSpec, Per};

use super::raw::{RawCount, RawKind, RawLimit, RawPer, RawPlan, RawRouteSet};
use super::routes::route_index;
use super::{kinds, AppliedLimit, ConfigError, Plan, Route, Source};

fn counter_id(parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// A whole number from 1 to `u32::MAX`: limits cannot be written down as zero.
pub(super) fn positive(
    src: &Source,
    v: &Spanned<i64>,
    what: &str,
) -> Result<NonZeroU32, ConfigError> {
    u32::try_from(*v.get_ref())
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| {
            src.at(
                v.span(),
                format!("{what} must be a whole number from 1 to {}", u32::MAX),
            )
        })
}

/// The routes a limit covers (indices) and its `routes` as written, for the
/// counter identity and the `check` table.
fn covered_routes(
    src: &Source,
    routes: &[Route],
    l: &RawLimit,
) -> Result<(Vec<usize>, String), ConfigError> {
    Ok(match &l.routes {
        None => ((0..routes.len()).collect(), "*".into()),
        Some(sel) => match sel.get_ref() {
            RawRouteSet::One(s) if s == "*" => ((0..routes.len()).collect(), "*".into()),
            RawRouteSet::One(s) => (vec![route_index(src, routes, s, sel.span())?], s.clone()),
            RawRouteSet::Many(list) => {
                let mut idx = Vec::new();
                for s in list {
                    idx.push(route_index(src, routes, s, sel.span())?);
                }
                let sorted: BTreeSet<&String> = list.iter().collect();
                (
                    idx,
                    sorted.into_iter().cloned().collect::<Vec<_>>().join(","),
                )
            }
        },
    })
}

pub(super) fn compile_plan(
    src: &Source,
    name: &str,
    raw: &Spanned<RawPlan>,
    routes: &[Route],
) -> Result<Plan, ConfigError> {
    let mut limits = Vec::new();
    let mut by_route: Vec<Vec<AppliedLimit>> = vec![Vec::new(); routes.len()];
    for l in &raw.get_ref().limits {
        let spec = compile_limit(src, l, routes)?;
        let (covered, _) = covered_routes(src, routes, l.get_ref())?;
        let applied = Applied {
            plan: name,
            index: limits.len(),
            spec: &spec,
            raw: l,
        };
        for r in covered.into_iter().filter(|&r| routes[r].auth) {
            let a = applied.to_route(src, &routes[r], &by_route[r], &limits)?;
            by_route[r].push(a);
        }
        limits.push(spec);
    }
    let header_value = HeaderValue::from_str(name).map_err(|_| {
        src.at(
            raw.span(),
            format!("plan name {name:?} cannot be sent in a header"),
        )
    })?;
    Ok(Plan {
        name: name.into(),
        header_value,
        limits,
        by_route,
    })
}

/// One limit of a plan, validated (its routes are applied separately).
fn compile_limit(
    src: &Source,
    l: &Spanned<RawLimit>,
    routes: &[Route],
) -> Result<LimitSpec, ConfigError> {
    let raw = l.get_ref();
    let (rule, window_text, queue) = kinds::compile_rule(src, l.span(), raw)?;
    let (_, routes_text) = covered_routes(src, routes, raw)?;
    let headers = match &raw.headers {
        None => None,
        Some(h) => Some(HeaderTrio::new(h.get_ref()).map_err(|m| src.at(h.span(), m))?),
    };
    Ok(LimitSpec {
        name: raw.name.get_ref().as_str().into(),
        name_value: http::HeaderValue::from_str(raw.name.get_ref()).ok(),
        limit_value: http::HeaderValue::from(rule.shown_limit()),
        alerts: super::ledger::compile_alerts(src, raw, &rule)?,
        rule,
        per: match raw.per {
            Some(RawPer::Account) => Per::Account,
            _ => Per::Key,
        },
        window_text: window_text.into(),
        headers,
        routes_text,
        per_route: raw.per_route.unwrap_or(false),
        queue,
        counts_cost: matches!(rule, crate::limits::Rule::Credits(_))
            || raw
                .count
                .as_ref()
                .is_some_and(|c| *c.get_ref() == RawCount::Cost),
        shadow: shadow(src, raw, &rule)?,
    })
}

/// `shadow = true`: quotas over time only (a slot, a job or a balance that
/// never refuses would be taken and never checked).
fn shadow(src: &Source, raw: &RawLimit, rule: &crate::limits::Rule) -> Result<bool, ConfigError> {
    match &raw.shadow {
        Some(s) if *s.get_ref() && !rule.is_quota() => Err(src.at(
            s.span(),
            format!(
                "limit {:?}: shadow applies to fixed, rolling and bucket limits, not {}",
                raw.name.get_ref(),
                rule.kind_name()
            ),
        )),
        Some(s) => Ok(*s.get_ref()),
        None => Ok(false),
    }
}

/// A limit being applied to the routes it covers.
pub(super) struct Applied<'a> {
    plan: &'a str,
    index: usize,
    spec: &'a LimitSpec,
    raw: &'a Spanned<RawLimit>,
}

impl Applied<'_> {
    /// The limit on `route`, with its counter id; `already`: the limits on
    /// it so far (two of one name may not cover one route).
    fn to_route(
        &self,
        src: &Source,
        route: &Route,
        already: &[AppliedLimit],
        limits: &[LimitSpec],
    ) -> Result<AppliedLimit, ConfigError> {
        let lname = &*self.spec.name;
        let raw = self.raw.get_ref();
        let kind = raw.kind.unwrap_or(RawKind::Fixed);
        if kind == RawKind::Jobs && !matches!(route.job, JobRole::Submit { .. }) {
            return Err(src.at(
                self.raw.span(),
                format!(
                    "limit {lname:?} counts jobs, but route {:?} does not say where its answer names one: add `job = {{ id = \"json:/id\" }}` to the route",
                    &*route.name
                ),
            ));
        }
        if already
            .iter()
            .any(|a| limits_name(limits, a.limit) == lname)
        {
            return Err(src.at(
                raw.name.span(),
                format!(
                    "two limits named {lname:?} in plan {:?} both cover route {:?}",
                    self.plan, &*route.name
                ),
            ));
        }
        // The counter's identity leaves out the numbers a reload may change,
        // and the plan: counters belong to the subject, so a key's plan
        // change keeps its window counts, jobs and balance, and keys of one
        // account on different plans share its `per = "account"` counters
        // (each request checked against its own plan's figures).
        let identity_window = match kind {
            RawKind::Fixed | RawKind::Rolling => &*self.spec.window_text,
            RawKind::Bucket | RawKind::Concurrency | RawKind::Jobs | RawKind::Credits => "",
        };
        let route_part = if self.spec.per_route {
            &*route.name
        } else {
            ""
        };
        let mut identity = vec![
            lname,
            &self.spec.routes_text,
            kind.as_str(),
            identity_window,
            route_part,
        ];
        // Counting cost is another counter than counting requests.
        if self.spec.counts_cost && kind != RawKind::Credits {
            identity.push("cost");
        }
        let counter = counter_id(&identity);
        Ok(AppliedLimit {
            limit: self.index,
            counter,
        })
    }
}

fn limits_name(limits: &[LimitSpec], i: usize) -> &str {
    limits.get(i).map_or("", |l| &l.name)
}
