//! The admin dashboard (SPEC §16): `GET /` serves one self-contained page
//! (HTML, CSS and script embedded in the binary, nothing fetched from
//! elsewhere) that polls `GET /v1/dashboard` every 2 s; rates are the
//! server's, over the last five seconds (route totals are sampled once a
//! second while an admin listener is configured). The page carries no data itself,
//! so it is served without the admin token; its calls send the token the
//! operator types in (kept in the tab's session storage).

use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use serde_json::json;

use super::json_response;
use crate::clock::SECOND;
use crate::config::Policy;
use crate::limits::Rule;
use crate::pipeline::Turnstile;
use crate::wire::body::{full, Body};

/// The page.
const PAGE: &str = include_str!("dashboard.html");

/// How many of the most refused keys and accounts are listed.
const TOP: usize = 10;
/// Ledger events the dashboard shows.
const LATEST_EVENTS: usize = 20;

/// `GET /`: the page.
pub(super) fn page() -> Response<Body> {
    let mut r = Response::new(full(PAGE));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Its own inline script and style, calls to this listener, nothing else.
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'",
        ),
    );
    r
}

/// Each capacity pool: slots in use of max, and by plan the requests
/// waiting and the mean wait for a slot so far.
async fn pools(app: &Turnstile) -> serde_json::Value {
    let Ok(pools) = app.pools().usage().await else {
        return json!([]);
    };
    let c = app.metrics().capacity();
    pools
        .iter()
        .map(|p| {
            let plans: Vec<_> = p
                .waiting
                .iter()
                .map(|(plan, n)| {
                    let (mean, served) = c.mean_wait(&p.name, plan);
                    json!({ "plan": plan, "waiting": n, "mean_wait_seconds": mean, "served": served })
                })
                .collect();
            json!({ "name": p.name, "max": p.max, "in_use": p.in_use, "jobs": p.jobs, "plans": plans })
        })
        .collect()
}

/// The ledger's latest events (newest first on the page) and each sink's
/// backlog; `null` without a ledger.
async fn ledger(app: &Turnstile) -> serde_json::Value {
    let Some(ledger) = app.ledger() else {
        return serde_json::Value::Null;
    };
    let latest: Vec<serde_json::Value> = ledger
        .latest(LATEST_EVENTS)
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|b| serde_json::from_str(b).ok())
        .collect();
    json!({ "latest": latest, "sinks": ledger.sinks() })
}

/// `GET /v1/dashboard`: requests by route and decision so far, the most
/// refused keys (fingerprints) and accounts, jobs in progress, capacity
/// pools, and the last 15 minutes for the charts.
pub(super) async fn summary(app: &Turnstile, policy: &Policy) -> Response<Body> {
    let totals = app
        .metrics()
        .route_totals(policy.routes.iter().map(|r| &r.name));
    let rates = app.metrics().route_rates(&totals);
    let routes: Vec<_> = totals
        .iter()
        .zip(rates)
        .map(|(t, rate)| {
            json!({
                "route": t.route,
                "decisions": t.decisions,
                "credits_spent": t.credits_spent,
                "per_second": rate,
            })
        })
        .collect();
    let top = app.top_refused();
    let rules = || policy.plans.iter().flat_map(|p| &p.limits).map(|l| &l.rule);
    let health = app.store().health();
    let now = app.store().in_process().now() / SECOND;
    let jobs_in_progress = app.store().jobs_in_progress();
    let history = app
        .metrics()
        .history()
        .series(now, &totals, jobs_in_progress);
    json_response(
        StatusCode::OK,
        &json!({
            "at": now,
            "store": { "backend": health.backend, "up": health.up },
            "routes": routes,
            "refused": {
                "keys": top.keys(TOP),
                "accounts": top.accounts(TOP),
            },
            "jobs": rules().any(|r| matches!(r, Rule::Jobs(_))),
            "jobs_in_progress": jobs_in_progress,
            "history": history,
            "credits": rules().any(|r| matches!(r, Rule::Credits(_))),
            "capacity": pools(app).await,
            "ledger": ledger(app).await,
        }),
    )
}
