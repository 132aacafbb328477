//! Content checks (SPEC §17) through the real proxy: media durations of
//! real files made by ffmpeg (every listed format under and over the
//! limit, moov at the end, multipart with mixed parts, garbage, a truncated
//! file), and fetchable URL arguments. Needs `ffmpeg` (`apt-get install -y
//! ffmpeg`; .ci/run installs it): the tests never skip.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

const CONFIG: &str = r#"
[upstream]
url = "{upstream}"

[[routes]]
name = "upload"
method = "POST"
path = "/upload"
max_body = "20MB"
max_duration_by_type = { "audio/*" = "3s", "video/*" = "3s" }

[[routes]]
name = "sources"
method = "POST"
path = "/sources"
url_args = [{ pointers = ["/sourceUrls", "/image"] }]

[plans.free]
[[plans.free.limits]]
name = "daily"
requests = 1000
window = "1d"
"#;

/// The formats, each as ffmpeg arguments, a file name and its content type.
const FORMATS: &[(&str, &str, &str)] = &[
    ("", "a.wav", "audio/wav"),
    ("-c:a libmp3lame -b:a 64k", "cbr.mp3", "audio/mpeg"),
    ("-c:a libmp3lame -q:a 4", "vbr.mp3", "audio/mpeg"),
    (
        "-c:a libmp3lame -q:a 4 -write_xing 0",
        "vbr-no-xing.mp3",
        "audio/mpeg",
    ),
    ("", "a.flac", "audio/flac"),
    ("-c:a libvorbis", "vorbis.ogg", "audio/ogg"),
    ("-c:a libopus", "opus.ogg", "audio/ogg"),
    ("-c:a aac", "a.m4a", "audio/mp4"),
    (
        "VIDEO -c:v libx264 -pix_fmt yuv420p -movflags +faststart",
        "faststart.mp4",
        "video/mp4",
    ),
    (
        "VIDEO -c:v libx264 -pix_fmt yuv420p",
        "moov-at-end.mp4",
        "video/mp4",
    ),
    (
        "VIDEO -c:v libx264 -pix_fmt yuv420p -c:a aac",
        "a.mov",
        "video/quicktime",
    ),
    ("VIDEO -c:v libvpx -b:v 100k", "a.webm", "video/webm"),
    ("VIDEO -c:v libx264 -c:a aac", "a.mkv", "video/x-matroska"),
];

fn require_ffmpeg() {
    let found = Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "ffmpeg is not installed: run `apt-get install -y ffmpeg` (the media tests never skip)"
    );
}

/// Every format at 2 s and at 5 s, made once per test binary.
fn media_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        require_ffmpeg();
        let dir = tempfile::tempdir().unwrap();
        for secs in [2, 5] {
            for (args, name, _) in FORMATS {
                let mut cmd = Command::new("ffmpeg");
                cmd.args(["-loglevel", "error", "-y", "-f", "lavfi", "-i"])
                    .arg(format!("sine=frequency=440:duration={secs}"));
                let mut args: Vec<&str> = args.split_whitespace().collect();
                if args.first() == Some(&"VIDEO") {
                    args.remove(0);
                    cmd.args(["-f", "lavfi", "-i"])
                        .arg(format!("testsrc=duration={secs}:size=64x64:rate=10"));
                    if !args.contains(&"aac") {
                        cmd.arg("-an");
                    }
                }
                cmd.args(&args)
                    .arg(dir.path().join(format!("{secs}s-{name}")));
                let out = cmd.output().unwrap();
                assert!(
                    out.status.success(),
                    "ffmpeg {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        dir
    })
    .path()
}

fn file(secs: u32, name: &str) -> (PathBuf, Bytes) {
    let path = media_dir().join(format!("{secs}s-{name}"));
    let bytes = Bytes::from(std::fs::read(&path).unwrap());
    (path, bytes)
}

async fn upload(p: &Proxy, content_type: &str, body: Bytes) -> Got {
    send(
        req("POST", &p.url("/upload"))
            .header("authorization", "Bearer k")
            .header("content-type", content_type)
            .body(Full::new(body))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn every_format_is_measured_and_passes_intact_or_is_refused_before_the_upstream() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    for (_, name, ct) in FORMATS {
        let (_, short) = file(2, name);
        let got = upload(&p, ct, short.clone()).await;
        assert_eq!(got.status, 200, "{name} (2 s): {}", got.body);
        assert_eq!(
            up.last().body,
            short,
            "{name}: the upstream received it byte for byte"
        );

        let hits = up.hits();
        let (_, long) = file(5, name);
        let got = upload(&p, ct, long).await;
        assert_eq!(got.status, 413, "{name} (5 s): {}", got.body);
        let body = got.json();
        assert_eq!(body["error"], "media_too_long", "{name}");
        assert_eq!(body["limit_seconds"], 3);
        let secs = body["duration_seconds"].as_u64().unwrap();
        assert!((5..=6).contains(&secs), "{name}: {secs} s");
        let message = body["message"].as_str().unwrap();
        assert_eq!(
            message,
            format!("{ct} body lasts {secs} s; at most 3 s on route upload"),
            "{name}"
        );
        assert_eq!(
            up.hits(),
            hits,
            "{name}: nothing of a refused upload reached the upstream"
        );
    }
    // The refusals consumed nothing: 13 admitted uploads of 1000.
    let got = upload(&p, "audio/wav", file(2, "a.wav").1).await;
    assert_eq!(got.h("x-ratelimit-remaining"), "986");
}

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Bytes) {
    let boundary = "turnstile-test-boundary";
    let mut out = Vec::new();
    for (name, ct, data) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        out.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.bin\"\r\n")
                .as_bytes(),
        );
        if let Some(ct) = ct {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/form-data; boundary={boundary}"),
        Bytes::from(out),
    )
}

