//! The decision service: turnstile deciding for another gateway. The HTTP
//! endpoint with each gateway's convention (Traefik and Caddy, nginx,
//! Envoy `ext_authz`), the refusals exactly as the proxy sends them, the
//! decisions counted with proxied requests; routes that cannot be decided
//! refused at load; Envoy's rate limit service over gRPC with tonic's
//! client. The upstream is never contacted by a decision.

mod support;

use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::Bytes;
use support::*;
use turnstile::decision::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use turnstile::decision::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use turnstile::decision::proto::envoy::service::ratelimit::v3 as rls;

pub const CONFIG: &str = r#"
[upstream]
url = "{upstream}"

[decision]
listen = "127.0.0.1:0"
grpc_listen = "127.0.0.1:0"
path_prefix = "/check"

[decision.envoy]
domain = "genapi"
key = "api_key"
route = "route"

[identity]
sources = ["bearer"]
keys_file = "keys.toml"

[[routes]]
name = "gen"
method = "POST"
path = "/v1/generate"

[[routes]]
name = "status"
method = "GET"
path = "/v1/status/*"

[[routes]]
name = "pro-only"
path = "/v1/pro"
plans = ["pro"]

[plans.free]
[[plans.free.limits]]
name = "per-minute"
routes = ["gen"]
requests = 2
window = "1m"

[[plans.free.limits]]
name = "monthly-credits"
kind = "credits"
routes = ["gen"]
grant = 10
refill = "month"

[plans.pro]
limits = []
"#;

pub const KEYS: &str = r#"
[[keys]]
key = "free-1"
plan = "free"
account = "acme"

[[keys]]
key = "free-2"
plan = "free"
account = "bolt"
"#;

async fn start() -> (Proxy, Upstream) {
    let up = Upstream::start().await;
    let p = Proxy::start_with(CONFIG, &up, &[("keys.toml", KEYS)]).await;
    (p, up)
}

/// A decision request to `addr`: `path` with `headers` and a bearer key.
async fn ask(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    key: Option<&str>,
) -> Got {
    let mut b = req(method, &format!("http://{addr}{path}"));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    send(b.body(Full::new(Bytes::new())).unwrap()).await
}

/// `POST /v1/generate` for `key`, as Traefik and Caddy describe it.
async fn generate(d: SocketAddr, key: &str) -> Got {
    ask(d, "GET", "/", &traefik("POST", "/v1/generate"), Some(key)).await
}

/// `POST /v1/generate` for `key`, as nginx describes it.
async fn generate_nginx(d: SocketAddr, key: &str) -> Got {
    ask(d, "GET", "/auth", &nginx("POST", "/v1/generate"), Some(key)).await
}

fn traefik(method: &'static str, uri: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("x-forwarded-method", method),
        ("x-forwarded-uri", uri),
        ("x-forwarded-host", "api.example"),
    ]
}

fn nginx(method: &'static str, uri: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![("x-original-method", method), ("x-original-uri", uri)]
}

#[tokio::test]
async fn forward_auth_answers_200_with_headers_then_exactly_the_proxys_429() {
    let (p, up) = start().await;
    let d = p.decision.unwrap();
    let r = generate(d, "free-1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.h("x-ratelimit-limit"), "2");
    assert_eq!(r.h("x-ratelimit-remaining"), "1");
    assert_eq!(r.h("x-turnstile-account"), "acme");
    assert_eq!(r.h("x-turnstile-plan"), "free");
    assert!(r.header("x-request-id").is_some());
    // nginx's and Envoy's conventions count on the same limits.
    let r = generate_nginx(d, "free-1").await;
    assert_eq!((r.status, r.h("x-ratelimit-remaining")), (200, "0"));
    let r = ask(d, "POST", "/check/v1/generate", &[], Some("free-1")).await;
    assert_eq!(r.status, 429, "{}", r.body);
    let decided = (r.h("retry-after").to_owned(), r.json());
    assert_eq!(decided.1["error"], "rate_limited");
    assert_eq!(decided.1["rate_limit"]["name"], "per-minute");

    // The proxy refuses the same key with the same answer: decisions count.
    let proxied = call("POST", &p.url("/v1/generate"), Some("free-1")).await;
    assert_eq!(proxied.status, 429);
    assert_eq!(
        (proxied.h("retry-after").to_owned(), proxied.json()),
        decided
    );
    for name in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "content-type",
    ] {
        assert_eq!(proxied.header(name), r.header(name), "{name}");
    }
    assert_eq!(up.hits(), 0, "a decision never reaches the upstream");

    // Another key is counted on its own.
    let r = generate(d, "free-2").await;
    assert_eq!((r.status, r.h("x-turnstile-account")), (200, "bolt"));
}

