//! The admin listener (README, "Operations"): probes, Prometheus metrics, usage per key or
//! account, resets, credits balances ([`credits`]) and reloads. JSON everywhere; keys appear only as
//! fingerprints. With `[admin] token`, every `/v1/*` call needs
//! `Authorization: Bearer TOKEN`; probes and metrics stay open.

mod credits;
mod dashboard;
mod keys;

use std::sync::Arc;

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::body::{full, Body};
use crate::clock::SECOND;
use crate::config::Policy;
use crate::identity::{self, Fingerprint, KeyDigest, UnknownKey};
use crate::limits::{LimitSpec, Per, Rule};
use crate::metrics::StoreFigures;
use crate::proxy::Turnstile;
use crate::store::{BalanceChange, LimitCheck, OwnedCheck, StoreError, Subject};

/// Answers one admin request.
pub async fn handle(app: &Arc<Turnstile>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let method = req.method();
    match (method, path) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            let policy = app.policy();
            let health = app.store().health();
            // Down and refusing everything (on_error = "deny"): take this instance out of rotation.
            let ready = health.up || !health.refusing_when_down;
            json_response(
                if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                &json!({
                    "status": if ready { "ready" } else { "store_unavailable" },
                    "config": policy.path.display().to_string(),
                    "store": { "backend": health.backend, "up": health.up },
                    "routes": policy.routes.len(),
                    "plans": policy.plans.len(),
                }),
            )
        }
        (&Method::GET, "/metrics") => {
            let store = app.store().in_process();
            let figures = StoreFigures {
                counters: store.live_counters() as u64,
                queued: store.queued() as u64,
                slots: store.slots_in_flight(),
                store_up: app.store().health().up,
                evicted: store.evicted_counters(),
                jobs_in_progress: app.store().jobs_in_progress(),
                jobs_expired: app.store().jobs_expired(),
                access_log_dropped: app.access_log_dropped(),
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
        (&Method::GET, "/") => dashboard::page(),
        (_, p) if p.starts_with("/v1/") => v1(app, req).await,
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no admin endpoint {method} {path}"),
        ),
    }
}

/// The `/v1/*` calls, behind the admin token.
async fn v1(app: &Arc<Turnstile>, req: Request<Incoming>) -> Response<Body> {
    let (method, p) = (req.method().clone(), req.uri().path().to_owned());
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
    let query = req.uri().query().unwrap_or("").to_owned();
    let query = query.as_str();
    match (&method, p.as_str()) {
        (&Method::GET, "/v1/credits") => credits::show(app, &policy, query).await,
        (&Method::POST, "/v1/credits") => credits::change(app, &policy, query, req).await,
        (&Method::GET, "/v1/usage") => usage(app, &policy, query).await,
        (&Method::GET, "/v1/dashboard") => dashboard::summary(app, &policy),
        (&Method::POST, "/v1/keys") => keys::create(app, &policy, req).await,
        (&Method::GET, "/v1/keys") => keys::list(app, &policy, query),
        (&Method::PATCH, p) if p.starts_with("/v1/keys/") => {
            let fp = p["/v1/keys/".len()..].to_owned();
            keys::update(app, &policy, &fp, req).await
        }
        (&Method::PATCH, p) if p.starts_with("/v1/accounts/") => {
            let name = p["/v1/accounts/".len()..].to_owned();
            keys::account(app, &policy, &name, req).await
        }
        (&Method::DELETE, "/v1/usage") => reset(app, &policy, query).await,
        (&Method::DELETE, "/v1/jobs") => end_job(app, &policy, query).await,
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
    /// `fingerprint=` naming no key of the registry.
    UnknownFingerprint(String),
}

/// `key=`, `fingerprint=` (a registered key's) or `account=`.
fn target(policy: &Policy, query: &str) -> Option<Target> {
    form_urlencoded::parse(query.as_bytes()).find_map(|(k, v)| match &*k {
        "key" if !v.is_empty() => Some(Target::Key(identity::digest(&v))),
        "account" if !v.is_empty() => Some(Target::Account(v.into_owned())),
        "fingerprint" if !v.is_empty() => Some(
            policy
                .identity
                .keys
                .as_ref()
                .and_then(|keys| {
                    keys.iter()
                        .map(|(d, _)| *d)
                        .find(|d| Fingerprint::of(d).as_str().eq_ignore_ascii_case(&v))
                })
                .map_or_else(|| Target::UnknownFingerprint(v.into_owned()), Target::Key),
        ),
        _ => None,
    })
}

fn unknown_fingerprint(fp: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no key of the registry has the fingerprint {fp:?}"),
    )
}

