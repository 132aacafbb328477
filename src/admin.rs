//! The admin listener (SPEC §9): probes, Prometheus metrics, usage per key or
//! account, resets and reloads. JSON everywhere; keys appear only as
//! fingerprints. With `[admin] token`, every `/v1/*` call needs
//! `Authorization: Bearer TOKEN`; probes and metrics stay open.

use std::sync::Arc;

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::body::{full, Body};
use crate::clock::SECOND;
use crate::config::{Per, Policy};
use crate::identity::{self, Fingerprint, KeyDigest, UnknownKey};
use crate::limits::{CounterState, Rule};
use crate::metrics::StoreFigures;
use crate::proxy::Turnstile;
use crate::store::Subject;

/// Answers one admin request.
pub async fn handle(app: &Arc<Turnstile>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let method = req.method();
    match (method, path) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            let policy = app.policy();
            json_response(
                StatusCode::OK,
                &json!({
                    "status": "ready",
                    "config": policy.path.display().to_string(),
                    "store": "memory",
                    "routes": policy.routes.len(),
                    "plans": policy.plans.len(),
                }),
            )
        }
        (&Method::GET, "/metrics") => {
            let store = app.store();
            let figures = StoreFigures {
                counters: store.live_counters() as u64,
                queued: store.queued() as u64,
                slots: store.slots_in_flight(),
            };
            let mut r = Response::new(full(app.metrics().render(figures)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (_, p) if p.starts_with("/v1/") => {
            let policy = app.policy();
            if !authorized(&policy, &req) {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "admin token required: Authorization: Bearer <token>",
                );
                r.headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
                return r;
            }
            let query = req.uri().query().unwrap_or("");
            match (method, p) {
                (&Method::GET, "/v1/usage") => usage(app, &policy, query),
                (&Method::DELETE, "/v1/usage") => reset(app, &policy, query),
                (&Method::POST, "/v1/reload") => match app.reload() {
                    Ok(report) => json_response(
                        StatusCode::OK,
                        &json!({
                            "status": "reloaded",
                            "dropped_counters": report.dropped_counters,
                            "restart_needed": report.restart_needed,
                        }),
                    ),
                    Err(e) => error(StatusCode::BAD_REQUEST, "invalid_config", &e.to_string()),
                },
                _ => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no admin endpoint {method} {p}"),
                ),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no admin endpoint {method} {path}"),
        ),
    }
}

fn authorized(policy: &Policy, req: &Request<Incoming>) -> bool {
    let Some(token) = policy.admin.as_ref().and_then(|a| a.token.as_deref()) else {
        return true;
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let presented = given
        .strip_prefix("Bearer ")
        .or_else(|| given.strip_prefix("bearer "))
        .unwrap_or("");
    // Compare digests so the time taken says nothing about the token.
    identity::digest(presented.trim()) == identity::digest(token)
}

/// Who a usage call is about.
enum Target {
    Key(KeyDigest),
    Account(String),
}

fn target(query: &str) -> Option<Target> {
    form_urlencoded::parse(query.as_bytes()).find_map(|(k, v)| match &*k {
        "key" if !v.is_empty() => Some(Target::Key(identity::digest(&v))),
        "account" if !v.is_empty() => Some(Target::Account(v.into_owned())),
        _ => None,
    })
}

fn no_target() -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "expected ?key=KEY or ?account=ACCOUNT",
    )
}

/// One key as the policy sees it: account and plan.
struct KeyView {
    digest: KeyDigest,
    account: Option<Arc<str>>,
    plan: usize,
}

fn key_view(policy: &Policy, digest: KeyDigest) -> Option<KeyView> {
    let id = &policy.identity;
    match id.keys.as_ref().and_then(|k| k.get(&digest)) {
        Some(rec) => Some(KeyView {
            digest,
            account: rec.account.clone(),
            plan: rec.plan,
        }),
        None if id.keys.is_none() || id.unknown_key == UnknownKey::Default => {
            id.default_plan.map(|plan| KeyView {
                digest,
                account: None,
                plan,
            })
        }
        None => None,
    }
}

fn account_keys(policy: &Policy, account: &str) -> Vec<KeyView> {
    let Some(keys) = &policy.identity.keys else {
        return Vec::new();
    };
    let mut out: Vec<KeyView> = keys
        .iter()
        .filter(|(_, rec)| rec.account.as_deref() == Some(account))
        .map(|(d, rec)| KeyView {
            digest: *d,
            account: rec.account.clone(),
            plan: rec.plan,
        })
        .collect();
    out.sort_by_key(|k| k.digest);
    out
}

fn subject_of(per: Per, key: &KeyView) -> Subject {
    match (per, &key.account) {
        (Per::Account, Some(a)) => Subject::Account(a.clone()),
        _ => Subject::Key(key.digest),
    }
}

