//! `/v1/keys` and `/v1/accounts` (SPEC §14): keys created, listed,
//! re-planned and revoked at runtime ([`crate::keys::runtime`]), accounts
//! disabled. A new key is in the answer to its creation and nowhere else:
//! not in logs, not in later answers (fingerprints only).

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::{error, json_response};
use crate::clock::SECOND;
use crate::config::Policy;
use crate::keys::identity::Fingerprint;
use crate::keys::runtime::{format_time, KeyError, KeyPatch, NewKey, RuntimeKey};
use crate::pipeline::Turnstile;
use crate::wire::body::Body;

const MAX_BODY: usize = 16 * 1024;

fn now(app: &Turnstile) -> u64 {
    app.store().in_process().now() / SECOND
}

async fn body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    expected: &str,
) -> Result<T, Box<Response<Body>>> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("could not read the body: {e}"),
            )))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("expected {expected}: {e}"),
        ))
    })
}

fn key_error(e: &KeyError) -> Response<Body> {
    let (status, code) = match e {
        KeyError::TooMany { .. } => (StatusCode::CONFLICT, "too_many_keys"),
        KeyError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        KeyError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        KeyError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        KeyError::NotConfigured => (StatusCode::BAD_REQUEST, "no_key_store"),
        KeyError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
    };
    error(status, code, &e.to_string())
}

fn time(at: Option<u64>) -> Value {
    at.map_or(Value::Null, |t| json!(format_time(t)))
}

fn runtime_view(fp: &Fingerprint, k: &RuntimeKey, now: u64) -> Value {
    json!({
        "fingerprint": fp.as_str(),
        "account": &*k.account,
        "plan": &*k.plan,
        "name": k.name.as_deref(),
        "created": format_time(k.created),
        "expires_at": time(k.expires_at),
        "revoked": k.revoked,
        "active": k.active(now),
        "source": "runtime",
    })
}

/// `POST /v1/keys` `{"account","plan","name","expires_at"}` → 201 with the key.
pub(super) async fn create(
    app: &Turnstile,
    policy: &Policy,
    req: Request<Incoming>,
) -> Response<Body> {
    let new: NewKey = match body(
        req,
        r#"{"account":"acme","plan":"pro","name":"ci","expires_at":"2027-01-01T00:00:00Z"}"#,
    )
    .await
    {
        Ok(n) => n,
        Err(r) => return *r,
    };
    let now = now(app);
    match app
        .keys()
        .create(new, &policy.identity, &policy.plan_names(), now)
        .await
    {
        Ok(made) => {
            let fp = Fingerprint::of(&made.digest);
            tracing::info!(
                key_fp = fp.as_str(),
                account = &*made.record.account,
                plan = &*made.record.plan,
                "API key created"
            );
            let mut view = runtime_view(&fp, &made.record, now);
            view["key"] = json!(made.key);
            json_response(StatusCode::CREATED, &view)
        }
        Err(e) => key_error(&e),
    }
}

/// `GET /v1/keys?account=A`: the account's keys, the keys file's included.
pub(super) fn list(app: &Turnstile, policy: &Policy, query: &str) -> Response<Body> {
    let Some(account) = form_urlencoded::parse(query.as_bytes())
        .find(|(k, v)| k == "account" && !v.is_empty())
        .map(|(_, v)| v.into_owned())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected ?account=ACCOUNT",
        );
    };
    let now = now(app);
    let mut keys = Vec::new();
    if let Some(file) = &policy.identity.keys {
        let mut from_file: Vec<_> = file
            .iter()
            .filter(|(_, r)| r.account.as_deref() == Some(account.as_str()))
            .collect();
        from_file.sort_by_key(|(d, _)| **d);
        for (digest, r) in from_file {
            keys.push(json!({
                "fingerprint": Fingerprint::of(digest).as_str(),
                "account": &account,
                "plan": policy.plans.get(r.plan).map(|p| &*p.name),
                "name": r.name.as_deref(),
                "created": Value::Null,
                "expires_at": time(r.expires_at),
                "revoked": r.revoked,
                "active": r.active(now),
                "source": "file",
            }));
        }
    }
    for (digest, k) in app.keys().cache().of_account(&account) {
        keys.push(runtime_view(&Fingerprint::of(&digest), &k, now));
    }
    let disabled = policy
        .identity
        .keys
        .as_ref()
        .is_some_and(|k| k.is_disabled(&account))
        || app.keys().cache().is_disabled(&account);
    let active = keys.iter().filter(|k| k["active"] == true).count();
    json_response(
        StatusCode::OK,
        &json!({
            "account": account,
            "disabled": disabled,
            "active": active,
            "max_keys_per_account": policy.identity.max_keys_per_account,
            "keys": keys,
        }),
    )
}

/// `PATCH /v1/keys/FINGERPRINT` `{"plan"}`, `{"revoked":true}`, `{"name"}`, `{"expires_at"}`.
pub(super) async fn update(
    app: &Turnstile,
    policy: &Policy,
    fp: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let in_file = policy.identity.keys.as_ref().is_some_and(|k| {
        k.iter()
            .any(|(d, _)| Fingerprint::of(d).as_str().eq_ignore_ascii_case(fp))
    });
    if in_file {
        return error(
            StatusCode::CONFLICT,
            "read_only",
            "that key is in the keys file, which the API does not change: edit the file and reload",
        );
    }
    let patch: KeyPatch = match body(req, r#"{"plan":"pro"}, {"revoked":true}, {"name":"..."} or {"expires_at":"2027-01-01T00:00:00Z"}"#).await {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let now = now(app);
    match app
        .keys()
        .update(fp, patch, &policy.plan_names(), now)
        .await
    {
        Ok((digest, k)) => {
            let fp = Fingerprint::of(&digest);
            tracing::info!(
                key_fp = fp.as_str(),
                plan = &*k.plan,
                revoked = k.revoked,
                "API key changed"
            );
            json_response(StatusCode::OK, &runtime_view(&fp, &k, now))
        }
        Err(e) => key_error(&e),
    }
}

/// `PATCH /v1/accounts/NAME` `{"disabled": true|false}`.
pub(super) async fn account(
    app: &Turnstile,
    policy: &Policy,
    name: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Change {
        disabled: bool,
    }
    let change: Change = match body(req, r#"{"disabled": true} or {"disabled": false}"#).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let name = percent_decode(name);
    if name.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected /v1/accounts/NAME",
        );
    }
    let in_file = policy
        .identity
        .keys
        .as_ref()
        .is_some_and(|k| k.is_disabled(&name));
    if in_file && !change.disabled {
        return error(
            StatusCode::CONFLICT,
            "read_only",
            "the keys file disables that account: edit the file and reload",
        );
    }
    match app.keys().set_disabled(&name, change.disabled).await {
        Ok(()) => {
            tracing::info!(
                account = name.as_str(),
                disabled = change.disabled,
                "account changed"
            );
            json_response(
                StatusCode::OK,
                &json!({"account": name, "disabled": change.disabled}),
            )
        }
        Err(e) => key_error(&e),
    }
}

/// A path segment decoded (`%20` → space; `+` stays `+`); empty if it
/// does not decode to UTF-8.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .unwrap_or_default()
}