fn no_target() -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "expected ?key=KEY, ?fingerprint=FP or ?account=ACCOUNT",
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

/// One counter of a key's plan, ready to be read or reset.
struct Row<'p> {
    spec: &'p LimitSpec,
    route: Option<String>,
    per_key: Option<Fingerprint>,
    check: LimitCheck<'p>,
}

/// Every counter of `key`'s plan: per limit, one per route when `per_route`.
/// `only` restricts to per-key or per-account limits.
fn rows_of<'p>(policy: &'p Policy, key: &KeyView, only: Option<Per>, out: &mut Vec<Row<'p>>) {
    let Some(plan) = policy.plans.get(key.plan) else {
        return;
    };
    let mut seen = Vec::new();
    for (route_index, applied) in plan.by_route.iter().enumerate() {
        for a in applied {
            if seen.contains(&a.counter) {
                continue;
            }
            seen.push(a.counter);
            let spec = &plan.limits[a.limit];
            // Without a named account, per-account limits count per key.
            let per = if key.account.is_none() {
                Per::Key
            } else {
                spec.per
            };
            if only.is_some_and(|o| o != per) {
                continue;
            }
            let subject = Subject::counted(spec.per, &key.digest, key.account.as_ref());
            let per_key = (matches!(subject, Subject::Key(_)) && key.account.is_some())
                .then(|| Fingerprint::of(&key.digest));
            let group = Subject::group(&key.digest, key.account.as_ref());
            out.push(Row {
                spec,
                route: spec
                    .per_route
                    .then(|| policy.routes[route_index].name.to_string()),
                per_key,
                check: LimitCheck {
                    subject,
                    group,
                    counter: a.counter,
                    rule: &spec.rule,
                    queue: None,
                    pinned: true,
                    shadow: false,
                    units: 1,
                },
            });
        }
    }
}

impl Row<'_> {
    /// The row's counter as a jobs counter, if it is one.
    fn job_counter(&self) -> Option<OwnedCheck> {
        matches!(self.spec.rule, Rule::Jobs(_)).then(|| OwnedCheck::of(&self.check))
    }

    /// The row's counter as a credits balance, if it is one.
    fn balance_check(&self) -> Option<OwnedCheck> {
        matches!(self.spec.rule, Rule::Credits(_)).then(|| OwnedCheck::of(&self.check))
    }
}

/// The jobs in progress of a jobs row, as the usage output lists them.
async fn jobs_of(app: &Turnstile, row: &Row<'_>) -> Result<Option<Value>, StoreError> {
    let Some(counter) = row.job_counter() else {
        return Ok(None);
    };
    let jobs = app.store().jobs(&counter).await?;
    Ok(Some(Value::Array(
        jobs.iter()
            .map(|j| {
                json!({
                    "id": &*j.id,
                    "started": j.started / SECOND,
                    "expires": j.expires.div_ceil(SECOND),
                })
            })
            .collect(),
    )))
}

/// The rows as JSON, with their figures read from the store.
async fn render_rows(app: &Turnstile, rows: &[Row<'_>]) -> Result<Vec<Value>, StoreError> {
    let checks: Vec<LimitCheck<'_>> = rows.iter().map(|r| r.check.clone()).collect();
    let verdicts = app.store().usage(&checks).await?;
    let mut jobs = Vec::with_capacity(rows.len());
    let mut balances = std::collections::HashMap::new();
    for row in rows {
        jobs.push(jobs_of(app, row).await?);
        if let Some(owned) = row.balance_check() {
            let balance = app.store().balance(&owned, BalanceChange::Read).await?;
            balances.insert(row.check.counter, balance);
        }
    }
    let now = app.store().in_process().now();
    Ok(rows
        .iter()
        .zip(verdicts)
        .zip(jobs)
        .map(|((row, v), jobs)| {
            let mut entry = json!({
                "name": &*row.spec.name,
                "route": row.route,
                "kind": row.spec.rule.kind_name(),
                "limit": row.spec.rule.shown_limit(),
            });
            if let Some(fp) = &row.per_key {
                entry["key"] = json!(fp.as_str());
            }
            if let Rule::Jobs(_) = row.spec.rule {
                entry["in_progress"] = json!(v.used);
                entry["jobs"] = jobs.unwrap_or_default();
            } else if let Some(balance) = balances.get(&row.check.counter) {
                entry["balance"] = json!(balance);
                entry["next_refill"] = credits::next_refill(row.spec, now);
            } else if row.spec.rule.holds_slot() {
                entry["in_flight"] = json!(v.used);
            } else {
                entry["used"] = json!(v.used);
                entry["remaining"] = json!(v.remaining);
                entry["reset"] = json!(v.reset_at.div_ceil(SECOND));
            }
            entry
        })
        .collect())
}

fn store_error(e: StoreError) -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        &e.to_string(),
    )
}

