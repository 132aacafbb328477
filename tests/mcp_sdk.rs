//! A real MCP server and a real MCP client (the official Python SDK, pinned in
//! tests/mcp/requirements.txt) talking through turnstile with the shipped
//! seed configs. Needs `python3 -m pip install -r tests/mcp/requirements.txt`
//! (.ci/run does it); without it these tests fail and say so.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;
use tokio::process::{Child, Command};

const REQUIREMENTS: &str = "python3 -m pip install -r tests/mcp/requirements.txt";

fn script(name: &str) -> String {
    format!("{}/tests/mcp/{name}", env!("CARGO_MANIFEST_DIR"))
}

async fn require_sdk() {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import mcp.server.fastmcp, mcp.client.streamable_http",
        ])
        .status()
        .await
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the MCP Python SDK is not installed: run `{REQUIREMENTS}`"
    );
}

/// The Python MCP server on a free port; killed on drop.
struct McpServer {
    /// Held so the server lives as long as the test (`kill_on_drop`).
    _child: Child,
    port: u16,
}

impl McpServer {
    async fn start() -> Self {
        Self::start_answering("sse").await
    }

    /// `"sse"` (the SDK's default: each answer an SSE stream) or `"json"`.
    async fn start_answering(mode: &str) -> Self {
        require_sdk().await;
        let port = free_port();
        let child = Command::new("python3")
            .arg(script("server.py"))
            .arg(port.to_string())
            .arg(mode)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3");
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the MCP server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            _child: child,
            port,
        }
    }

    /// An `Upstream` pointing at it (for `Proxy::start_example`).
    async fn upstream(&self) -> Upstream {
        let mut up = Upstream::start().await;
        up.addr = ([127, 0, 0, 1], self.port).into();
        up
    }
}

/// Runs the Python client through the proxy; returns its JSON lines.
async fn client(proxy: &Proxy, key: &str, scenario: &str) -> Vec<Value> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("python3")
            .arg(script("client.py"))
            .arg(proxy.url("/mcp"))
            .arg(key)
            .arg(scenario)
            .output(),
    )
    .await
    .expect("the MCP client hung")
    .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn step<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["step"] == name).collect()
}

#[tokio::test]
async fn seed_000_kubeez_tools_through_a_real_mcp_client() {
    let server = McpServer::start().await;
    let p = Proxy::start_example("kubeez.toml", &server.upstream().await).await;
    let lines = client(&p, "kz-token-laptop", "kubeez").await;
    assert!(step(&lines, "failed").is_empty(), "{lines:#?}");

    let init = step(&lines, "initialized")[0];
    assert!(
        init["session"].is_string(),
        "the server's Mcp-Session-Id reached the client: {init}"
    );
    assert!(step(&lines, "tools")[0]["names"].as_array().unwrap().len() >= 5);

    let short = step(&lines, "short_dialogue")[0];
    assert_eq!(short["is_error"], true);
    assert_eq!(
        short["text"],
        "generate_dialogue: text must be 5 to 5000 characters (got 2)"
    );

    let dialogue = step(&lines, "dialogue");
    assert_eq!(dialogue.len(), 11);
    for d in &dialogue[..10] {
        assert_eq!(d["is_error"], false, "{d}");
        assert!(d["text"].as_str().unwrap().starts_with("dialogue of"));
    }
    assert_eq!(dialogue[10]["is_error"], true);
    assert_eq!(
        dialogue[10]["text"],
        "Rate limit exceeded. Try again in 50 s."
    );

    assert_eq!(step(&lines, "balance")[0]["text"], "42 credits");
    let progress = step(&lines, "progress")[0];
    assert_eq!(progress["text"], "rendered in 3 steps");
    let logs: Vec<&str> = progress["logs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert_eq!(
        logs,
        ["step 1 of 3", "step 2 of 3", "step 3 of 3"],
        "SSE events streamed through"
    );
    assert_eq!(
        progress["session"], init["session"],
        "one session throughout"
    );
    drop(server);
}

#[tokio::test]
async fn seed_003_keys_gating_and_60_per_minute_through_a_real_mcp_client() {
    let server = McpServer::start().await;
    let p = Proxy::start_example("mcp-keys.toml", &server.upstream().await).await;

    // Revoked and wrongly prefixed keys never reach a tool: HTTP 401.
    for key in ["rfn_live_revoked_0001", "sk_test_0001"] {
        let lines = client(&p, key, "rfn").await;
        let failed = step(&lines, "failed");
        assert_eq!(failed.len(), 1, "{lines:#?}");
        assert!(failed[0].to_string().contains("401"), "{}", failed[0]);
    }

    let lines = client(&p, "rfn_live_starter_0001", "rfn").await;
    assert!(step(&lines, "failed").is_empty(), "{lines:#?}");
    let gated = step(&lines, "gated")[0];
    assert_eq!(gated["is_error"], true);
    assert_eq!(gated["text"], "generate_content requires plan autopilot.");
    let balance = step(&lines, "balance");
    let last = balance.last().unwrap();
    assert_eq!(last["is_error"], true);
    assert_eq!(last["text"], "Rate limit exceeded. Try again in 50 s.");
    // Every MCP message counts: initialize, the initialized notification,
    // tools/list and the calls share the 60 a minute.
    let admitted_calls = balance.len() - 1;
    assert!(
        (50..60).contains(&admitted_calls),
        "{admitted_calls} calls admitted"
    );

    // The Autopilot plan may call generate_content.
    let lines = client(&p, "rfn_live_autopilot_0001", "rfn").await;
    assert_eq!(step(&lines, "gated")[0]["is_error"], false, "{lines:#?}");
    drop(server);
}

