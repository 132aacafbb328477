//! MCP endpoints (SPEC §7) at the HTTP level: routing by tool name, MCP-shaped
//! refusals echoing the JSON-RPC id, plan gating, argument limits, malformed
//! bodies and batches. (tests/mcp_sdk.rs drives a real MCP client and server.)

mod support;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};
use support::*;

const CONFIG: &str = r#"
[server]
mcp_max_body = "2KB"

[upstream]
url = "{upstream}"

[identity]
keys_file = "keys.toml"
default_plan = "basic"

[[routes]]
name = "generate_dialogue"
method = "POST"
path = "/mcp"
mcp_tool = "generate_dialogue"
format = "mcp"
arg_limits = [{ pointers = ["/params/arguments/text"], min_chars = 5, max_chars = 50 }]

[[routes]]
name = "generate_video"
method = "POST"
path = "/mcp"
mcp_tool = "generate_video"
format = "mcp"
plans = ["pro"]

[[routes]]
name = "mcp"
path = "/mcp"
format = "mcp"

[[routes]]
name = "json_api"
method = "POST"
path = "/v1/speak"
plans = ["pro"]
arg_limits = [{ pointers = ["/text"], max_chars = 10 }]

[plans.basic]
[[plans.basic.limits]]
name = "dialogue"
routes = ["generate_dialogue"]
requests = 2
window = "1m"

[[plans.basic.limits]]
name = "session"
routes = ["mcp"]
requests = 100
window = "1m"

[plans.pro]
"#;

const KEYS: &str = "[[keys]]\nkey = \"basic-key\"\nplan = \"basic\"\n\n[[keys]]\nkey = \"pro-key\"\nplan = \"pro\"\n";

async fn setup() -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let p = Proxy::start_with(CONFIG, &up, &[("keys.toml", KEYS)]).await;
    (up, p)
}

async fn rpc(p: &Proxy, key: &str, body: &str) -> Got {
    rpc_to(p, "/mcp", key, body).await
}

async fn rpc_to(p: &Proxy, path: &str, key: &str, body: &str) -> Got {
    send(
        req("POST", &p.url(path))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", "sess-1")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap(),
    )
    .await
}

fn call(id: Value, tool: &str, text: &str) -> String {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":{"text":text}}}).to_string()
}

#[tokio::test]
async fn tool_calls_are_limited_per_tool_and_refused_as_tool_errors() {
    let (up, p) = setup().await;
    for i in 0..2 {
        let r = rpc(
            &p,
            "basic-key",
            &call(json!(i), "generate_dialogue", "hello there"),
        )
        .await;
        assert_eq!((r.status, r.h("x-ratelimit-limit")), (200, "2"));
        assert_eq!(r.h("x-upstream"), "yes");
    }
    // Forwarded byte for byte, session header included.
    let sent = call(json!(1), "generate_dialogue", "hello there");
    assert_eq!(up.last().body, sent.as_bytes());
    assert_eq!(up.last().headers["mcp-session-id"], "sess-1");

    let r = rpc(
        &p,
        "basic-key",
        &call(json!("req-42"), "generate_dialogue", "hello there"),
    )
    .await;
    assert_eq!(
        r.status, 200,
        "MCP clients read tool errors, not HTTP statuses"
    );
    assert_eq!(
        (r.h("x-ratelimit-type"), r.h("retry-after")),
        ("dialogue", "50")
    );
    assert_eq!(
        r.json(),
        json!({"jsonrpc":"2.0","id":"req-42","result":{"content":[{"type":"text","text":"Rate limit exceeded. Try again in 50 s."}],"isError":true}})
    );
    assert_eq!(up.hits(), 2);
    // Other messages on the endpoint pass under the endpoint's own route.
    let r = rpc(
        &p,
        "basic-key",
        r#"{"jsonrpc":"2.0","id":9,"method":"tools/list"}"#,
    )
    .await;
    assert_eq!((r.status, r.h("x-ratelimit-limit")), (200, "100"));
    let r = rpc(&p, "basic-key", &call(json!(10), "get_balance", "x")).await;
    assert_eq!(
        (r.status, r.h("x-ratelimit-limit")),
        (200, "100"),
        "tools without a route of their own"
    );
    let r = send(
        req("GET", &p.url("/mcp"))
            .header("authorization", "Bearer basic-key")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "GET for the SSE stream passes");
    let r = send(
        req("DELETE", &p.url("/mcp"))
            .header("authorization", "Bearer basic-key")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "DELETE of the session passes");
}