async fn usage(app: &Turnstile, policy: &Policy, query: &str) -> Response<Body> {
    match target(policy, query) {
        None => no_target(),
        Some(Target::UnknownFingerprint(fp)) => unknown_fingerprint(&fp),
        Some(Target::Key(digest)) => {
            let Some(key) = key_view(policy, digest) else {
                return error(StatusCode::NOT_FOUND, "not_found", "unknown API key");
            };
            let fp = Fingerprint::of(&digest);
            let mut rows = Vec::new();
            rows_of(policy, &key, None, &mut rows);
            let counters = match render_rows(app, &rows).await {
                Ok(c) => c,
                Err(e) => return store_error(e),
            };
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
            let mut rows = Vec::new();
            let mut plans = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                // Account-wide counters once (from the first key), per-key counters for every key.
                if i == 0 {
                    rows_of(policy, key, Some(Per::Account), &mut rows);
                }
                rows_of(policy, key, Some(Per::Key), &mut rows);
                if let Some(p) = policy.plans.get(key.plan) {
                    if !plans.contains(&&*p.name) {
                        plans.push(&*p.name);
                    }
                }
            }
            let counters = match render_rows(app, &rows).await {
                Ok(c) => c,
                Err(e) => return store_error(e),
            };
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

/// `[server] usage_path`: the caller's own plan and counters (credits and
/// jobs included), as `GET /v1/usage?key=` shows them; read only.
pub async fn own_usage(
    app: &Turnstile,
    policy: &Policy,
    caller: &identity::Caller,
) -> Response<Body> {
    let key = KeyView {
        digest: caller.digest,
        account: caller.account.clone(),
        plan: caller.plan,
    };
    let mut rows = Vec::new();
    rows_of(policy, &key, None, &mut rows);
    let counters = match render_rows(app, &rows).await {
        Ok(c) => c,
        Err(e) => return store_error(e),
    };
    let mut r = json_response(
        StatusCode::OK,
        &json!({
            "key": caller.fingerprint.as_str(),
            "account": key.account.as_deref().unwrap_or(caller.fingerprint.as_str()),
            "plan": policy.plans.get(key.plan).map(|p| &*p.name),
            "counters": counters,
        }),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

/// The counters a reset or a job ending addresses: a key's own (per-key)
/// counters, or an account's shared ones and those of each of its keys.
fn target_rows<'p>(policy: &'p Policy, query: &str) -> Result<Vec<Row<'p>>, Box<Response<Body>>> {
    let mut rows = Vec::new();
    match target(policy, query) {
        None => return Err(Box::new(no_target())),
        Some(Target::UnknownFingerprint(fp)) => return Err(Box::new(unknown_fingerprint(&fp))),
        Some(Target::Key(digest)) => {
            let Some(key) = key_view(policy, digest) else {
                let r = error(StatusCode::NOT_FOUND, "not_found", "unknown API key");
                return Err(Box::new(r));
            };
            rows_of(policy, &key, Some(Per::Key), &mut rows);
        }
        Some(Target::Account(account)) => {
            let keys = account_keys(policy, &account);
            if keys.is_empty() {
                return Err(Box::new(error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no key belongs to account {account:?}"),
                )));
            }
            for (i, key) in keys.iter().enumerate() {
                if i == 0 {
                    rows_of(policy, key, Some(Per::Account), &mut rows);
                }
                rows_of(policy, key, Some(Per::Key), &mut rows);
            }
        }
    }
    Ok(rows)
}

/// `DELETE /v1/jobs?key=K&id=ID` (or `account=A`): ends one job in progress.
async fn end_job(app: &Turnstile, policy: &Policy, query: &str) -> Response<Body> {
    let Some(id) = form_urlencoded::parse(query.as_bytes())
        .find(|(k, v)| k == "id" && !v.is_empty())
        .map(|(_, v)| v.into_owned())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected ?key=KEY&id=JOB or ?account=ACCOUNT&id=JOB",
        );
    };
    let rows = match target_rows(policy, query) {
        Ok(rows) => rows,
        Err(r) => return *r,
    };
    let counters: Vec<OwnedCheck> = rows.iter().filter_map(Row::job_counter).collect();
    match app.store().end_job(&counters, &id).await {
        Ok(true) => {
            app.metrics().job_ended(crate::jobs::Ended::Admin.label());
            tracing::info!(job = %id, "job ended through the admin API");
            json_response(StatusCode::OK, &json!({ "ended": id }))
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no job {id:?} in progress for this key or account"),
        ),
        Err(e) => store_error(e),
    }
}

