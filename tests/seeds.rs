//! Acceptance: the shipped configs reproduce the providers' published limits
//! (SPEC §10) exactly, on the wire.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use std::time::Duration;

use support::*;

const MIDNIGHT: u64 = 1_778_025_600; // 2026-05-06T00:00:00Z

#[tokio::test]
async fn seed_004_rolling_video_30_per_30_minutes_shared_by_both_generators() {
    let up = Upstream::start().await;
    let p = Proxy::start_example("rolling-video.toml", &up).await;
    for i in 0..30 {
        let path = if i % 2 == 0 {
            "/text-to-video"
        } else {
            "/image-to-video"
        };
        let r = call("POST", &p.url(path), Some("vid-key")).await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(
            (r.h("x-ratelimit-limit"), r.h("x-ratelimit-remaining")),
            ("30", &*(29 - i).to_string())
        );
        p.advance_secs(30); // 30 requests over 15 minutes
    }
    // Now T0 + 10 + 900; the first admission (T0 + 10) leaves at T0 + 10 + 1800 + 1.
    let r = call("POST", &p.url("/image-to-video"), Some("vid-key")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.h("retry-after"), "901");
    assert_eq!(
        (r.h("x-ratelimit-limit"), r.h("x-ratelimit-remaining")),
        ("30", "0")
    );
    let body = r.json();
    assert_eq!(body["success"], false);
    assert_eq!(
        body["error"],
        "Rate limit exceeded. You have generated 30 videos in the last 30 minutes."
    );
    let rl = &body["rate_limit"];
    assert_eq!(
        (
            rl["count"].as_u64(),
            rl["limit"].as_u64(),
            rl["remaining"].as_u64()
        ),
        (Some(30), Some(30), Some(0))
    );
    assert_eq!(rl["reset_in_seconds"].as_u64(), Some(901));
    assert_eq!(rl["reset_at"], "2026-05-05T16:30:11Z");
    // Status polling is not rate-limited and carries no rate-limit headers.
    for _ in 0..50 {
        let r = call("GET", &p.url("/video-status?id=1"), Some("vid-key")).await;
        assert_eq!(r.status, 200);
        assert!(r.header("x-ratelimit-limit").is_none());
    }
    // Another key has its own window.
    assert_eq!(
        call("POST", &p.url("/text-to-video"), Some("other-key"))
            .await
            .status,
        200
    );
    p.advance_secs(901);
    assert_eq!(
        call("POST", &p.url("/text-to-video"), Some("vid-key"))
            .await
            .status,
        200
    );
    assert_eq!(
        call("POST", &p.url("/text-to-video"), Some("vid-key"))
            .await
            .status,
        429,
        "only the oldest left"
    );
    p.advance_secs(29);
    assert_eq!(
        call("POST", &p.url("/text-to-video"), Some("vid-key"))
            .await
            .status,
        429
    );
    p.advance_secs(1); // the second admission (T0 + 40) leaves at T0 + 1841
    assert_eq!(
        call("POST", &p.url("/text-to-video"), Some("vid-key"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn seed_001_free_tier_minute_and_daily_headers_and_body() {
    let up = Upstream::start().await;
    let p = Proxy::start_example("tiers.toml", &up).await;
    let r = call("POST", &p.url("/v1/txt2video"), Some("free-key-1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (r.h("x-ratelimit-limit"), r.h("x-ratelimit-remaining")),
        ("1", "0")
    );
    assert_eq!(
        (
            r.h("x-ratelimit-daily-limit"),
            r.h("x-ratelimit-daily-remaining")
        ),
        ("15", "14")
    );
    let r = call("POST", &p.url("/v1/txt2video"), Some("free-key-1")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body, r#"{"message":"Too Many Attempts."}"#);
    assert_eq!(
        (r.h("x-ratelimit-type"), r.h("retry-after")),
        ("minute", "50")
    );
    assert_eq!(r.h("x-ratelimit-daily-remaining"), "14");
    // Other endpoints have their own per-minute counters (txt2img: 3/min).
    for _ in 0..3 {
        assert_eq!(
            call("POST", &p.url("/v1/txt2img"), Some("free-key-1"))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        call("POST", &p.url("/v1/txt2img"), Some("free-key-1"))
            .await
            .status,
        429
    );
    // Use up txt2video's 15 a day, one per minute.
    for _ in 1..15 {
        p.advance_secs(60);
        assert_eq!(
            call("POST", &p.url("/v1/txt2video"), Some("free-key-1"))
                .await
                .status,
            200
        );
    }
    p.advance_secs(60);
    let r = call("POST", &p.url("/v1/txt2video"), Some("free-key-1")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.h("x-ratelimit-type"), "daily");
    // The main pair still describes the per-minute limit (as the provider documents).
    assert_eq!(
        (r.h("x-ratelimit-limit"), r.h("x-ratelimit-remaining")),
        ("1", "1")
    );
    assert_eq!(
        (
            r.h("x-ratelimit-daily-limit"),
            r.h("x-ratelimit-daily-remaining")
        ),
        ("15", "0")
    );
    let now = T0 + 10 + 15 * 60;
    assert_eq!(r.h("retry-after"), (MIDNIGHT - now).to_string());
    // Prompt routes match by prefix.
    assert_eq!(
        call("GET", &p.url("/v1/prompt/enhance"), Some("free-key-1"))
            .await
            .h("x-ratelimit-limit"),
        "10"
    );
}

#[tokio::test]
async fn seed_001_premium_tier_300_per_minute_without_daily_limit() {
    let up = Upstream::start().await;
    let p = Proxy::start_example("tiers.toml", &up).await;
    for i in 0..300 {
        let r = call("POST", &p.url("/v1/txt2video"), Some("premium-key-1")).await;
        assert_eq!(r.status, 200, "request {i}");
        assert!(r.header("x-ratelimit-daily-limit").is_none());
    }
    let r = call("POST", &p.url("/v1/txt2video"), Some("premium-key-1")).await;
    assert_eq!(
        (r.status, r.h("x-ratelimit-limit"), r.h("x-ratelimit-type")),
        (429, "300", "minute")
    );
    assert_eq!(
        call("POST", &p.url("/v1/txt2img"), Some("premium-key-1"))
            .await
            .status,
        200
    );
    assert_eq!(
        call("POST", &p.url("/v1/txt2img"), Some("unlisted-key"))
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn seed_002_videogen_per_key_per_hour_per_endpoint_group() {
    let up = Upstream::start().await;
    let p = Proxy::start_example("videogen.toml", &up).await;
    let hour_end = (T0 + 3600).to_string();
    for i in 0..10 {
        let r = call("POST", &p.url("/v1/webhooks/endpoints"), Some("vg-key")).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            (
                r.h("x-ratelimit-limit"),
                r.h("x-ratelimit-remaining"),
                r.h("x-ratelimit-reset")
            ),
            ("10", &*(9 - i).to_string(), &*hour_end)
        );
    }
    let r = call("POST", &p.url("/v1/webhooks/endpoints"), Some("vg-key")).await;
    assert_eq!(
        (r.status, r.h("x-ratelimit-type"), r.h("retry-after")),
        (429, "webhooks_create", "3590")
    );
    // Each group its own budget; specific routes win over POST /v1/tools/*.
    let groups = [
        ("POST", "/v1/tools/executions/e1/cancel", "250"),
        ("GET", "/v1/tools/executions/e1", "5000"),
        ("POST", "/v1/tools/generate-image", "500"),
        ("GET", "/v1/files", "50000"),
        ("GET", "/v1/files/f1", "50000"),
        ("POST", "/v1/files/f1/hydrate", "2500"),
        ("POST", "/v1/files/upload", "500"),
        ("POST", "/v1/files/search", "500"),
        ("GET", "/v1/resources/avatars", "2500"),
        ("GET", "/v1/webhooks/endpoints", "500"),
        ("DELETE", "/v1/webhooks/endpoints/w1", "10"),
    ];
    for (method, path, limit) in groups {
        let r = call(method, &p.url(path), Some("vg-key")).await;
        assert_eq!(
            (r.status, r.h("x-ratelimit-limit")),
            (200, limit),
            "{method} {path}"
        );
    }
    // GET /v1/files and GET /v1/files/{id} share one budget.
    let r = call("GET", &p.url("/v1/files/f2"), Some("vg-key")).await;
    assert_eq!(r.h("x-ratelimit-remaining"), "49997");
    // The next hour starts afresh.
    p.advance_secs(3590);
    let r = send(
        req("POST", &p.url("/v1/webhooks/endpoints"))
            .header("authorization", "Bearer vg-key")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!((r.status, r.h("x-ratelimit-remaining")), (200, "9"));
}

#[tokio::test]
async fn seed_001_upload_limits_by_file_type() {
    let up = Upstream::start().await;
    let p = Proxy::start_example("tiers.toml", &up).await;
    let head = |path: &str, ct: &str, len: u64| {
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer free-key-1\r\nContent-Type: {ct}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    let cases = [
        (
            "/v1/img2img",
            "image/png",
            10_000_001,
            "body exceeds 10 MB for image/* on route img2img",
        ),
        (
            "/v1/transcribe",
            "audio/mpeg",
            10_000_001,
            "body exceeds 10 MB for audio/* on route transcribe",
        ),
        (
            "/v1/aud2video",
            "audio/mpeg",
            20_000_001,
            "body exceeds 20 MB for audio/* on route aud2video",
        ),
        (
            "/v1/vid2txt",
            "video/mp4",
            10_000_001,
            "body exceeds 10 MB for video/* on route vid2txt",
        ),
    ];
    for (path, ct, len, message) in cases {
        // Refused from the headers alone, before any body byte is read.
        let out = raw(
            p.addr,
            head(path, ct, len).as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 413"), "{path}: {out}");
        assert!(out.contains(message), "{path}: {out}");
    }
    assert_eq!(up.hits(), 0);
    // 20 MB of audio is within aud2video's limit: no 413 for its head. The
    // body is held for its duration check (600 minutes at most), so with
    // only the head sent nothing reaches the upstream yet.
    let out = raw(
        p.addr,
        head("/v1/aud2video?hold", "audio/mpeg", 20_000_000).as_bytes(),
        Duration::from_millis(300),
    )
    .await;
    assert!(out.is_empty(), "{out}");
    assert_eq!(
        up.hits(),
        0,
        "nothing of an unchecked upload reaches the upstream"
    );
}

/// A JSON-RPC tools/call to the kubeez MCP endpoint (`?hold` keeps it open upstream).
async fn tool_call(p: &Proxy, path: &str, token: &str, tool: &str) -> Got {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}","arguments":{{"text":"hello world"}}}}}}"#
    );
    send(
        req("POST", &p.url(path))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn seed_000_generations_at_once_per_account_and_tool_are_jobs() {
    let up = Upstream::start().await;
    let p = Proxy::start_example("kubeez.toml", &up).await;
    for i in 0..5 {
        // Both tokens of the account share the cap of 5; each answer names a job.
        let token = if i % 2 == 0 {
            "kz-token-laptop"
        } else {
            "kz-token-ci"
        };
        let r = tool_call(&p, "/mcp?jobs", token, "generate_music").await;
        assert!(r.body.contains(&format!("job-{}", i + 1)), "{}", r.body);
    }
    // The generations run on after their answers: the sixth is refused.
    let r = tool_call(&p, "/mcp?jobs", "kz-token-ci", "generate_music").await;
    assert_eq!(
        (r.status, r.h("x-ratelimit-type"), r.h("retry-after")),
        (200, "concurrent", "5")
    );
    assert_eq!(r.json()["result"]["isError"], true);
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "Too many generations in progress (at most 5). Try again in 5 s."
    );
    // generate_dialogue has a cap of its own.
    let r = tool_call(&p, "/mcp?jobs", "kz-token-ci", "generate_dialogue").await;
    assert_eq!((r.status, r.h("x-ratelimit-limit")), (200, "10"));
    assert!(r.body.contains("job-6"), "forwarded: {}", r.body);
    // A status poll that says "completed" frees that job's slot at once.
    let body = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_music_status","arguments":{"generation_id":"job-3","state":"completed"}}}"#;
    let r = send(
        req("POST", &p.url("/mcp?jobs"))
            .header("authorization", "Bearer kz-token-laptop")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await;
    assert!(r.body.contains("completed"), "{}", r.body);
    let r = tool_call(&p, "/mcp?jobs", "kz-token-laptop", "generate_music").await;
    // The per-minute budget of generate_music (10) counted the 6 admitted, not the refused one.
    assert_eq!(
        (
            r.status,
            r.h("x-ratelimit-limit"),
            r.h("x-ratelimit-remaining")
        ),
        (200, "10", "4")
    );
    assert!(r.body.contains("job-7"), "{}", r.body);
}

/// A tools/call of `tool` with these arguments, as `token`.
async fn tool_with(p: &Proxy, token: &str, tool: &str, args: serde_json::Value) -> Got {
    let body = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": args},
    });
    send(
        req("POST", &p.url("/mcp"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn seed_000_generations_consume_account_credits_priced_by_model() {
    let up = Upstream::start().await;
    let p = Proxy::start_example("kubeez.toml", &up).await;
    let media = |token, model: &str| {
        tool_with(
            &p,
            token,
            "generate_media",
            serde_json::json!({"model": model, "prompt": "a cat"}),
        )
    };
    let r = media("kz-token-laptop", "flux-pro").await;
    assert_eq!((r.status, r.h("x-credits-remaining")), (200, "992"));
    // An unlisted model costs the default; both tokens spend one balance.
    let r = media("kz-token-ci", "sdxl").await;
    assert_eq!(r.h("x-credits-remaining"), "988");
    for _ in 0..24 {
        assert_eq!(
            media("kz-token-ci", "veo-3").await.json()["result"]["isError"],
            serde_json::Value::Null
        );
    }
    let r = media("kz-token-laptop", "veo-3").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"]["isError"], true);
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "Insufficient credits: this request costs 40 credits, 28 left."
    );
    assert_eq!(
        up.hits(),
        26,
        "the refused generation never reached the server"
    );
    // A cheaper tool still fits.
    let r = tool_with(
        &p,
        "kz-token-laptop",
        "create_ad_copy",
        serde_json::json!({"text": "shoes"}),
    )
    .await;
    assert_eq!(r.h("x-credits-remaining"), "26");
}

#[tokio::test]
async fn seed_003_monthly_quotas_per_content_type() {
    let up = Upstream::start().await;
    let p = Proxy::start_example("mcp-keys.toml", &up).await;
    let key = "rfn_live_autopilot_0001";
    let content = |kind: &str| {
        tool_with(
            &p,
            key,
            "generate_content",
            serde_json::json!({"contentType": kind, "topic": "shoes"}),
        )
    };
    for _ in 0..20 {
        let r = content("blog_post").await;
        assert_eq!(
            r.json()["result"]["isError"],
            serde_json::Value::Null,
            "{}",
            r.body
        );
    }
    // Blog posts and articles share one monthly quota.
    let r = content("article").await;
    assert_eq!(
        (r.h("x-ratelimit-type"), &r.json()["result"]["isError"]),
        ("monthly_long_content", &serde_json::json!(true))
    );
    // Another content type has its own.
    let r = content("social_post").await;
    assert_eq!(
        (r.h("x-ratelimit-limit"), r.h("x-ratelimit-remaining")),
        ("60", "39")
    );
    assert_eq!(r.json()["result"]["isError"], serde_json::Value::Null);
    // The plan gate holds on every content-type route.
    let r = tool_with(
        &p,
        "rfn_live_starter_0001",
        "generate_content",
        serde_json::json!({"contentType": "blog_post"}),
    )
    .await;
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "generate_content_long requires plan autopilot."
    );
    assert_eq!(up.hits(), 21);
}

/// A WAV file of 8 kHz 8-bit mono whose header declares `declared_secs`
/// while it carries one second of samples.
fn wav_declaring(declared_secs: u32) -> Bytes {
    let declared = 8000 * declared_secs;
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36u32.wrapping_add(declared)).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&[1, 0, 1, 0]);
    out.extend_from_slice(&8000u32.to_le_bytes());
    out.extend_from_slice(&8000u32.to_le_bytes());
    out.extend_from_slice(&[1, 0, 8, 0]);
    out.extend_from_slice(b"data");
    out.extend_from_slice(&declared.to_le_bytes());
    out.resize(out.len() + 8000, 128);
    Bytes::from(out)
}

#[tokio::test]
async fn seed_001_audio_and_video_last_600_minutes_at_most() {
    let up = Upstream::start().await;
    let p = Proxy::start_example("tiers.toml", &up).await;
    let post = |body: Bytes| {
        send(
            req("POST", &p.url("/v1/aud2video"))
                .header("x-api-key", "free-key-1")
                .header("content-type", "audio/wav")
                .body(Full::new(body))
                .unwrap(),
        )
    };
    let r = post(wav_declaring(600 * 60)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(wav_declaring(612 * 60)).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.json(),
        serde_json::json!({
            "error": "media_too_long",
            "message": "audio/wav body lasts 612 min; at most 600 min on route aud2video",
            "limit_seconds": 36000,
            "duration_seconds": 36720,
        })
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn seed_003_source_urls_must_be_public() {
    let up = Upstream::start().await;
    let p = Proxy::start_example("mcp-keys.toml", &up).await;
    let call = |urls: serde_json::Value| {
        tool_with(
            &p,
            "rfn_live_autopilot_0001",
            "generate_content",
            serde_json::json!({"contentType": "blog_post", "sourceUrls": urls}),
        )
    };
    let r = call(serde_json::json!(["https://93.184.215.14/post"])).await;
    assert_eq!(
        r.json()["result"]["isError"],
        serde_json::Value::Null,
        "{}",
        r.body
    );
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost/",
        "http://0x7f.1/",
        "http://[::ffff:10.0.0.1]/",
    ] {
        let r = call(serde_json::json!(["https://93.184.215.14/post", url])).await;
        assert_eq!(
            (r.status, &r.json()["result"]["isError"]),
            (200, &serde_json::json!(true)),
            "{url}"
        );
        let text = r.json()["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            text.contains(&format!("{url:?} is not a fetchable URL")),
            "{text}"
        );
    }
    assert_eq!(up.hits(), 1);
}

/// Seed 003: "Active API keys per account: 20", and a key whose brand was
/// deleted stops working.
#[tokio::test]
async fn seed_003_twenty_active_keys_per_brand_and_deleted_brands() {
    let up = Upstream::start().await;
    let config = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/mcp-keys.toml"),
    )
    .unwrap();
    let config = config
        .replace("url = \"http://127.0.0.1:9000\"", "url = \"{upstream}\"")
        .replace("listen = \"127.0.0.1:8080\"", "")
        .replace(
            "[identity]",
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n[identity]",
        );
    let keys = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/rfn-keys.toml"),
    )
    .unwrap();
    let p = Proxy::start_with(&config, &up, &[("rfn-keys.toml", &keys)]).await;
    let create = || async {
        send(
            req("POST", &p.admin_url("/v1/keys"))
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    r#"{"account":"brand-new","plan":"starter"}"#,
                )))
                .unwrap(),
        )
        .await
    };
    let mut made = Vec::new();
    for _ in 0..20 {
        let got = create().await;
        assert_eq!(got.status, 201, "{}", got.body);
        made.push(got.json()["key"].as_str().unwrap().to_owned());
    }
    assert!(
        made[0].starts_with("rfn_live_"),
        "the seed's prefix: {}",
        made[0]
    );
    let over = create().await;
    assert_eq!(over.status, 409);
    assert_eq!(over.json()["error"], "too_many_keys");
    let gone = send(
        req("PATCH", &p.admin_url("/v1/accounts/brand-new"))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                r#"{"disabled":true}"#,
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(gone.status, 200);
    let got = call("GET", &p.url("/mcp"), Some(&made[0])).await;
    assert_eq!(got.status, 401);
    assert_eq!(got.json()["message"], "account disabled");
}
