//! `turnstile keys ...`: runtime keys managed from a shell, through a
//! running turnstile's admin API (`--admin URL`, the token from
//! `TURNSTILE_ADMIN_TOKEN`), and `keys hash`, which needs no server.

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// One `turnstile keys` call.
#[derive(Debug, Clone)]
pub enum KeysCall {
    /// `POST /v1/keys`.
    Create {
        /// The account.
        account: String,
        /// The plan.
        plan: String,
        /// A label.
        name: Option<String>,
        /// RFC 3339.
        expires_at: Option<String>,
        /// Print the whole answer as JSON instead of the key alone.
        json: bool,
    },
    /// `GET /v1/keys?account=`.
    List {
        /// The account.
        account: String,
    },
    /// `PATCH /v1/keys/FP {"revoked":true}`.
    Revoke {
        /// The key's fingerprint.
        fingerprint: String,
    },
    /// `PATCH /v1/keys/FP {"plan":PLAN}`.
    Plan {
        /// The key's fingerprint.
        fingerprint: String,
        /// The new plan.
        plan: String,
    },
}

/// The keys-file entry for `key`: only its SHA-256, so the file holds no
/// usable key.
pub fn hash_entry(key: &str) -> String {
    format!(
        "sha256 = \"{}\"",
        hex::encode(crate::keys::identity::digest(key.trim()))
    )
}

/// Carries out `call` against the admin API at `admin`; the text to print,
/// or the error to print.
pub async fn run(admin: &str, token: Option<&str>, call: KeysCall) -> Result<Printed, String> {
    let base = admin.trim_end_matches('/');
    let (method, path, body) = match &call {
        KeysCall::Create {
            account,
            plan,
            name,
            expires_at,
            ..
        } => (
            Method::POST,
            "/v1/keys".to_owned(),
            Some(json!({"account": account, "plan": plan, "name": name, "expires_at": expires_at})),
        ),
        KeysCall::List { account } => {
            let q: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("account", account)
                .finish();
            (Method::GET, format!("/v1/keys?{q}"), None)
        }
        KeysCall::Revoke { fingerprint } => (
            Method::PATCH,
            format!("/v1/keys/{fingerprint}"),
            Some(json!({"revoked": true})),
        ),
        KeysCall::Plan { fingerprint, plan } => (
            Method::PATCH,
            format!("/v1/keys/{fingerprint}"),
            Some(json!({"plan": plan})),
        ),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json");
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("bad --admin URL {admin:?}: {e}"))?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| format!("{base} did not answer within 10 s"))?
        .map_err(|e| format!("cannot reach the admin API at {base}: {e}"))?;
    let status = answer.status();
    let bytes = answer
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        let message = value["message"].as_str().unwrap_or("");
        return Err(format!("{status}: {message}"));
    }
    let pretty = serde_json::to_string_pretty(&value).unwrap_or_default();
    Ok(match (&call, value["key"].as_str()) {
        // The key alone on stdout, so `KEY=$(turnstile keys create ...)` works.
        (KeysCall::Create { json: false, .. }, Some(key)) => Printed {
            stdout: key.to_owned(),
            note: Some(format!(
                "The key is shown this once: only its SHA-256 is kept (fingerprint {}).",
                value["fingerprint"].as_str().unwrap_or("?")
            )),
        },
        _ => Printed {
            stdout: pretty,
            note: None,
        },
    })
}

/// What a `keys` command prints: `stdout` for scripts, `note` for people
/// (standard error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Printed {
    /// The answer.
    pub stdout: String,
    /// A remark beside it.
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_hash_entry_is_the_keys_file_line() {
        assert_eq!(
            super::hash_entry("demo-free-key\n"),
            format!(
                "sha256 = \"{}\"",
                hex::encode(crate::keys::identity::digest("demo-free-key"))
            )
        );
    }
}
