//! SPEC §4 on the wire: key sources, the five 401s, and what the upstream
//! learns about the caller.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

const CONFIG: &str = r#"
[upstream]
url = "{upstream}"

[identity]
sources = ["bearer", "header:x-api-key", "query:api_key"]
prefix = "rfn_live_"
keys_file = "keys.toml"

[[routes]]
name = "mcp"
path = "/mcp"

[plans.team]
[[plans.team.limits]]
name = "minute"
requests = 60
window = "1m"
"#;

const KEYS: &str = r#"
[[keys]]
key = "rfn_live_good"
account = "acme"
plan = "team"

[[keys]]
sha256 = "SHA_OF_HASHED"
plan = "team"

[[keys]]
key = "rfn_live_revoked"
account = "acme"
plan = "team"
revoked = true
"#;

async fn setup() -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let digest = hex::encode(turnstile::keys::identity::digest("rfn_live_hashed"));
    let keys = KEYS.replace("SHA_OF_HASHED", &digest);
    let proxy = Proxy::start_with(CONFIG, &up, &[("keys.toml", &keys)]).await;
    (up, proxy)
}

async fn with_header(p: &Proxy, name: &str, value: &str) -> Got {
    send(
        req("POST", &p.url("/mcp"))
            .header(name, value)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn five_distinct_401s_with_www_authenticate() {
    let (up, p) = setup().await;
    let cases = [
        (call("POST", &p.url("/mcp"), None).await, "API key missing: send it as Authorization: Bearer <key> or x-api-key header or ?api_key= query parameter"),
        (with_header(&p, "authorization", "Basic dXNlcjpwYXNz").await, "malformed Authorization header: expected \"Bearer <key>\""),
        (with_header(&p, "authorization", "Bearer").await, "malformed Authorization header: expected \"Bearer <key>\""),
        (call("POST", &p.url("/mcp"), Some("sk_test_123")).await, "API key must start with \"rfn_live_\""),
        (call("POST", &p.url("/mcp"), Some("rfn_live_nope")).await, "unknown API key"),
        (call("POST", &p.url("/mcp"), Some("rfn_live_revoked")).await, "API key revoked"),
    ];
    for (r, message) in cases {
        assert_eq!(r.status, 401, "{message}");
        assert_eq!(r.h("www-authenticate"), "Bearer");
        assert_eq!(r.h("content-type"), "application/json");
        assert_eq!(r.json()["error"], "unauthorized");
        assert_eq!(r.json()["message"], message);
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn every_source_works_and_a_malformed_one_does_not_fall_through() {
    let (up, p) = setup().await;
    assert_eq!(
        call("POST", &p.url("/mcp"), Some("rfn_live_good"))
            .await
            .status,
        200
    );
    assert_eq!(
        with_header(&p, "x-api-key", "rfn_live_good").await.status,
        200
    );
    assert_eq!(
        call("POST", &p.url("/mcp?x=1&api_key=rfn_live_good"), None)
            .await
            .status,
        200
    );
    // Keys listed by SHA-256 digest are recognised.
    assert_eq!(
        call("POST", &p.url("/mcp"), Some("rfn_live_hashed"))
            .await
            .status,
        200
    );
    let r = send(
        req("POST", &p.url("/mcp"))
            .header("authorization", "Token x")
            .header("x-api-key", "rfn_live_good")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(up.hits(), 4);
}

#[tokio::test]
async fn upstream_gets_account_and_plan_never_spoofed_copies() {
    let (up, p) = setup().await;
    let r = send(
        req("POST", &p.url("/mcp"))
            .header("authorization", "Bearer rfn_live_good")
            .header("x-turnstile-account", "evil")
            .header("x-turnstile-plan", "enterprise")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(
        seen.headers
            .get_all("x-turnstile-account")
            .iter()
            .collect::<Vec<_>>(),
        ["acme"]
    );
    assert_eq!(
        seen.headers
            .get_all("x-turnstile-plan")
            .iter()
            .collect::<Vec<_>>(),
        ["team"]
    );
    // Credentials go upstream unchanged: it may do its own auth.
    assert_eq!(seen.headers["authorization"], "Bearer rfn_live_good");

    // A key without an account is its own account, named by its fingerprint.
    call("POST", &p.url("/mcp"), Some("rfn_live_hashed")).await;
    let fp = &hex::encode(turnstile::keys::identity::digest("rfn_live_hashed"))[..8];
    assert_eq!(up.last().headers["x-turnstile-account"], fp);
}

#[tokio::test]
async fn without_a_keys_file_every_key_is_its_own_account_on_the_default_plan() {
    let up = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"
account_header = "X-Account"
plan_header = "X-Plan"
[identity]
default_plan = "free"
[[routes]]
name = "gen"
path = "/gen"
[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 1
window = "1m"
[plans.other]
"#;
    let p = Proxy::start(config, &up).await;
    assert_eq!(
        call("GET", &p.url("/gen"), Some("anything-1")).await.status,
        200
    );
    assert_eq!(up.last().headers["x-plan"], "free");
    assert_eq!(
        up.last().headers["x-account"],
        &hex::encode(turnstile::keys::identity::digest("anything-1"))[..8]
    );
    assert_eq!(
        call("GET", &p.url("/gen"), Some("anything-1")).await.status,
        429
    );
    assert_eq!(
        call("GET", &p.url("/gen"), Some("anything-2")).await.status,
        200,
        "each key has its own counter"
    );
}

#[tokio::test]
async fn unknown_key_default_admits_unlisted_keys_on_the_default_plan() {
    let up = Upstream::start().await;
    let config = r#"
[upstream]
url = "{upstream}"
[identity]
keys_file = "keys.toml"
unknown_key = "default"
default_plan = "trial"
[[routes]]
name = "gen"
path = "/gen"
[plans.trial]
[plans.paid]
"#;
    let keys = "[[keys]]\nkey = \"paid-key\"\nplan = \"paid\"\n\n[[keys]]\nkey = \"gone\"\nplan = \"paid\"\nrevoked = true\n";
    let p = Proxy::start_with(config, &up, &[("keys.toml", keys)]).await;
    assert_eq!(
        call("GET", &p.url("/gen"), Some("stranger")).await.status,
        200
    );
    assert_eq!(up.last().headers["x-turnstile-plan"], "trial");
    assert_eq!(
        call("GET", &p.url("/gen"), Some("paid-key")).await.status,
        200
    );
    assert_eq!(up.last().headers["x-turnstile-plan"], "paid");
    assert_eq!(call("GET", &p.url("/gen"), Some("gone")).await.status, 401);
}

/// Keys change between requests of one keep-alive connection (a gateway in
/// front of turnstile multiplexes its clients): each request is identified
/// by its own key, never by the one before it on the connection.
#[tokio::test]
async fn each_request_on_a_connection_is_identified_by_its_own_key() {
    let (up, p) = setup().await;
    let request = |key: &str, last: bool| {
        format!(
            "POST /mcp HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-length: 0\r\n{}\r\n",
            if last { "connection: close\r\n" } else { "" }
        )
    };
    let pipelined = [
        request("rfn_live_good", false),
        request("rfn_live_hashed", false),
        request("rfn_live_good", false),
        request("rfn_live_revoked", false),
        request("rfn_live_unknown", false),
        request("rfn_live_good", true),
    ]
    .concat();
    let out = raw(
        p.addr,
        pipelined.as_bytes(),
        std::time::Duration::from_secs(5),
    )
    .await;
    let statuses: Vec<&str> = out.split("HTTP/1.1 ").skip(1).map(|a| &a[..3]).collect();
    assert_eq!(
        statuses,
        ["200", "200", "200", "401", "401", "200"],
        "{out}"
    );
    let accounts: Vec<String> = up
        .seen()
        .iter()
        .map(|s| {
            s.headers["x-turnstile-account"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let hashed = turnstile::keys::identity::Fingerprint::of(&turnstile::keys::identity::digest(
        "rfn_live_hashed",
    ))
    .to_string();
    assert_eq!(accounts, ["acme", hashed.as_str(), "acme", "acme"]);
}