#[tokio::test]
async fn each_multipart_part_is_measured_by_its_own_type() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let (_, song) = file(2, "cbr.mp3");
    let (_, clip) = file(2, "moov-at-end.mp4");
    let (_, long_clip) = file(5, "a.webm");
    let (ct, body) = multipart(&[
        ("prompt", None, b"a cat, dancing"),
        ("song", Some("audio/mpeg"), &song),
        ("clip", Some("video/mp4"), &clip),
        // An unlisted type is not read.
        (
            "notes",
            Some("application/octet-stream"),
            b"not media at all",
        ),
    ]);
    let got = upload(&p, &ct, body.clone()).await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(up.last().body, body, "forwarded byte for byte");

    let hits = up.hits();
    let (ct, body) = multipart(&[
        ("song", Some("audio/mpeg"), &song),
        ("clip", Some("video/webm"), &long_clip),
    ]);
    let got = upload(&p, &ct, body).await;
    assert_eq!(got.status, 413, "{}", got.body);
    assert!(
        got.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("video/webm part \"clip\" lasts 5 s; at most 3 s"),
        "{}",
        got.body
    );
    assert_eq!(up.hits(), hits);
}

#[tokio::test]
async fn garbage_and_truncated_files_of_a_listed_type_are_unreadable() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    let garbage: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (_, whole) = file(2, "moov-at-end.mp4");
    // The moov box is at the end: cut it off.
    let truncated = whole.slice(..whole.len() / 2);
    for (ct, body) in [
        ("audio/mpeg", Bytes::from(garbage.clone())),
        ("video/mp4", truncated),
        ("audio/wav", Bytes::new()),
    ] {
        let got = upload(&p, ct, body).await;
        assert_eq!(got.status, 415, "{ct}: {}", got.body);
        assert_eq!(got.json()["error"], "unreadable_media", "{ct}");
        let message = got.json()["message"].as_str().unwrap().to_owned();
        assert!(message.starts_with(&format!("{ct} body: ")), "{message}");
    }
    let (ct, body) = multipart(&[("clip", Some("video/mp4"), &garbage)]);
    let got = upload(&p, &ct, body).await;
    assert_eq!(got.status, 415, "{}", got.body);
    assert_eq!(up.hits(), 0);
    // Types without a duration limit are not read at all.
    let got = upload(&p, "image/png", Bytes::from(garbage)).await;
    assert_eq!(got.status, 200);
}

async fn sources(p: &Proxy, body: serde_json::Value) -> Got {
    send(
        req("POST", &p.url("/sources"))
            .header("authorization", "Bearer k")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn url_arguments_must_be_public_http_urls() {
    let up = Upstream::start().await;
    let p = Proxy::start(
        &CONFIG.replace(
            "[plans.free]",
            "[server]\nresolve_timeout = \"500ms\"\n\n[plans.free]",
        ),
        &up,
    )
    .await;
    let fine = serde_json::json!({
        "sourceUrls": ["https://93.184.215.14/a.png", "http://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/b"],
        "image": "https://8.8.8.8/c.jpg",
    });
    let got = sources(&p, fine).await;
    assert_eq!(got.status, 200, "{}", got.body);
    let hits = up.hits();
    for url in [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://10.0.0.1/",
        "http://192.168.0.1/",
        "http://localhost:8080/",
        "http://user:pw@93.184.215.14/",
        "file:///etc/passwd",
        "gopher://93.184.215.14/",
        "http://[fe80::1%25eth0]/",
        "not a url",
        "http://does-not-exist.invalid/",
    ] {
        let got = sources(
            &p,
            serde_json::json!({"sourceUrls": ["https://8.8.8.8/ok.png", url]}),
        )
        .await;
        assert_eq!(got.status, 400, "{url}: {}", got.body);
        let body = got.json();
        assert_eq!(body["error"], "invalid_arguments", "{url}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("/sourceUrls: {:?} is not a fetchable URL", url)),
            "{url}: {message}"
        );
    }
    let got = sources(
        &p,
        serde_json::json!({"image": {"href": "http://8.8.8.8/"}}),
    )
    .await;
    assert_eq!(got.status, 400);
    assert_eq!(up.hits(), hits, "no refused request reached the upstream");
}
