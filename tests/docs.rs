//! The README and `docs/` stay true: every link resolves (files and
//! headings), every config they name or show loads, every script they tell
//! you to run exists, and the quickstart's curl lines answer what their
//! comments say, run as written against the real binary and the bundled
//! example API.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use support::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page of docs/.
fn pages() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    out.extend(docs);
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fenced code blocks of a page: (language, text).
fn blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(lang)) => current = Some((lang.trim().to_owned(), String::new())),
            (Some(_), Some(_)) => out.extend(current.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

/// The page's text outside code blocks.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    prose(text)
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

/// Every `[text](target)` outside code, as written.
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut out = Vec::new();
    let mut rest = prose.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].to_owned());
        rest = &after[end..];
    }
    out
}

#[test]
fn every_link_in_the_readme_and_docs_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = read(&page);
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            let (file, anchor) = match link.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            if !target.exists() {
                broken.push(format!("{}: {link} (no such file)", page.display()));
                continue;
            }
            if let Some(anchor) = anchor {
                if !anchors(&read(&target)).iter().any(|a| a == anchor) {
                    broken.push(format!("{}: {link} (no such heading)", page.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_script_and_config_the_docs_name_exists_and_every_config_loads() {
    let mut missing = Vec::new();
    let mut configs = Vec::new();
    for page in pages() {
        let text = read(&page);
        for (lang, body) in blocks(&text) {
            if lang != "sh" {
                continue;
            }
            for word in body.split_whitespace() {
                let word = word.trim_matches(|c| matches!(c, '`' | '"' | '\'' | '(' | ')' | ';'));
                let local = word.strip_prefix("./").unwrap_or(word);
                let named = local.starts_with("scripts/")
                    || local.starts_with("bench/")
                    || local.starts_with(".ci/")
                    || local.starts_with("docker/")
                    || local.starts_with("deploy/")
                    || local.starts_with("config/");
                if named && !local.contains('$') && !local.contains('*') {
                    if !root().join(local).exists() {
                        missing.push(format!("{}: {local}", page.display()));
                    } else if local.ends_with(".toml")
                        && !local.contains("keys")
                        // installed beside a keys file by its recipe (tests/deploy.rs runs it)
                        && !local.starts_with("deploy/")
                    {
                        configs.push(local.to_owned());
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named but missing:\n{}",
        missing.join("\n")
    );
    configs.sort();
    configs.dedup();
    assert!(configs.len() >= 3, "{configs:?}");
    for config in configs {
        let out = Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .args(["check", "--config", &config])
            .current_dir(root())
            .env("TURNSTILE_ADMIN_TOKEN", "docs-test")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A TOML block holding a whole config (it names its upstream) loads as
/// written; fragments of one are left alone.
#[test]
fn every_whole_config_shown_in_the_docs_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut loaded = 0;
    for page in pages() {
        for (lang, body) in blocks(&read(&page)) {
            if lang != "toml" || !body.contains("[upstream]") || body.contains("keys_file") {
                continue;
            }
            let path = dir.path().join("shown.toml");
            std::fs::write(&path, &body).unwrap();
            if let Err(e) = turnstile::load(&path) {
                panic!(
                    "{}: a config it shows does not load: {e}\n{body}",
                    page.display()
                );
            }
            loaded += 1;
        }
    }
    assert!(loaded >= 1, "the README's example is a whole config");
}

/// The quickstart's block of curl lines (the one using the demo key).
fn quickstart_lines() -> String {
    blocks(&read(&root().join("README.md")))
        .into_iter()
        .find(|(lang, body)| lang == "sh" && body.contains("demo-free-key"))
        .map(|(_, body)| body)
        .expect("the README has the quickstart's curl lines")
}

fn minute_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
}

/// Runs the quickstart as a newcomer would: the example API, turnstile on
/// `config/turnstile.toml` and `config/keys.toml`, the README's lines in
/// bash — on ephemeral ports, with its state in a scratch folder.
async fn run_quickstart() -> (String, bool) {
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_port = api.local_addr().unwrap().port();
    let api_task = tokio::spawn(turnstile::cli::example_api::serve(api));
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let config = read(&root().join("config/turnstile.toml"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:9090", &format!("127.0.0.1:{admin_port}"))
        .replace("127.0.0.1:9000", &format!("127.0.0.1:{api_port}"))
        .replace("../state/counters.bin", "state/counters.bin")
        .replace("../state/ledger.db", "state/ledger.db");
    std::fs::write(dir.path().join("turnstile.toml"), config).unwrap();
    std::fs::copy(
        root().join("config/keys.toml"),
        dir.path().join("keys.toml"),
    )
    .unwrap();
    let b = Binary::restart(dir.path(), port, admin_port).await;
    b.wait_admin().await;
    let script = quickstart_lines()
        .replace("localhost:8080", &format!("127.0.0.1:{port}"))
        .replace("localhost:9090", &format!("127.0.0.1:{admin_port}"))
        .replace("localhost:9000", &format!("127.0.0.1:{api_port}"));
    let started = minute_now();
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("bash and curl must be installed");
    let same_minute = minute_now() == started;
    api_task.abort();
    drop(b);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the quickstart failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    (text, same_minute)
}

// Multi-threaded: the example API runs on the runtime while bash waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_answers_what_its_comments_say() {
    // The per-minute lines need one clock minute; a run that straddles two
    // starts again (with fresh counters), which two runs in a row cannot both do.
    let (mut out, same_minute) = run_quickstart().await;
    if !same_minute {
        out = run_quickstart().await.0;
    }
    let lines: Vec<&str> = out.lines().collect();
    // The first generation: 200 with the minute's figures.
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("X-RateLimit-Limit: 3"), "{out}");
    assert!(out.contains("X-RateLimit-Remaining: 2"), "{out}");
    for expected in ["request 2: 200", "request 3: 200", "request 4: 429"] {
        assert!(lines.contains(&expected), "{expected}: {out}");
    }
    // Videos: two queued, the third refused, then a poll, a cancel, and
    // the freed slot admits the next one.
    let videos: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("vid_") || l.contains("generations in progress"))
        .collect();
    assert!(videos.len() >= 5, "{out}");
    assert!(
        videos[0].contains("\"id\":\"vid_1\"") && videos[0].contains("queued"),
        "{out}"
    );
    assert!(videos[1].contains("\"id\":\"vid_2\""), "{out}");
    assert!(
        videos[2].contains("Too many generations in progress: at most 2 at once (videos)"),
        "{out}"
    );
    assert!(
        videos[3].contains("\"id\":\"vid_1\"") && videos[3].contains("processing"),
        "{out}"
    );
    assert!(
        videos[4].contains("\"id\":\"vid_1\"") && videos[4].contains("cancelled"),
        "{out}"
    );
    assert!(
        videos
            .get(5)
            .is_some_and(|l| l.contains("\"id\":\"vid_3\"") && l.contains("queued")),
        "the freed slot admits the next video: {out}"
    );
    // The revoked key's 401, the usage report and the metrics.
    assert!(out.contains("HTTP/1.1 401"), "{out}");
    assert!(out.contains("API key revoked"), "{out}");
    assert!(out.contains("\"counters\":[{\"name\":\"minute\""), "{out}");
    assert!(out.contains("turnstile_requests_total{"), "{out}");
}