#[tokio::test]
async fn refusals_are_the_proxys_own_401_403_402_and_404() {
    let (p, _up) = start().await;
    let d = p.decision.unwrap();
    let r = ask(d, "GET", "/", &traefik("POST", "/v1/generate"), None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "unauthorized");
    let r = generate(d, "nobody").await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (401, Some("unknown API key"))
    );
    let r = ask(d, "GET", "/", &traefik("GET", "/v1/pro"), Some("free-1")).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("plan_required"))
    );
    let r = ask(d, "GET", "/", &traefik("GET", "/nowhere"), Some("free-1")).await;
    assert_eq!(
        r.status, 200,
        "unmatched requests follow [server] unmatched (forward)"
    );
    // The routes of other methods are not this one.
    let r = ask(
        d,
        "GET",
        "/",
        &traefik("GET", "/v1/generate"),
        Some("free-1"),
    )
    .await;
    assert_eq!((r.status, r.header("x-ratelimit-limit")), (200, None));

    // Credits: 10 a month, 1 a request; two a minute fit the minute limit.
    for _ in 0..5 {
        for _ in 0..2 {
            let r = generate(d, "free-2").await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        p.advance_secs(60);
    }
    let r = generate(d, "free-2").await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (402, Some("insufficient_credits"))
    );
}

#[tokio::test]
async fn every_spelling_of_a_limited_path_is_limited() {
    let (p, up) = start().await;
    let d = p.decision.unwrap();
    for _ in 0..2 {
        let r = generate(d, "free-1").await;
        assert_eq!(r.status, 200);
    }
    for spelling in [
        "/v1/generate",
        "/v1//generate",
        "/v1/./generate",
        "/v1/x/../generate",
        "/v1/%67enerate",
        "/V1/generate",
        "/v1/generate?x=1",
        "/v1/generate/",
        "/v1/generate%2F",
    ] {
        let r = ask(
            d,
            "GET",
            "/",
            &[
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", spelling),
            ],
            Some("free-1"),
        )
        .await;
        assert!(
            r.status == 429 || r.status == 400 || r.status == 404,
            "{spelling}: {} {}",
            r.status,
            r.body
        );
    }
    // Read two ways: refused, never guessed.
    for headers in [
        vec![
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/v1/generate"),
            ("x-original-uri", "/free"),
            ("x-original-method", "GET"),
        ],
        vec![("x-forwarded-uri", "/free")],
        vec![
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/free"),
            ("x-forwarded-uri", "/v1/generate"),
        ],
        vec![
            ("x-forwarded-method", "post"),
            ("x-forwarded-uri", "/v1/generate"),
        ],
    ] {
        let r = ask(d, "GET", "/", &headers, Some("free-1")).await;
        assert_eq!(r.status, 400, "{headers:?}: {}", r.body);
    }
    let r = ask(d, "POST", "/elsewhere/v1/generate", &[], Some("free-1")).await;
    assert_eq!(r.status, 400, "outside path_prefix");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn nginx_gets_the_refusal_body_in_a_header() {
    let (p, _up) = start().await;
    let d = p.decision.unwrap();
    for _ in 0..2 {
        generate_nginx(d, "free-1").await;
    }
    let r = generate_nginx(d, "free-1").await;
    assert_eq!(r.status, 429);
    let in_header: serde_json::Value = serde_json::from_str(r.h("x-turnstile-refusal")).unwrap();
    assert_eq!(in_header, r.json());
    // Other gateways pass the body on themselves.
    let r = generate(d, "free-1").await;
    assert_eq!(r.status, 429);
    assert!(r.header("x-turnstile-refusal").is_none());
}

fn load(config: &str) -> Result<turnstile::Policy, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, config.replace("{upstream}", "http://127.0.0.1:9")).unwrap();
    std::fs::write(dir.path().join("keys.toml"), KEYS).unwrap();
    turnstile::load(&path).map_err(|e| e.to_string())
}

