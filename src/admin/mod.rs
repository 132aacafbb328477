//! The admin listener (docs/operations.md): probes, Prometheus metrics, usage per key or
//! account, resets, credits balances ([`credits`]) and reloads. JSON everywhere; keys appear only as
//! fingerprints. With `[admin] token`, every `/v1/*` call needs
//! `Authorization: Bearer TOKEN`; probes and metrics stay open.
//!
//! May import: [`crate::pipeline`] (the running proxy it reports on and
//! reloads) and everything below it.

mod credits;
mod dashboard;
mod jobs;
mod keys;
mod ledger;

use std::sync::Arc;

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::config::Policy;
use crate::keys::identity::{self, Fingerprint, KeyDigest};
use crate::keys::runtime::KeyCache;
use crate::limits::Per;
use crate::pipeline::usage::{account_keys, key_view, render_rows, rows_of, Row};
use crate::pipeline::Turnstile;
use crate::store::{LimitCheck, OwnedCheck, StoreError};
use crate::wire::body::{full, Body};

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
            let figures = app.store_figures();
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
        (&Method::GET, "/v1/dashboard") => dashboard::summary(app, &policy).await,
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
        (&Method::POST, "/v1/jobs/end") => jobs::end(app, &policy, req).await,
        (&Method::GET, "/v1/capacity") => jobs::capacity(app).await,
        (&Method::GET, "/v1/ledger") => ledger::page(app, query).await,
        (&Method::POST, "/v1/store/ack") => store_ack(app).await,
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

/// `key=`, `fingerprint=` (a registered or runtime key's) or `account=`.
fn target(policy: &Policy, app_keys: &KeyCache, query: &str) -> Option<Target> {
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
                .or_else(|| match app_keys.by_fingerprint(&v).as_slice() {
                    [(digest, _)] => Some(*digest),
                    _ => None,
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

fn store_error(e: StoreError) -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        &e.to_string(),
    )
}

async fn usage(app: &Turnstile, policy: &Policy, query: &str) -> Response<Body> {
    let app_keys = app.keys().cache();
    match target(policy, app_keys, query) {
        None => no_target(),
        Some(Target::UnknownFingerprint(fp)) => unknown_fingerprint(&fp),
        Some(Target::Key(digest)) => {
            let Some(key) = key_view(policy, app.keys().cache(), digest) else {
                return error(StatusCode::NOT_FOUND, "not_found", "unknown API key");
            };
            match crate::pipeline::usage::of_key(app.store(), policy, &key).await {
                Ok(usage) => json_response(StatusCode::OK, &usage),
                Err(e) => store_error(e),
            }
        }
        Some(Target::Account(account)) => {
            let keys = account_keys(policy, app_keys, &account);
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
            let counters = match render_rows(app.store(), &rows).await {
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

/// The counters a reset or a job ending addresses: a key's own (per-key)
/// counters, or an account's shared ones and those of each of its keys.
fn target_rows<'p>(
    policy: &'p Policy,
    app_keys: &KeyCache,
    query: &str,
) -> Result<Vec<Row<'p>>, Box<Response<Body>>> {
    let mut rows = Vec::new();
    match target(policy, app_keys, query) {
        None => return Err(Box::new(no_target())),
        Some(Target::UnknownFingerprint(fp)) => return Err(Box::new(unknown_fingerprint(&fp))),
        Some(Target::Key(digest)) => {
            let Some(key) = key_view(policy, app_keys, digest) else {
                let r = error(StatusCode::NOT_FOUND, "not_found", "unknown API key");
                return Err(Box::new(r));
            };
            rows_of(policy, &key, Some(Per::Key), &mut rows);
        }
        Some(Target::Account(account)) => {
            let keys = account_keys(policy, app_keys, &account);
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

/// `DELETE /v1/jobs?key=K&id=ID` (or `account=A`): ends one job in
/// progress; `unreadable=all` instead of `id` ends every job held without a
/// known id (its submission's answer could not be read).
async fn end_job(app: &Turnstile, policy: &Policy, query: &str) -> Response<Body> {
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.into_owned())
    };
    let unreadable = param("unreadable");
    let id = param("id");
    if id.is_none() && unreadable.as_deref() != Some("all") {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected ?key=KEY&id=JOB, ?account=ACCOUNT&id=JOB, or unreadable=all instead of id",
        );
    }
    let rows = match target_rows(policy, app.keys().cache(), query) {
        Ok(rows) => rows,
        Err(r) => return *r,
    };
    let counters: Vec<OwnedCheck> = rows.iter().filter_map(Row::job_counter).collect();
    let Some(id) = id else {
        return end_unreadable(app, &counters).await;
    };
    let pooled = match app.pools().end_job(&id, None).await {
        Ok(pools) => !pools.is_empty(),
        Err(e) => return store_error(e),
    };
    match app
        .store()
        .end_job(&counters, &id, crate::store::How::Admin, None)
        .await
        .map(|held| held || pooled)
    {
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

/// `POST /v1/store/ack`: accepts that Redis lost turnstile's data (its
/// marker is gone), so decisions go back to Redis with counts afresh.
async fn store_ack(app: &Turnstile) -> Response<Body> {
    let crate::store::CounterStore::Redis(redis) = app.store() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the counter store is in memory: there is no redis to acknowledge",
        );
    };
    let was_lost = redis.lost();
    match redis.acknowledge().await {
        Ok(epoch) => json_response(
            StatusCode::OK,
            &json!({ "acknowledged": true, "was_lost": was_lost, "epoch": epoch }),
        ),
        Err(e) => store_error(e),
    }
}

/// Ends every job of `counters` held without a known id.
async fn end_unreadable(app: &Turnstile, counters: &[OwnedCheck]) -> Response<Body> {
    let mut ended = 0u64;
    for counter in counters {
        let jobs = match app.store().jobs(counter).await {
            Ok(jobs) => jobs,
            Err(e) => return store_error(e),
        };
        for job in jobs.iter().filter(|j| crate::jobs::is_unreadable(&j.id)) {
            match app
                .store()
                .end_job(
                    std::slice::from_ref(counter),
                    &job.id,
                    crate::store::How::Admin,
                    None,
                )
                .await
            {
                Ok(true) => {
                    ended += 1;
                    app.metrics().job_ended(crate::jobs::Ended::Admin.label());
                }
                Ok(false) => {}
                Err(e) => return store_error(e),
            }
        }
    }
    tracing::info!(ended, "jobs without a known id ended through the admin API");
    json_response(StatusCode::OK, &json!({ "ended_unreadable": ended }))
}

async fn reset(app: &Turnstile, policy: &Policy, query: &str) -> Response<Body> {
    let rows = match target_rows(policy, app.keys().cache(), query) {
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
    crate::respond::error_response(status, code, message)
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