#[tokio::test]
async fn seed_000_generations_at_once_are_jobs_through_a_real_mcp_client() {
    for mode in ["sse", "json"] {
        generations_are_jobs(mode).await;
    }
}

async fn generations_are_jobs(mode: &str) {
    let server = McpServer::start_answering(mode).await;
    let p = Proxy::start_example("kubeez.toml", &server.upstream().await).await;
    let lines = client(&p, "kz-token-laptop", "kubeez_jobs").await;
    assert!(step(&lines, "failed").is_empty(), "{lines:#?}");
    let music = step(&lines, "music");
    assert_eq!(music.len(), 6);
    for (i, m) in music[..5].iter().enumerate() {
        assert_eq!(m["is_error"], false, "{mode}: {m}");
        assert_eq!(
            m["structured"]["generation_id"],
            format!("music-{}", i + 1),
            "the SDK's structured result passed through whole"
        );
    }
    // Five generations in progress: the SDK's answers named five jobs.
    assert_eq!(music[5]["is_error"], true, "{mode}: {}", music[5]);
    assert_eq!(
        music[5]["text"],
        "Too many generations in progress (at most 5). Try again in 5 s."
    );
    assert_eq!(
        step(&lines, "status")[0]["structured"]["status"],
        "completed"
    );
    let after = step(&lines, "music_after_done")[0];
    assert_eq!(after["is_error"], false, "music-1 was done: {after}");
    assert_eq!(after["structured"]["generation_id"], "music-6");
}

/// One JSON-RPC POST to the proxy's `/mcp` as an MCP client sends it.
async fn rpc(p: &Proxy, session: Option<&str>, body: &str) -> Got {
    let mut b = req("POST", &p.url("/mcp"))
        .header("authorization", "Bearer kz-token-laptop")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18");
    if let Some(s) = session {
        b = b.header("mcp-session-id", s);
    }
    send(b.body(body.to_owned().into()).unwrap()).await
}

#[tokio::test]
async fn request_ids_compare_by_value_with_the_sdk_server() {
    let server = McpServer::start().await;
    let p = Proxy::start_example("kubeez.toml", &server.upstream().await).await;
    let init = rpc(
        &p,
        None,
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#,
    )
    .await;
    assert_eq!(init.status, 200, "{}", init.body);
    let session = init.h("mcp-session-id").to_owned();
    let note = rpc(
        &p,
        Some(&session),
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    )
    .await;
    assert_eq!(note.status, 202, "{}", note.body);
    let tool = |id: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"generate_music","arguments":{{"prompt":"a"}}}}}}"#
        )
    };
    // The SDK answers `-0` as 0: its answer is found, the job named.
    for _ in 0..3 {
        let r = rpc(&p, Some(&session), &tool("-0")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("music-"), "{}", r.body);
    }
    // It does not take `1.0` as a request id: whatever it answers
    // without the answer to the call holds the slot (fail closed).
    let r = rpc(&p, Some(&session), &tool("1.0")).await;
    assert!(r.status < 300 && !r.body.contains("music-"), "{}", r.body);
    let r = rpc(&p, Some(&session), &tool("2")).await;
    assert!(r.body.contains("music-"), "{}", r.body);
    let sixth = rpc(&p, Some(&session), &tool("-0")).await;
    assert!(
        sixth
            .body
            .contains("Too many generations in progress (at most 5)"),
        "{}",
        sixth.body
    );
    // Five in progress, of which only the `1.0` call's is without an id.
    assert_eq!(p.app.store().jobs_in_progress(), 5);
    let metrics = p.app.metrics().render(Default::default());
    assert!(
        metrics.contains("turnstile_jobs_unreadable_total{route=\"generate_music\"} 1"),
        "{metrics}"
    );
    // An id peers could read two ways never reaches the server.
    for id in [r#"{"a":1}"#, "[1]", "1.5", "true"] {
        let r = rpc(&p, Some(&session), &tool(id)).await;
        assert_eq!(r.status, 400, "{id}: {}", r.body);
        assert!(
            r.body.contains("must be a string, an integer or null"),
            "{}",
            r.body
        );
    }
    drop(server);
}
