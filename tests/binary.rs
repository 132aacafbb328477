//! The real `turnstile` binary: `check`, config errors, serving, and SIGTERM.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_turnstile"))
}

fn example(name: &str) -> String {
    format!("{}/config/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_prints_the_routes_by_plans_table() {
    let out = bin()
        .args(["check", "--config", &example("tiers.toml")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let header = stdout.lines().next().unwrap();
    assert!(
        header.contains("route") && header.contains("free") && header.contains("premium"),
        "{stdout}"
    );
    let txt2video = stdout
        .lines()
        .find(|l| l.starts_with("txt2video "))
        .unwrap();
    assert!(
        txt2video.contains("minute 1/1m per route; daily 15/1d per route")
            && txt2video.contains("minute 300/1m per route"),
        "{txt2video}"
    );
    // Body limits and media durations have their column.
    assert!(
        txt2video.contains("25 MB, audio/* 10 MB, image/* 10 MB, video/* 10 MB, audio/* 600 min"),
        "{txt2video}"
    );
    assert!(stdout.contains("OK (18 routes, 2 plans)"), "{stdout}");
}

#[test]
fn check_reads_turnstile_config_from_the_environment() {
    let out = bin()
        .arg("check")
        .env("TURNSTILE_CONFIG", example("videogen.toml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("execution_status"));
}

#[test]
fn config_errors_name_file_line_and_column_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[upstream]\nurl = \"http://127.0.0.1:9\"\n\n[[routes]]\nname = \"a\"\npath = \"/a\"\n\n[plans.free]\n[[plans.free.limits]]\nname = \"m\"\nroutes = [\"b\"]\nrequests = 1\nwindow = \"1m\"\n").unwrap();
    for args in [vec!["check", "--config"], vec!["--config"]] {
        let out = bin().args(&args).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{}:11:10: unknown route \"b\"", path.display())),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn serves_then_exits_cleanly_on_sigterm() {
    let up = Upstream::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnstile.toml");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nurl = \"{}\"\n[[routes]]\nname = \"gen\"\npath = \"/gen\"\n[plans.free]\n[[plans.free.limits]]\nname = \"minute\"\nrequests = 2\nwindow = \"1m\"\n",
        up.url()
    );
    std::fs::write(&path, config).unwrap();
    let mut child = bin()
        .arg("--config")
        .arg(&path)
        .arg("--log-format")
        .arg("json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "turnstile did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("http://127.0.0.1:{port}/gen");
    // A fixed window may roll over between the two calls; admitted total stays bounded.
    let first = call("GET", &url, Some("k")).await;
    assert_eq!((first.status, first.h("x-ratelimit-limit")), (200, "2"));
    let mut statuses = vec![];
    let mut seen = vec![format!("200 reset={}", first.h("x-ratelimit-reset"))];
    for _ in 0..3 {
        let got = call("GET", &url, Some("k")).await;
        seen.push(format!(
            "{} remaining={} reset={}",
            got.status,
            got.h("x-ratelimit-remaining"),
            got.h("x-ratelimit-reset")
        ));
        statuses.push(got.status);
    }
    assert!(statuses.contains(&429), "{statuses:?} ({seen:?})");
    assert_eq!(call("GET", &url, None).await.status, 401);

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let mut logs = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(
        logs.contains("\"refused\"") && logs.contains("\"key_fp\""),
        "refusals are logged: {logs}"
    );
    assert!(
        !logs.contains("\"k\""),
        "the key itself never appears in logs"
    );
}

#[tokio::test]
async fn health_probes_the_admin_listener_of_the_config() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nurl = \"{upstream}\"\n\
                  [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n";
    let mut turnstile = Binary::start(dir.path(), config, &up).await;
    let health = || {
        bin()
            .arg("health")
            .arg("--config")
            .arg(dir.path().join("turnstile.toml"))
            .output()
            .unwrap()
    };
    let out = health();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "healthy\n");

    turnstile.signal("KILL");
    let _ = turnstile.child.wait();
    let out = health();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "unhealthy: cannot reach 127.0.0.1:{}",
            turnstile.admin_port
        )),
        "{err}"
    );
}

#[tokio::test]
async fn health_without_admin_checks_the_proxy_port() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnstile.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"0.0.0.0:{port}\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\n"
        ),
    )
    .unwrap();
    let health = || {
        bin()
            .arg("health")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap()
    };
    assert_eq!(health().status.code(), Some(1), "nothing listens yet");
    // A wildcard bind is probed on loopback.
    let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let out = health();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn example_api_serves_without_a_config() {
    let port = free_port();
    let mut child = bin()
        .args([
            "--config",
            "/nonexistent/turnstile.toml",
            "example-api",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/images/generations");
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break call("POST", &url, None).await;
        }
        assert!(Instant::now() < deadline, "example-api did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body,
        "{\"id\":\"job_1\",\"status\":\"queued\",\"account\":\"\",\"plan\":\"\"}"
    );
}

#[test]
fn docker_example_configs_are_valid() {
    for config in [
        "docker/sidecar/turnstile.toml",
        "docker/scale-out/turnstile.toml",
    ] {
        let out = bin()
            .arg("check")
            .arg("--config")
            .arg(format!("{}/{config}", env!("CARGO_MANIFEST_DIR")))
            .env("TURNSTILE_ADMIN_TOKEN", "test-admin-token")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
