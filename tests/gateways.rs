//! The shipped gateway configurations (`deploy/gateways/`), run for real:
//! nginx (`auth_request`) and Caddy (`forward_auth`) started on ephemeral
//! ports in front of a real upstream, asking a real turnstile. Admitted
//! requests reach the upstream with the caller's account and plan (never
//! the client's own); refused ones never do, and reach the client with
//! turnstile's status, `Retry-After` and JSON body. Needs nginx and caddy
//! (`apt-get install -y nginx caddy`; .ci/run installs them).

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use support::*;

const TURNSTILE: &str = r#"
[upstream]
url = "{upstream}"

[decision]
listen = "127.0.0.1:0"

[identity]
sources = ["bearer"]
keys_file = "keys.toml"

[[routes]]
name = "generate"
method = "POST"
path = "/v1/generate"

[[routes]]
name = "models"
method = "GET"
path = "/v1/models"
auth = false

[plans.free]
limits = [{ name = "per-minute", requests = 2, window = "1m", routes = ["generate"] }]
"#;

const KEYS: &str = "[[keys]]\nkey = \"free-1\"\nplan = \"free\"\naccount = \"acme\"\n";

/// A gateway process, killed on drop.
struct Gateway {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped file `name`, its addresses moved to this test's ports.
fn shipped(
    name: &str,
    listen: u16,
    decision: std::net::SocketAddr,
    api: std::net::SocketAddr,
) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/gateways")
        .join(name);
    let text = std::fs::read_to_string(path).unwrap();
    for address in ["127.0.0.1:8000", "127.0.0.1:8081", "127.0.0.1:9000"] {
        assert!(text.contains(address), "{name} no longer names {address}");
    }
    text.replace("127.0.0.1:8000", &format!("127.0.0.1:{listen}"))
        .replace("127.0.0.1:8081", &decision.to_string())
        .replace("127.0.0.1:9000", &api.to_string())
}

async fn wait_for(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn nginx(decision: std::net::SocketAddr, api: std::net::SocketAddr) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, shipped("nginx.conf", port, decision, api)).unwrap();
    let globals = format!(
        "daemon off; pid {0}/nginx.pid; error_log {0}/error.log;",
        dir.path().display()
    );
    let mut child = Command::new("nginx")
        .args(["-p", &dir.path().display().to_string(), "-c"])
        .arg(&conf)
        .args(["-g", &globals])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx is not installed: apt-get install -y nginx (these tests never skip)");
    wait_for(port, &mut child, "nginx").await;
    Gateway {
        child,
        port,
        _dir: dir,
    }
}

async fn caddy(decision: std::net::SocketAddr, api: std::net::SocketAddr) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let file = dir.path().join("Caddyfile");
    std::fs::write(&file, shipped("Caddyfile", port, decision, api)).unwrap();
    let mut child = Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&file)
        .env("HOME", dir.path())
        .env("XDG_DATA_HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("caddy is not installed: apt-get install -y caddy (these tests never skip)");
    wait_for(port, &mut child, "caddy").await;
    Gateway {
        child,
        port,
        _dir: dir,
    }
}

async fn generate(g: &Gateway, key: Option<&str>) -> Got {
    let mut b = req("POST", &format!("http://127.0.0.1:{}/v1/generate", g.port))
        .header("x-turnstile-account", "someone-else")
        .header("x-turnstile-plan", "enterprise");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    send(
        b.body(Full::new(Bytes::from_static(b"{\"prompt\":\"a cat\"}")))
            .unwrap(),
    )
    .await
}

/// The behaviour both gateways must show with turnstile deciding.
async fn admits_then_refuses_like_turnstile(g: &Gateway, up: &Upstream, p: &Proxy) {
    for _ in 0..2 {
        let r = generate(g, Some("free-1")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.h("x-upstream"), "yes", "the answer is the API's");
        let seen = up.last();
        assert_eq!(seen.uri, "/v1/generate");
        assert_eq!(
            seen.body,
            "{\"prompt\":\"a cat\"}".as_bytes(),
            "the body reaches the API"
        );
        assert_eq!(
            seen.headers["x-turnstile-account"], "acme",
            "never the client's own"
        );
        assert_eq!(seen.headers["x-turnstile-plan"], "free");
        assert_eq!(
            seen.headers.get_all("x-turnstile-account").iter().count(),
            1
        );
    }
    // A public route: no caller, and the client's own headers do not pass.
    let r = req("GET", &format!("http://127.0.0.1:{}/v1/models", g.port))
        .header("x-turnstile-account", "someone-else")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(r).await.status, 200);
    let seen = up.last();
    for name in ["x-turnstile-account", "x-turnstile-plan"] {
        let value = seen.headers.get(name).map(|v| v.to_str().unwrap());
        assert!(value.is_none_or(str::is_empty), "{name}: {value:?}");
    }
    let hits = up.hits();
    let r = generate(g, Some("free-1")).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(
        r.h("retry-after"),
        "50",
        "the clock stands 10 s into the minute"
    );
    assert_eq!(r.json()["error"], "rate_limited");
    assert_eq!(r.json()["rate_limit"]["name"], "per-minute");
    assert!(r.h("content-type").starts_with("application/json"));
    assert_eq!(up.hits(), hits, "a refused request never reaches the API");
    // The same as turnstile's own proxy answers.
    let proxied = call("POST", &p.url("/v1/generate"), Some("free-1")).await;
    assert_eq!(proxied.json(), r.json());

    let r = generate(g, None).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"], "unauthorized");
    let r = generate(g, Some("nobody")).await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (401, Some("unknown API key"))
    );
    assert_eq!(up.hits(), hits);
}

#[tokio::test]
async fn nginx_auth_request_in_front_of_the_api() {
    let up = Upstream::start().await;
    let p = Proxy::start_with(TURNSTILE, &up, &[("keys.toml", KEYS)]).await;
    let g = nginx(p.decision.unwrap(), up.addr).await;
    let r = generate(&g, Some("free-1")).await;
    assert_eq!(
        (r.h("x-ratelimit-limit"), r.h("x-ratelimit-remaining")),
        ("2", "1"),
        "admitted: the headers reach the client"
    );
    p.advance_secs(60);
    admits_then_refuses_like_turnstile(&g, &up, &p).await;
    // The refusal's rate-limit headers too.
    let r = generate(&g, Some("free-1")).await;
    assert_eq!((r.status, r.h("x-ratelimit-remaining")), (429, "0"));
}

#[tokio::test]
async fn nginx_refuses_when_turnstile_does_not_answer() {
    let up = Upstream::start().await;
    let dead = Upstream::dead().await;
    let g = nginx(dead.addr, up.addr).await;
    let r = generate(&g, Some("free-1")).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (503, Some("decision_unavailable"))
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn caddy_forward_auth_in_front_of_the_api() {
    let up = Upstream::start().await;
    let p = Proxy::start_with(TURNSTILE, &up, &[("keys.toml", KEYS)]).await;
    let g = caddy(p.decision.unwrap(), up.addr).await;
    admits_then_refuses_like_turnstile(&g, &up, &p).await;
}
