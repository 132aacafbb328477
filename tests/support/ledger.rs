//! What the ledger's tests share: the routes their configs charge, the
//! admin API, and an account's whole history.

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;

use super::{req, send, Got};

/// The routes of the ledger tests' configs: flat, billed (settled by the
/// answer), refunded (5xx), quota, a job route and its status route.
#[macro_export]
macro_rules! ledger_routes {
    () => {
        r#"
[[routes]]
name = "flat"
path = "/flat"
cost = 10

[[routes]]
name = "billed"
path = "/bill"
cost = 10
settle = "header:x-credits-used"

[[routes]]
name = "refunded"
path = "/status/{code}"
cost = 10
refund_on = ["5xx"]

[[routes]]
name = "quota"
path = "/quota"

[[routes]]
name = "txt2video"
method = "POST"
path = "/gen"
job = { id = "json:/id" }

[[routes]]
name = "status"
method = "GET"
path = "/gen/status"
job_status = { id = "query:id", state = "json:/status", done = ["completed", "failed"] }
"#
    };
}

/// The keys file of the ledger tests: two keys of account `acme`, one of
/// account `beta`.
pub const ACCOUNT_KEYS: &str = r#"
[[keys]]
key = "acme-1"
account = "acme"

[[keys]]
key = "acme-2"
account = "acme"

[[keys]]
key = "beta-1"
account = "beta"
"#;

/// A call to the admin API at `base` (`http://host:port`).
pub async fn admin_at(base: &str, method: &str, path: &str, body: Option<Value>) -> Got {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    send(
        req(method, &format!("{base}{path}"))
            .body(Full::new(body))
            .unwrap(),
    )
    .await
}

/// Every event of `account` the instance with admin API `base` holds,
/// paging 1000 at a time.
pub async fn ledger_history(base: &str, account: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let q = match after.as_str() {
            "" => format!("/v1/ledger?account={account}&limit=1000"),
            a => format!("/v1/ledger?account={account}&limit=1000&after={a}"),
        };
        let got = admin_at(base, "GET", &q, None).await;
        assert_eq!(got.status, 200, "{}", got.body);
        let page = got.json();
        out.extend(page["events"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => return out,
        }
    }
}

/// The events of type `kind`.
pub fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}