#[test]
fn routes_that_need_the_answer_or_the_body_cannot_be_decided() {
    let cases = [
        ("job = { id = \"json:/id\" }", "counts jobs"),
        ("settle = \"header:x-used\"", "settle"),
        ("refund_on = [\"5xx\"]", "refund_on"),
        (
            "cost = { by = \"json:/model\", prices = { a = 1 } }",
            "json:",
        ),
        ("when = { \"json:/model\" = \"a\" }", "JSON body"),
        (
            "arg_limits = [{ pointers = [\"/prompt\"], max_chars = 5 }]",
            "arg_limits",
        ),
    ];
    for (line, why) in cases {
        let config = CONFIG.replace("name = \"status\"", &format!("name = \"status\"\n{line}"));
        let e = load(&config).expect_err(line);
        assert!(
            e.contains("t.toml:") && e.contains("route \"status\" cannot be decided"),
            "{e}"
        );
        assert!(e.contains(why), "{line}: {e}");
    }
    let slot = CONFIG.replace(
        "[plans.pro]",
        "[[plans.free.limits]]\nname = \"at-once\"\nkind = \"concurrency\"\nroutes = [\"status\"]\nmax = 2\n\n[plans.pro]",
    );
    let e = load(&slot).unwrap_err();
    assert!(
        e.contains("limit \"at-once\" of plan \"free\" holds a slot"),
        "{e}"
    );
    let pooled = CONFIG.replace(
        "[plans.pro]",
        "[[capacity]]\nname = \"gpu\"\nmax = 4\nroutes = [\"status\"]\n\n[plans.pro]",
    );
    let e = load(&pooled).unwrap_err();
    assert!(e.contains("takes a slot of a capacity pool"), "{e}");
    // Served only where it can be: the others stay with the proxy.
    let listed = slot.replace(
        "path_prefix = \"/check\"",
        "path_prefix = \"/check\"\nroutes = [\"gen\", \"pro-only\"]",
    );
    let table = load(&listed).unwrap().table();
    assert!(
        table.contains(
            "decided for other gateways (HTTP 127.0.0.1:0, gRPC 127.0.0.1:0): gen, pro-only"
        ),
        "{table}"
    );
    let e = load(&listed.replace("\"pro-only\"]", "\"pro_only\"]")).unwrap_err();
    assert!(e.contains("unknown route \"pro_only\""), "{e}");
    let e = load(&CONFIG.replace(
        "listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\n",
        "",
    ))
    .unwrap_err();
    assert!(e.contains("[decision] needs listen"), "{e}");
}

#[tokio::test]
async fn a_route_not_listed_is_not_decided_here() {
    let up = Upstream::start().await;
    let config = CONFIG.replace(
        "path_prefix = \"/check\"",
        "path_prefix = \"/check\"\nroutes = [\"gen\"]",
    );
    let p = Proxy::start_with(&config, &up, &[("keys.toml", KEYS)]).await;
    let r = ask(
        p.decision.unwrap(),
        "GET",
        "/",
        &traefik("GET", "/v1/status/1"),
        Some("free-1"),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (404, Some("not_found"))
    );
    // The proxy still serves it.
    assert_eq!(
        call("GET", &p.url("/v1/status/1"), Some("free-1"))
            .await
            .status,
        200
    );
}

type Client = rls::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>;

async fn grpc(p: &Proxy) -> Client {
    Client::connect(format!("http://{}", p.grpc.unwrap()))
        .await
        .unwrap()
}

fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        limit: None,
        hits_addend: hits,
    }
}

async fn should(
    c: &mut Client,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    hits: u32,
) -> rls::RateLimitResponse {
    let request = rls::RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    };
    c.should_rate_limit(request).await.unwrap().into_inner()
}

fn header<'a>(r: &'a rls::RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

const OK: i32 = rls::rate_limit_response::Code::Ok as i32;
const OVER: i32 = rls::rate_limit_response::Code::OverLimit as i32;

