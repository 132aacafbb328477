//! `GET /v1/credits` and `POST /v1/credits` (docs/configuration.md, "Cost, credits and refunds"): a credits
//! balance read, topped up (`{"add": N}`) or set (`{"set": N}`) in one
//! atomic store operation, so a change never races the requests spending it.

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::{
    account_keys, error, json_response, key_view, no_target, rows_of, store_error, target,
    unknown_fingerprint,
};
use super::{Row, Target};
use crate::config::Policy;
use crate::keys::runtime::KeyCache;
use crate::limits::{Per, Rule};
use crate::pipeline::usage::next_refill;
use crate::pipeline::Turnstile;
use crate::store::{BalanceChange, OwnedCheck};
use crate::wire::body::Body;

/// Largest body a `POST /v1/credits` may carry.
const MAX_BODY: usize = 4096;

/// The one balance a call addresses: the key's (per-key limits) or its
/// account's, or an account's shared one; `name=` picks among several.
fn balance_row<'p>(
    policy: &'p Policy,
    app_keys: &KeyCache,
    query: &str,
) -> Result<Row<'p>, Box<Response<Body>>> {
    let mut rows = Vec::new();
    match target(policy, app_keys, query) {
        None => return Err(Box::new(no_target())),
        Some(Target::UnknownFingerprint(fp)) => return Err(Box::new(unknown_fingerprint(&fp))),
        Some(Target::Key(digest)) => {
            let Some(key) = key_view(policy, app_keys, digest) else {
                return Err(Box::new(error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "unknown API key",
                )));
            };
            rows_of(policy, &key, None, &mut rows);
        }
        Some(Target::Account(account)) => {
            let keys = account_keys(policy, app_keys, &account);
            let Some(first) = keys.first() else {
                return Err(Box::new(error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no key belongs to account {account:?}"),
                )));
            };
            rows_of(policy, first, Some(Per::Account), &mut rows);
        }
    }
    let name = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.into_owned());
    rows.retain(|r| {
        matches!(r.spec.rule, Rule::Credits(_))
            && name.as_deref().is_none_or(|n| *r.spec.name == *n)
    });
    match rows.len() {
        1 => Ok(rows.remove(0)),
        0 => Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no credits balance for this key or account (a per-key balance is addressed with key=)",
        ))),
        _ => {
            let names: Vec<&str> = rows.iter().map(|r| &*r.spec.name).collect();
            Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!(
                    "several balances ({}): name one with &name=",
                    names.join(", ")
                ),
            )))
        }
    }
}

/// The balance as the admin API shows it.
async fn answer(app: &Turnstile, row: &Row<'_>, change: BalanceChange) -> Response<Body> {
    let Rule::Credits(credits) = row.spec.rule else {
        return error(StatusCode::NOT_FOUND, "not_found", "not a credits limit");
    };
    let owned = OwnedCheck::of(&row.check);
    match app.store().balance(&owned, change).await {
        Ok(balance) => json_response(
            StatusCode::OK,
            &json!({
                "name": &*row.spec.name,
                "balance": balance,
                "grant": credits.grant,
                "next_refill": next_refill(row.spec, app.store().in_process().now()),
            }),
        ),
        Err(e) => store_error(e),
    }
}

/// `GET /v1/credits?account=A` (or `key=K`).
pub(super) async fn show(app: &Turnstile, policy: &Policy, query: &str) -> Response<Body> {
    match balance_row(policy, app.keys().cache(), query) {
        Ok(row) => answer(app, &row, BalanceChange::Read).await,
        Err(r) => *r,
    }
}

/// `POST /v1/credits?account=A` with `{"add": N}` or `{"set": N}`.
pub(super) async fn change(
    app: &Turnstile,
    policy: &Policy,
    query: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let row = match balance_row(policy, app.keys().cache(), query) {
        Ok(row) => row,
        Err(r) => return *r,
    };
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("could not read the body: {e}"),
            )
        }
    };
    let change = match parse_change(&bytes) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", &m),
    };
    let response = answer(app, &row, change).await;
    if response.status().is_success() {
        tracing::info!(
            limit = &*row.spec.name,
            ?change,
            "credits balance changed through the admin API"
        );
    }
    response
}

/// `{"add": N}` or `{"set": N}`, N a whole number.
fn parse_change(bytes: &[u8]) -> Result<BalanceChange, String> {
    const EXPECTED: &str = "expected {\"add\": N} or {\"set\": N} with N a whole number";
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("{EXPECTED}: {e}"))?;
    let Some(obj) = v.as_object().filter(|o| o.len() == 1) else {
        return Err(EXPECTED.into());
    };
    match (
        obj.get("add").map(Value::as_i64),
        obj.get("set").map(Value::as_i64),
    ) {
        (Some(Some(n)), None) => Ok(BalanceChange::Add(n)),
        (None, Some(Some(n))) => Ok(BalanceChange::Set(n)),
        _ => Err(EXPECTED.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_add_or_set_with_a_whole_number() {
        assert_eq!(parse_change(br#"{"add":100}"#), Ok(BalanceChange::Add(100)));
        assert_eq!(parse_change(br#"{"add":-5}"#), Ok(BalanceChange::Add(-5)));
        assert_eq!(parse_change(br#"{"set":500}"#), Ok(BalanceChange::Set(500)));
        for bad in [
            &br#"{"add":1.5}"#[..],
            br#"{"add":1,"set":2}"#,
            br#"{}"#,
            b"[1]",
            b"x",
            br#"{"take":1}"#,
        ] {
            assert!(
                parse_change(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