/// Every counter of `key`'s plan: per limit, one per route when `per_route`.
/// `only` restricts to per-key or per-account limits.
fn counters_of(
    app: &Turnstile,
    policy: &Policy,
    key: &KeyView,
    only: Option<Per>,
    out: &mut Vec<Value>,
) {
    let Some(plan) = policy.plans.get(key.plan) else {
        return;
    };
    let now = app.store().now();
    let mut seen = Vec::new();
    for (route_index, applied) in plan.by_route.iter().enumerate() {
        for a in applied {
            if seen.contains(&a.counter) {
                continue;
            }
            seen.push(a.counter);
            let spec = &plan.limits[a.limit];
            if only
                .is_some_and(|per| per != spec.per || key.account.is_none() && per == Per::Account)
            {
                continue;
            }
            let subject = subject_of(spec.per, key);
            let mut state = app
                .store()
                .peek(&subject, a.counter)
                .unwrap_or_else(|| spec.rule.new_state());
            let route = spec
                .per_route
                .then(|| policy.routes[route_index].name.to_string());
            let per_key = matches!(subject, Subject::Key(_)) && key.account.is_some();
            let mut entry = json!({
                "name": &*spec.name,
                "route": route,
                "kind": kind_name(&spec.rule),
                "limit": spec.rule.shown_limit(),
            });
            if per_key {
                entry["key"] = json!(Fingerprint::of(&key.digest).as_str());
            }
            if let CounterState::Concurrency { in_flight } = state {
                entry["in_flight"] = json!(in_flight);
            } else {
                let v = spec.rule.evaluate(&mut state, now).uncounted();
                entry["used"] = json!(v.used);
                entry["remaining"] = json!(v.remaining);
                entry["reset"] = json!(v.reset_at.div_ceil(SECOND));
            }
            out.push(entry);
        }
    }
}

fn kind_name(rule: &Rule) -> &'static str {
    match rule {
        Rule::Fixed { .. } => "fixed",
        Rule::Rolling { .. } => "rolling",
        Rule::Bucket { .. } => "bucket",
        Rule::Concurrency { .. } => "concurrency",
    }
}

fn usage(app: &Turnstile, policy: &Policy, query: &str) -> Response<Body> {
    match target(query) {
        None => no_target(),
        Some(Target::Key(digest)) => {
            let Some(key) = key_view(policy, digest) else {
                return error(StatusCode::NOT_FOUND, "not_found", "unknown API key");
            };
            let fp = Fingerprint::of(&digest);
            let mut counters = Vec::new();
            counters_of(app, policy, &key, None, &mut counters);
            json_response(
                StatusCode::OK,
                &json!({
                    "key": fp.as_str(),
                    "account": key.account.as_deref().unwrap_or(fp.as_str()),
                    "plan": policy.plans.get(key.plan).map(|p| &*p.name),
                    "counters": counters,
                }),
            )
        }
        Some(Target::Account(account)) => {
            let keys = account_keys(policy, &account);
            if keys.is_empty() {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no key belongs to account {account:?}"),
                );
            }
            let mut counters = Vec::new();
            let mut plans = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                // Account-wide counters once (from the first key), per-key counters for every key.
                if i == 0 {
                    counters_of(app, policy, key, Some(Per::Account), &mut counters);
                }
                counters_of(app, policy, key, Some(Per::Key), &mut counters);
                if let Some(p) = policy.plans.get(key.plan) {
                    if !plans.contains(&&*p.name) {
                        plans.push(&*p.name);
                    }
                }
            }
            let fps: Vec<String> = keys
                .iter()
                .map(|k| Fingerprint::of(&k.digest).to_string())
                .collect();
            json_response(
                StatusCode::OK,
                &json!({ "account": account, "plans": plans, "keys": fps, "counters": counters }),
            )
        }
    }
}

fn reset(app: &Turnstile, policy: &Policy, query: &str) -> Response<Body> {
    let reset = match target(query) {
        None => return no_target(),
        Some(Target::Key(digest)) => {
            if key_view(policy, digest).is_none() {
                return error(StatusCode::NOT_FOUND, "not_found", "unknown API key");
            }
            app.store().reset(&Subject::Key(digest))
        }
        Some(Target::Account(account)) => {
            let keys = account_keys(policy, &account);
            if keys.is_empty() {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no key belongs to account {account:?}"),
                );
            }
            let mut n = app
                .store()
                .reset(&Subject::Account(account.as_str().into()));
            for k in keys {
                n += app.store().reset(&Subject::Key(k.digest));
            }
            n
        }
    };
    tracing::info!(counters = reset, "usage reset through the admin API");
    json_response(StatusCode::OK, &json!({ "reset_counters": reset }))
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": code, "message": message }))
}
