//! `[[capacity]]`: pools of slots shared by every caller of the routes
//! they cover (docs/capacity.md), compiled into [`PoolSpec`]s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawCapacity, RawConfig};
use super::{duration, ConfigError, Plan, Route, Source};
use crate::capacity::{FairPer, PoolSpec};

/// Every `[[capacity]]` pool, each route in one pool at most; sets
/// [`Route::capacity`].
pub(super) fn compile_capacity(
    src: &Source,
    raw: &RawConfig,
    routes: &mut [Route],
    plans: &[Plan],
) -> Result<Vec<Arc<PoolSpec>>, ConfigError> {
    let mut pools: Vec<Arc<PoolSpec>> = Vec::with_capacity(raw.capacity.len());
    for table in &raw.capacity {
        let c = table.get_ref();
        if pools.iter().any(|p| *p.name == **c.name.get_ref()) {
            return Err(src.at(
                c.name.span(),
                format!("duplicate capacity pool name {:?}", c.name.get_ref()),
            ));
        }
        let spec = compile_pool(src, c, routes, plans)?;
        for &r in &spec.routes {
            if let Some(other) = routes[r].capacity.and_then(|i| pools.get(i)) {
                let at = c
                    .routes
                    .get_ref()
                    .iter()
                    .find(|n| **n.get_ref() == *routes[r].name);
                return Err(src.at(
                    at.map_or(c.routes.span(), |n| n.span()),
                    format!(
                        "route {:?} is already in capacity pool {:?}: a route takes a slot of one pool at most",
                        routes[r].name, other.name
                    ),
                ));
            }
            routes[r].capacity = Some(pools.len());
        }
        pools.push(Arc::new(spec));
    }
    Ok(pools)
}

fn compile_pool(
    src: &Source,
    c: &RawCapacity,
    routes: &[Route],
    plans: &[Plan],
) -> Result<PoolSpec, ConfigError> {
    let name = c.name.get_ref();
    if name.is_empty() {
        return Err(src.at(c.name.span(), "a capacity pool needs a name"));
    }
    let max = count(src, &c.max, "max", 1)?;
    let covered = covered_routes(src, c, routes)?;
    let weights = by_plan(src, &c.weights, plans, name, "weights", 1)?;
    let reserve = by_plan(src, &c.reserve, plans, name, "reserve", 0)?;
    let reserved: u32 = reserve.iter().map(|(_, n)| *n).sum();
    if reserved > max {
        let at = c
            .reserve
            .as_ref()
            .and_then(|r| r.values().next())
            .map(|v| v.span());
        return Err(src.at(
            at.unwrap_or(c.max.span()),
            format!("capacity pool {name:?} reserves {reserved} slots, more than its max of {max}"),
        ));
    }
    let fair_per = match c
        .fair_per
        .as_ref()
        .map(|f| (f.get_ref().as_str(), f.span()))
    {
        None | Some(("key", _)) => FairPer::Key,
        Some(("account", _)) => FairPer::Account,
        Some((other, span)) => {
            return Err(src.at(
                span,
                format!("fair_per = {other:?}: expected \"key\" or \"account\""),
            ))
        }
    };
    Ok(PoolSpec {
        name: Arc::from(name.as_str()),
        max,
        max_wait: duration(src, &c.max_wait, Duration::from_secs(30))?,
        max_queue: match &c.max_queue {
            None => 1000,
            Some(q) => count(src, q, "max_queue", 0)?,
        },
        weights,
        reserve,
        fair_per,
        retry_after: duration(src, &c.retry_after, Duration::from_secs(5))?,
        max_duration: duration(src, &c.max_duration, Duration::from_secs(3600))?,
        routes: covered,
        plans: plans.iter().map(|p| p.name.clone()).collect(),
    })
}

/// The indices of the routes pool `c` lists: known, identified, at least one.
fn covered_routes(
    src: &Source,
    c: &RawCapacity,
    routes: &[Route],
) -> Result<Vec<usize>, ConfigError> {
    let name = c.name.get_ref();
    let mut covered = Vec::new();
    for r in c.routes.get_ref() {
        let Some(route) = routes.iter().find(|x| *x.name == **r.get_ref()) else {
            let names: Vec<&str> = routes.iter().map(|x| &*x.name).collect();
            return Err(src.at(
                r.span(),
                format!(
                    "capacity pool {name:?}: unknown route {:?}: routes are {}",
                    r.get_ref(),
                    names.join(", ")
                ),
            ));
        };
        if !route.auth {
            return Err(src.at(
                r.span(),
                format!(
                    "capacity pool {name:?}: route {:?} has auth = false; a pool shares its slots by plan, so it covers routes whose callers are identified",
                    route.name
                ),
            ));
        }
        covered.push(route.index);
    }
    if covered.is_empty() {
        return Err(src.at(
            c.routes.span(),
            format!("capacity pool {name:?} covers no route: list them in routes = [...]"),
        ));
    }
    Ok(covered)
}

/// A whole number of at least `min` that fits 32 bits.
fn count(src: &Source, n: &Spanned<i64>, what: &str, min: i64) -> Result<u32, ConfigError> {
    match u32::try_from(*n.get_ref()) {
        Ok(v) if i64::from(v) >= min => Ok(v),
        _ => Err(src.at(
            n.span(),
            format!("{what} must be a whole number of at least {min}"),
        )),
    }
}

/// `{ plan = n, ... }` with every plan known and every `n` at least `min`.
fn by_plan(
    src: &Source,
    raw: &Option<BTreeMap<String, Spanned<i64>>>,
    plans: &[Plan],
    pool: &str,
    what: &str,
    min: i64,
) -> Result<Vec<(Arc<str>, u32)>, ConfigError> {
    let mut out = Vec::new();
    for (plan, n) in raw.iter().flatten() {
        let Some(p) = plans.iter().find(|p| *p.name == **plan) else {
            let names: Vec<&str> = plans.iter().map(|p| &*p.name).collect();
            return Err(src.at(
                n.span(),
                format!(
                    "capacity pool {pool:?} {what}: unknown plan {plan:?}: plans are {}",
                    names.join(", ")
                ),
            ));
        };
        out.push((p.name.clone(), count(src, n, what, min)?));
    }
    Ok(out)
}