async fn reset(app: &Turnstile, policy: &Policy, query: &str) -> Response<Body> {
    let rows = match target_rows(policy, query) {
        Ok(rows) => rows,
        Err(r) => return *r,
    };
    let checks: Vec<LimitCheck<'_>> = rows.iter().map(|r| r.check.clone()).collect();
    let reset = match app.store().reset(&checks).await {
        Ok(n) => n,
        Err(e) => return store_error(e),
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
    crate::responses::error_response(status, code, message)
}

/// What `turnstile health` found.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing accepted a connection (or the exchange failed or timed out).
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        /// The probed address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The listener answered, but not `200`.
    #[error("{addr} answered {status:?}")]
    Unhealthy {
        /// The probed address.
        addr: std::net::SocketAddr,
        /// The status line received.
        status: String,
    },
}

/// The address a local probe should connect to for a listener bound to
/// `listen`: a wildcard bind (`0.0.0.0`, `::`) is reached on loopback.
pub fn probe_target(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, listen.port())
}

/// `GET /healthz` on an admin listener with a blocking socket, for container
/// health checks (the runtime image has no curl). Succeeds only on a `200`
/// within `timeout`; never waits longer than `timeout` per socket operation.
pub fn probe_healthz(
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> Result<(), ProbeError> {
    use std::io::{BufRead, BufReader, Write};
    let unreachable = |source| ProbeError::Unreachable { addr, source };
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(unreachable)?;
    // One write: a request in pieces could be answered and reset midway.
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(unreachable)?;
    let mut status = String::new();
    BufReader::new(stream)
        .read_line(&mut status)
        .map_err(unreachable)?;
    let status = status.trim_end().to_owned();
    match status.split(' ').nth(1) {
        Some("200") => Ok(()),
        _ => Err(ProbeError::Unhealthy { addr, status }),
    }
}

#[cfg(test)]
mod probe_tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    /// A one-shot server answering `answer` to whatever it is sent.
    fn answer_once(answer: &'static str) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 512];
            while !request.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(answer.as_bytes());
        });
        addr
    }

    #[test]
    fn healthy_only_on_200() {
        let ok = answer_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(probe_healthz(ok, Duration::from_secs(2)).is_ok());
        let bad = answer_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let err = probe_healthz(bad, Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
    }

    #[test]
    fn unreachable_is_an_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // The listener is dropped: nothing listens there any more.
        let err = probe_healthz(port, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, ProbeError::Unreachable { .. }), "{err}");
    }

    #[test]
    fn wildcard_binds_are_probed_on_loopback() {
        assert_eq!(
            probe_target("0.0.0.0:9090".parse().unwrap()),
            "127.0.0.1:9090".parse().unwrap()
        );
        assert_eq!(
            probe_target("[::]:9090".parse().unwrap()),
            "[::1]:9090".parse().unwrap()
        );
        assert_eq!(
            probe_target("10.1.2.3:9090".parse().unwrap()),
            "10.1.2.3:9090".parse().unwrap()
        );
    }
}
