//! `GET /v1/ledger`: an account's events, page by page (oldest first).

use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::{error, json_response};
use crate::pipeline::Turnstile;
use crate::wire::body::Body;

/// Events a page holds unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 100;
/// The most a page may hold.
const MAX_LIMIT: usize = 1000;

/// What a page asks for.
#[derive(Debug, PartialEq, Eq)]
struct Ask {
    account: String,
    after: Option<String>,
    limit: usize,
}

fn ask(query: &str) -> Result<Ask, String> {
    let mut account = None;
    let mut after = None;
    let mut limit = DEFAULT_LIMIT;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let once = |seen: bool| {
            if seen {
                Err(format!("{k} is given twice"))
            } else {
                Ok(())
            }
        };
        match &*k {
            "account" => {
                once(account.is_some())?;
                account = Some(v.into_owned());
            }
            "after" => {
                once(after.is_some())?;
                after = Some(v.into_owned());
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| format!("limit must be 1 to {MAX_LIMIT}"))?;
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}: account, after, limit"
                ))
            }
        }
    }
    let account = account.filter(|a| !a.is_empty()).ok_or(
        "account is required: the account's name, or key:<fingerprint> for a key without one",
    )?;
    Ok(Ask {
        account,
        after,
        limit,
    })
}

/// One page of an account's events.
pub(super) async fn page(app: &Turnstile, query: &str) -> Response<Body> {
    let Some(ledger) = app.ledger() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no [ledger] is configured",
        );
    };
    let ask = match ask(query) {
        Ok(a) => a,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", &m),
    };
    if ask
        .after
        .as_deref()
        .is_some_and(|a| crate::ledger::event_position(a).is_none())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "after must be an event id from this ledger",
        );
    }
    match ledger
        .page(ask.account.clone(), ask.after.as_deref(), ask.limit)
        .await
    {
        Ok(page) => {
            let events: Vec<Value> = page
                .events
                .iter()
                .filter_map(|b| serde_json::from_str(b).ok())
                .collect();
            json_response(
                StatusCode::OK,
                &json!({ "account": ask.account, "events": events, "next": page.next }),
            )
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger_unavailable",
            &e.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_asks_for_one_account_within_bounds() {
        let a = ask("account=acme&after=x&limit=5").unwrap();
        assert_eq!(a.account, "acme");
        assert_eq!(a.after.as_deref(), Some("x"));
        assert_eq!(a.limit, 5);
        assert_eq!(ask("account=acme").unwrap().limit, 100);
        assert!(ask("").is_err());
        assert!(ask("account=").is_err());
        assert!(ask("account=a&account=b").is_err());
        assert!(ask("account=a&limit=0").is_err());
        assert!(ask("account=a&limit=1001").is_err());
        assert!(ask("account=a&limit=ten").is_err());
        assert!(ask("account=a&page=2").is_err());
    }
}