#[tokio::test]
async fn argument_limits_refuse_without_consuming_quota() {
    let (up, p) = setup().await;
    let r = rpc(&p, "basic-key", &call(json!(7), "generate_dialogue", "hey")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], 7);
    assert_eq!(r.json()["result"]["isError"], true);
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "generate_dialogue: text must be 5 to 50 characters (got 3)"
    );
    let long = "é".repeat(51);
    let r = rpc(&p, "basic-key", &call(json!(8), "generate_dialogue", &long)).await;
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "generate_dialogue: text must be 5 to 50 characters (got 51)"
    );
    assert_eq!(up.hits(), 0);
    let r = rpc(
        &p,
        "basic-key",
        &call(json!(9), "generate_dialogue", "fine words"),
    )
    .await;
    assert_eq!(
        r.h("x-ratelimit-remaining"),
        "1",
        "the refused calls took nothing"
    );
    // On a plain JSON route the same rule answers 400 invalid_arguments.
    let r = rpc_to(
        &p,
        "/v1/speak",
        "pro-key",
        r#"{"text":"far too long text"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.body,
        r#"{"error":"invalid_arguments","message":"json_api: text must be at most 10 characters (got 17)"}"#
    );
    let r = rpc_to(&p, "/v1/speak", "pro-key", "{not json").await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_arguments"))
    );
    assert_eq!(
        rpc_to(&p, "/v1/speak", "pro-key", r#"{"text":"short"}"#)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn plan_gating_names_the_plans_that_allow_it() {
    let (up, p) = setup().await;
    let r = rpc(&p, "basic-key", &call(json!(3), "generate_video", "a cat")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["result"],
        json!({"content":[{"type":"text","text":"generate_video requires plan pro."}],"isError":true})
    );
    assert_eq!(r.json()["id"], 3);
    assert_eq!(
        rpc(&p, "pro-key", &call(json!(4), "generate_video", "a cat"))
            .await
            .status,
        200
    );
    let r = rpc_to(&p, "/v1/speak", "basic-key", r#"{"text":"hi"}"#).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.body,
        r#"{"error":"plan_required","message":"route json_api requires plan pro","plans":["pro"]}"#
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn bad_bodies_and_batches_get_json_rpc_errors_and_401_stays_http() {
    let (up, p) = setup().await;
    let r = rpc(&p, "basic-key", "{\"jsonrpc\":\"2.0\",").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32700);
    assert_eq!(r.json()["id"], Value::Null);
    let batch = format!(
        "[{},{}]",
        call(json!(1), "generate_dialogue", "hello there"),
        call(json!(2), "generate_dialogue", "hello there")
    );
    let r = rpc(&p, "basic-key", &batch).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_i64()),
        (400, Some(-32600))
    );
    // A batch without tool calls (notifications) passes under the endpoint route.
    let r = rpc(
        &p,
        "basic-key",
        r#"[{"jsonrpc":"2.0","method":"notifications/initialized"}]"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let big = call(json!(5), "generate_dialogue", &"x".repeat(3000));
    let r = rpc(&p, "basic-key", &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.json()["error"]["message"],
        "request body exceeds 2 KB (mcp_max_body)"
    );
    let r = rpc(
        &p,
        "nope",
        &call(json!(6), "generate_dialogue", "hello there"),
    )
    .await;
    assert_eq!((r.status, r.h("www-authenticate")), (401, "Bearer"));
    assert_eq!(r.json()["error"], "unauthorized");
    assert_eq!(up.hits(), 1);
}
