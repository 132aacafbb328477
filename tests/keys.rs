//! Keys at runtime (SPEC §14) against the real binary: created, used,
//! re-planned, revoked, expired, capped per account, disabled with their
//! account, kept across a restart in SQLite, never logged; the caller's own
//! usage at `[server] usage_path`; the `turnstile keys` CLI.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};
use support::*;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"
usage_path = "/v1/limits"

[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"
prefix = "sk-"
key_store = "state/keys.db"
max_keys_per_account = 20

[admin]
listen = "127.0.0.1:{admin_port}"
token = "s3cret"

[[routes]]
name = "gen"
path = "/gen"

[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 2
window = "1m"

[plans.pro]
[[plans.pro.limits]]
name = "pro-minute"
requests = 100
window = "1m"
"#;

const KEYS: &str = r#"
[[keys]]
key = "sk-file-acme"
account = "acme"
plan = "free"

[[keys]]
key = "sk-file-banned"
account = "banned"
plan = "free"

[[accounts]]
name = "banned"
disabled = true
"#;

async fn admin(b: &Binary, method: &str, path: &str, body: Option<Value>) -> Got {
    let r = req(method, &b.admin(path))
        .header("authorization", "Bearer s3cret")
        .header("content-type", "application/json");
    let body = body.map(|v| v.to_string()).unwrap_or_default();
    send(r.body(Full::new(Bytes::from(body))).unwrap()).await
}

async fn start(dir: &tempfile::TempDir, up: &Upstream) -> Binary {
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    let b = Binary::start(dir.path(), CONFIG, up).await;
    b.wait_admin().await;
    b
}

async fn create(b: &Binary, account: &str, plan: &str) -> (String, String) {
    let made = admin(
        b,
        "POST",
        "/v1/keys",
        Some(json!({"account": account, "plan": plan, "name": "ci"})),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let v = made.json();
    (
        v["key"].as_str().unwrap().to_owned(),
        v["fingerprint"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn created_used_replanned_revoked_and_kept_across_a_restart() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut b = start(&dir, &up).await;

    let made = admin(
        &b,
        "POST",
        "/v1/keys",
        Some(json!({"account": "acme", "plan": "free", "name": "ci"})),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let v = made.json();
    let key = v["key"].as_str().unwrap().to_owned();
    let fp = v["fingerprint"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-") && key.len() >= 3 + 22, "{key}");
    assert!(
        key[3..].bytes().all(|c| c.is_ascii_alphanumeric()),
        "base62: {key}"
    );
    assert_eq!(fp.len(), 8);
    assert_eq!(
        (
            v["account"].as_str(),
            v["plan"].as_str(),
            v["name"].as_str()
        ),
        (Some("acme"), Some("free"), Some("ci"))
    );
    assert_eq!(v["revoked"], false);

    // In force at once, on its plan's limits.
    let statuses: Vec<u16> = {
        let mut s = Vec::new();
        for _ in 0..3 {
            s.push(call("GET", &b.url("/gen"), Some(&key)).await.status);
        }
        s
    };
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(up.hits(), 2);
    assert_eq!(
        up.last().headers.get("x-turnstile-account").unwrap(),
        "acme"
    );

    // Re-planned: the next request is under the new plan's limits.
    let changed = admin(
        &b,
        "PATCH",
        &format!("/v1/keys/{fp}"),
        Some(json!({"plan": "pro"})),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    let got = call("GET", &b.url("/gen"), Some(&key)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.h("x-ratelimit-limit"), "100");

    // Listed with the account's file key, which the API will not change.
    let listed = admin(&b, "GET", "/v1/keys?account=acme", None).await.json();
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{listed}");
    assert!(keys
        .iter()
        .any(|k| k["source"] == "file" && k["plan"] == "free"));
    assert!(keys.iter().any(|k| k["source"] == "runtime"
        && k["fingerprint"] == fp.as_str()
        && k["plan"] == "pro"));
    assert!(
        !listed.to_string().contains(&key),
        "the key is shown once only"
    );
    let file_fp = keys.iter().find(|k| k["source"] == "file").unwrap()["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let read_only = admin(
        &b,
        "PATCH",
        &format!("/v1/keys/{file_fp}"),
        Some(json!({"revoked": true})),
    )
    .await;
    assert_eq!(read_only.status, 409, "{}", read_only.body);
    assert_eq!(
        admin(
            &b,
            "PATCH",
            "/v1/keys/00000000",
            Some(json!({"plan": "pro"}))
        )
        .await
        .status,
        404
    );
    let bad_plan = admin(
        &b,
        "PATCH",
        &format!("/v1/keys/{fp}"),
        Some(json!({"plan": "gold"})),
    )
    .await;
    assert_eq!(bad_plan.status, 400);
    assert!(
        bad_plan.body.contains("unknown plan \\\"gold\\\""),
        "{}",
        bad_plan.body
    );

    // A second key, to find after the restart.
    let (kept, _) = create(&b, "acme", "free").await;
    assert_eq!(call("GET", &b.url("/gen"), Some(&kept)).await.status, 200);

    // Revoked: refused from the next request on, for good.
    let revoked = admin(
        &b,
        "PATCH",
        &format!("/v1/keys/{fp}"),
        Some(json!({"revoked": true})),
    )
    .await;
    assert_eq!(revoked.status, 200);
    let refused = call("GET", &b.url("/gen"), Some(&key)).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["message"], "API key revoked");
    let back = admin(
        &b,
        "PATCH",
        &format!("/v1/keys/{fp}"),
        Some(json!({"revoked": false})),
    )
    .await;
    assert_eq!(back.status, 409);

    // Restart: the SQLite file keeps both.
    let (port, admin_port) = (b.port, b.admin_port);
    b.signal("TERM");
    assert!(b.wait().await.success());
    assert!(
        !b.logs().contains(&key) && !b.logs().contains(&kept),
        "a key in the logs"
    );
    let b = Binary::restart(dir.path(), port, admin_port).await;
    b.wait_admin().await;
    assert_eq!(call("GET", &b.url("/gen"), Some(&kept)).await.status, 200);
    assert_eq!(call("GET", &b.url("/gen"), Some(&key)).await.status, 401);
    assert!(dir.path().join("state/keys.db").exists());
    assert!(
        !std::fs::read(dir.path().join("state/keys.db"))
            .unwrap()
            .windows(kept.len())
            .any(|w| w == kept.as_bytes()),
        "only the digest is stored"
    );
}

#[tokio::test]
async fn fifty_parallel_creations_against_a_cap_of_twenty() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = std::sync::Arc::new(start(&dir, &up).await);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                admin(
                    &b,
                    "POST",
                    "/v1/keys",
                    Some(json!({"account": "bulk", "plan": "free"})),
                )
                .await
            })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    let tally = tally(got.iter().map(|g| g.status));
    assert_eq!(tally.get(&201), Some(&20), "{tally:?}");
    assert_eq!(tally.get(&409), Some(&30), "{tally:?}");
    let refusal = got.iter().find(|g| g.status == 409).unwrap().json();
    assert_eq!(refusal["error"], "too_many_keys");
    // Every created key works, and they are all different.
    let keys: std::collections::HashSet<String> = got
        .iter()
        .filter(|g| g.status == 201)
        .map(|g| g.json()["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 20);
    for k in keys.iter().take(3) {
        assert_eq!(call("GET", &b.url("/gen"), Some(k)).await.status, 200);
    }
    // Revoking one makes room for one.
    let listed = admin(&b, "GET", "/v1/keys?account=bulk", None).await.json();
    let fp = listed["keys"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        admin(
            &b,
            "PATCH",
            &format!("/v1/keys/{fp}"),
            Some(json!({"revoked": true}))
        )
        .await
        .status,
        200
    );
    let one_more = || {
        admin(
            &b,
            "POST",
            "/v1/keys",
            Some(json!({"account": "bulk", "plan": "free"})),
        )
    };
    assert_eq!(one_more().await.status, 201);
    assert_eq!(one_more().await.status, 409);
}

#[tokio::test]
async fn disabled_accounts_refuse_every_key() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(&dir, &up).await;
    // Disabled in the keys file.
    let got = call("GET", &b.url("/gen"), Some("sk-file-banned")).await;
    assert_eq!(
        (got.status, got.json()["message"].clone()),
        (401, json!("account disabled"))
    );
    // Disabled through the API: file and runtime keys of the account alike.
    let (key, _) = create(&b, "acme", "free").await;
    assert_eq!(call("GET", &b.url("/gen"), Some(&key)).await.status, 200);
    let off = admin(
        &b,
        "PATCH",
        "/v1/accounts/acme",
        Some(json!({"disabled": true})),
    )
    .await;
    assert_eq!(off.status, 200, "{}", off.body);
    for k in [key.as_str(), "sk-file-acme"] {
        let got = call("GET", &b.url("/gen"), Some(k)).await;
        assert_eq!(
            (got.status, got.json()["message"].clone()),
            (401, json!("account disabled")),
            "{k}"
        );
    }
    assert_eq!(
        admin(&b, "GET", "/v1/keys?account=acme", None).await.json()["disabled"],
        true
    );
    assert_eq!(
        admin(
            &b,
            "PATCH",
            "/v1/accounts/acme",
            Some(json!({"disabled": false}))
        )
        .await
        .status,
        200
    );
    assert_eq!(call("GET", &b.url("/gen"), Some(&key)).await.status, 200);
    // The file's word stands.
    assert_eq!(
        admin(
            &b,
            "PATCH",
            "/v1/accounts/banned",
            Some(json!({"disabled": false}))
        )
        .await
        .status,
        409
    );
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn callers_read_their_own_usage_uncounted() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(&dir, &up).await;
    let (key, fp) = create(&b, "acme", "free").await;
    assert_eq!(call("GET", &b.url("/gen"), Some(&key)).await.status, 200);
    for _ in 0..5 {
        let mine = call("GET", &b.url("/v1/limits?key=sk-file-acme"), Some(&key)).await;
        assert_eq!(mine.status, 200, "{}", mine.body);
        let v = mine.json();
        assert_eq!(
            v["key"],
            fp.as_str(),
            "the caller's own, whatever the query says"
        );
        assert_eq!(v["plan"], "free");
        assert_eq!(v["counters"][0]["name"], "minute");
        assert_eq!(v["counters"][0]["used"], 1, "never counted: {v}");
        assert_eq!(v["counters"][0]["remaining"], 1);
    }
    assert_eq!(call("GET", &b.url("/gen"), Some(&key)).await.status, 200);
    assert_eq!(call("GET", &b.url("/v1/limits"), None).await.status, 401);
    assert_eq!(
        call("GET", &b.url("/v1/limits"), Some("sk-nope"))
            .await
            .status,
        401
    );
    assert_eq!(up.hits(), 2, "usage answers never reach the upstream");
}

#[tokio::test]
async fn the_cli_creates_lists_and_revokes() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(&dir, &up).await;
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .arg("keys")
            .args(args)
            .arg("--admin")
            .arg(format!("http://127.0.0.1:{}", b.admin_port))
            .env("TURNSTILE_ADMIN_TOKEN", "s3cret")
            .output()
            .unwrap()
    };
    let out = cli(&[
        "create",
        "--account",
        "acme",
        "--plan",
        "pro",
        "--name",
        "laptop",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The key alone on stdout (so KEY=$(turnstile keys create ...) works);
    // the reminder that it is shown once on stderr.
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.trim_end_matches('\n').to_owned();
    assert!(
        key.starts_with("sk-") && !key.contains(char::is_whitespace),
        "{text:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("shown this once"));
    assert_eq!(call("GET", &b.url("/gen"), Some(&key)).await.status, 200);
    // --json: the whole answer, key included.
    let out = cli(&["create", "--account", "acme", "--plan", "pro", "--json"]);
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let second = created["key"].as_str().unwrap();
    assert!(second.starts_with("sk-") && second != key, "{created}");
    assert_eq!(
        created["fingerprint"].as_str().unwrap().len(),
        8,
        "{created}"
    );

    let out = cli(&["list", "--account", "acme"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runtime = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["source"] == "runtime" && k["fingerprint"] != created["fingerprint"])
        .unwrap()
        .clone();
    assert_eq!(runtime["name"], "laptop");
    let fp = runtime["fingerprint"].as_str().unwrap();
    assert!(cli(&["revoke", fp]).status.success());
    assert_eq!(call("GET", &b.url("/gen"), Some(&key)).await.status, 401);
    // Errors say what went wrong and exit non-zero.
    let out = cli(&["create", "--account", "acme", "--plan", "gold"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown plan"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `hash` needs no server: its line works in a keys file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["keys", "hash", "sk-offline"])
        .output()
        .unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        line.trim(),
        format!(
            "sha256 = \"{}\"",
            turnstile::keys::identity::digest("sk-offline")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    );
}

/// Expiry runs on the injected clock: the in-process server with a fake one.
#[tokio::test]
async fn expired_keys_are_refused() {
    let up = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"
key_store = "keys.db"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "gen"
path = "/gen"

[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 100
window = "1m"
"#;
    let expires = |secs: u64| {
        time::OffsetDateTime::from_unix_timestamp(secs as i64)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let keys = format!(
        "[[keys]]\nkey = \"file-key\"\nplan = \"free\"\nexpires_at = \"{}\"\n",
        expires(T0 + 100)
    );
    let p = Proxy::start_with(config, &up, &[("keys.toml", &keys)]).await;
    let made = send(
        req("POST", &p.admin_url("/v1/keys"))
            .body(Full::new(Bytes::from(
                json!({"account": "acme", "plan": "free", "expires_at": expires(T0 + 100)})
                    .to_string(),
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let key = made.json()["key"].as_str().unwrap().to_owned();
    for k in [key.as_str(), "file-key"] {
        assert_eq!(call("GET", &p.url("/gen"), Some(k)).await.status, 200);
    }
    p.advance_secs(90);
    for k in [key.as_str(), "file-key"] {
        let got = call("GET", &p.url("/gen"), Some(k)).await;
        assert_eq!(got.status, 401, "{k}");
        assert_eq!(got.json()["message"], "API key expired");
    }
    let past = send(
        req("POST", &p.admin_url("/v1/keys"))
            .body(Full::new(Bytes::from(
                json!({"account": "acme", "plan": "free", "expires_at": expires(T0)}).to_string(),
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(past.status, 400, "{}", past.body);
}

#[test]
fn a_keys_file_over_the_cap_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("turnstile.toml"),
        "[upstream]\nurl = \"http://127.0.0.1:9\"\n[identity]\nkeys_file = \"keys.toml\"\nmax_keys_per_account = 2\n[plans.free]\n",
    )
    .unwrap();
    let keys: String = (0..3)
        .map(|i| format!("[[keys]]\nkey = \"k{i}\"\naccount = \"acme\"\nplan = \"free\"\n\n"))
        .collect();
    std::fs::write(dir.path().join("keys.toml"), keys).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["check", "--config"])
        .arg(dir.path().join("turnstile.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keys.toml:11:1") && err.contains("max_keys_per_account = 2"),
        "{err}"
    );
}

/// The admin API's usage, reset and lookup calls find runtime keys like
/// file keys: by key, by fingerprint and through their account.
#[tokio::test]
async fn admin_usage_and_reset_see_runtime_keys() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let b = start(&dir, &up).await;
    let (key, fp) = create(&b, "acme", "free").await;
    for _ in 0..2 {
        assert_eq!(call("GET", &b.url("/gen"), Some(&key)).await.status, 200);
    }
    assert_eq!(call("GET", &b.url("/gen"), Some(&key)).await.status, 429);
    let by_key = admin(&b, "GET", &format!("/v1/usage?key={key}"), None).await;
    assert_eq!(by_key.status, 200, "{}", by_key.body);
    let v = by_key.json();
    assert_eq!(
        (v["key"].as_str(), v["plan"].as_str()),
        (Some(fp.as_str()), Some("free"))
    );
    assert_eq!(v["counters"][0]["used"], 2);
    let by_fp = admin(&b, "GET", &format!("/v1/usage?fingerprint={fp}"), None).await;
    assert_eq!(by_fp.json(), v);
    let account = admin(&b, "GET", "/v1/usage?account=acme", None)
        .await
        .json();
    assert!(
        account["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == fp.as_str()),
        "{account}"
    );
    // A reset by key gives the runtime key its quota back.
    let reset = admin(&b, "DELETE", &format!("/v1/usage?key={key}"), None).await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    assert_eq!(call("GET", &b.url("/gen"), Some(&key)).await.status, 200);
}