#[tokio::test]
async fn envoys_rate_limit_service_answers_ok_then_over_limit_with_headers_and_body() {
    let (p, up) = start().await;
    let mut c = grpc(&p).await;
    let gen = || descriptor(&[("api_key", "free-1"), ("route", "gen")], None);
    let r = should(&mut c, "genapi", vec![gen()], 0).await;
    assert_eq!(r.overall_code, OK);
    let s = &r.statuses[0];
    assert_eq!(s.code, OK);
    let limit = s.current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit),
        ("per-minute", 2)
    );
    assert_eq!(
        limit.unit,
        rls::rate_limit_response::rate_limit::Unit::Minute as i32
    );
    assert_eq!(s.limit_remaining, 1);
    assert_eq!(
        s.duration_until_reset.unwrap().seconds,
        50,
        "the clock stands 10 s into the minute"
    );
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("1"));
    assert!(r.raw_body.is_empty());

    should(&mut c, "genapi", vec![gen()], 0).await;
    let r = should(&mut c, "genapi", vec![gen()], 0).await;
    assert_eq!((r.overall_code, r.statuses[0].code), (OVER, OVER));
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert_eq!(header(&r, "retry-after"), Some("50"));
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("2"));
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(
        (body["error"].as_str(), body["rate_limit"]["name"].as_str()),
        (Some("rate_limited"), Some("per-minute"))
    );
    // The same key through the proxy: refused too, with the same body.
    let proxied = call("POST", &p.url("/v1/generate"), Some("free-1")).await;
    assert_eq!(proxied.json(), body);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn hits_addend_is_the_cost_and_unknown_keys_and_domains_are_refused() {
    let (p, _up) = start().await;
    let mut c = grpc(&p).await;
    // The monthly credits (10) count hits_addend; the minute limit counts requests.
    let gen = |hits| descriptor(&[("api_key", "free-2"), ("route", "gen")], hits);
    let r = should(&mut c, "genapi", vec![gen(None)], 7).await;
    assert_eq!(r.overall_code, OK);
    // The headers show the minute limit (the balance is not a quota over time).
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("1"));
    let r = should(&mut c, "genapi", vec![gen(Some(4))], 1).await;
    assert_eq!(r.overall_code, OVER, "7 + 4 > 10");
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"], "insufficient_credits");
    // An Authorization header copied as it is: the scheme is dropped.
    let bearer = descriptor(&[("api_key", "Bearer free-2"), ("route", "gen")], Some(3));
    let r = should(&mut c, "genapi", vec![bearer], 1).await;
    assert_eq!(r.overall_code, OK, "the refused 4 took nothing: 7 + 3 = 10");

    for (domain, entries) in [
        ("genapi", vec![("api_key", "nobody"), ("route", "gen")]),
        ("genapi", vec![("route", "gen")]),
        ("other", vec![("api_key", "free-1"), ("route", "gen")]),
    ] {
        let r = should(&mut c, domain, vec![descriptor(&entries, None)], 1).await;
        assert_eq!(r.overall_code, OVER, "{domain} {entries:?}");
        let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
        assert_eq!(body["error"], "unauthorized", "{domain} {entries:?}");
    }
    let r = should(
        &mut c,
        "genapi",
        vec![descriptor(
            &[("api_key", "free-1"), ("route", "nope")],
            None,
        )],
        1,
    )
    .await;
    assert_eq!(r.overall_code, OVER);
    let empty = rls::RateLimitRequest {
        domain: "genapi".into(),
        descriptors: vec![],
        hits_addend: 1,
    };
    let e = c.should_rate_limit(empty).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_refused_descriptor_gives_back_what_the_others_took() {
    let (p, _up) = start().await;
    let mut c = grpc(&p).await;
    let a = || descriptor(&[("api_key", "free-1"), ("route", "gen")], None);
    let b = || descriptor(&[("api_key", "free-2"), ("route", "gen")], None);
    // free-2 spends its minute.
    should(&mut c, "genapi", vec![b(), b()], 1).await;
    let r = should(&mut c, "genapi", vec![a(), b()], 1).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!((r.statuses[0].code, r.statuses[1].code), (OK, OVER));
    // free-1's admission was given back: two more fit in its minute.
    for _ in 0..2 {
        let r = should(&mut c, "genapi", vec![a()], 1).await;
        assert_eq!(r.overall_code, OK);
    }
    assert_eq!(
        should(&mut c, "genapi", vec![a()], 1).await.overall_code,
        OVER
    );
    let metrics = p.app.metrics().render(p.app.store_figures());
    assert!(
        metrics.contains("turnstile_refunds_total{route=\"gen\",reason=\"descriptor\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_http_endpoint_speaks_h2c_too() {
    let (p, _up) = start().await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for expected in [200, 200, 429] {
        let r = req("GET", &format!("http://{}/", p.decision.unwrap()))
            .header("x-forwarded-method", "POST")
            .header("x-forwarded-uri", "/v1/generate")
            .header("authorization", "Bearer free-1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = client.request(r).await.unwrap();
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(r.status().as_u16(), expected);
    }
}
