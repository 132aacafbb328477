use crate::limits::nz;
use std::path::PathBuf;

use super::*;
use crate::clock::SECOND;
use crate::limits::Rule;

const BASE: &str = r#"
[upstream]
url = "http://127.0.0.1:9000"

[[routes]]
name = "gen"
method = "POST"
path = "/v1/gen"

[[routes]]
name = "status"
path = "/v1/status/{id}"
"#;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn load_text(text: &str) -> Result<Policy, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    load(&write(&dir, "t.toml", text))
}

/// The `line:col: message` part of an error.
fn err_at(text: &str) -> (usize, usize, String) {
    match load_text(text).unwrap_err() {
        ConfigError::At {
            line, col, message, ..
        } => (line, col, message),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn minimal_config_has_the_documented_defaults() {
    let p = load_text(BASE).unwrap();
    assert_eq!(p.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(p.server.unmatched, Unmatched::Forward);
    assert_eq!(p.server.max_body, 100_000_000);
    assert_eq!(p.upstream.timeout, Duration::from_secs(300));
    assert_eq!(p.upstream.connect_timeout, Duration::from_secs(5));
    assert!(p.upstream.preserve_host);
    assert_eq!(p.upstream.account_header, "x-turnstile-account");
    assert_eq!(p.headers.main.limit, "x-ratelimit-limit");
    assert!(p.headers.on_success && !p.headers.ietf);
    assert_eq!(p.identity.sources.len(), 2);
    // No plans: one implicit plan without limits.
    assert_eq!(p.plans.len(), 1);
    assert_eq!(p.identity.default_plan, Some(0));
}

#[test]
fn unknown_keys_are_errors_with_their_position() {
    let (line, col, msg) = err_at(&format!(
        "{BASE}\n[server]\nlisten = \"127.0.0.1:1\"\nlisten_backlog = 5\n"
    ));
    assert_eq!((line, col), (16, 1));
    assert!(msg.contains("unknown field `listen_backlog`"), "{msg}");
    let (line, _, msg) = err_at(&format!("{BASE}\n[plans.free]\n[[plans.free.limits]]\nname = \"m\"\nrequests = 1\nwindow = \"1m\"\nmaximum = 3\n"));
    assert_eq!(line, 19);
    assert!(msg.contains("unknown field `maximum`"), "{msg}");
}

#[test]
fn cost_credits_refund_and_when_errors_point_at_the_value() {
    let route = |extra: &str| {
        err_at(&format!(
            "{BASE}\n[[routes]]\nname = \"img\"\npath = \"/img\"\n{extra}\n"
        ))
    };
    let (line, col, msg) = route("cost = -1");
    assert_eq!(
        (line, col, msg.as_str()),
        (17, 8, "cost must be a whole number from 0 to 4294967295")
    );
    let (_, _, msg) = route("cost = { by = \"json:/m\" }");
    assert_eq!(msg, "a priced cost needs `prices`, `default` or both");
    let (_, _, msg) = route("cost = { by = \"json:/m\", prices = { a = 1 }, extra = 1 }");
    assert!(msg.starts_with("unknown cost key `extra`"), "{msg}");
    let (_, _, msg) = route("cost = { by = \"m\", default = 1 }");
    assert!(msg.contains("must be \"json:/POINTER\""), "{msg}");
    let (line, col, msg) = route("refund_on = [\"5xx\", \"4xx\"]");
    assert_eq!((line, col), (17, 21));
    assert!(msg.starts_with("refund_on \"4xx\""), "{msg}");
    let (_, _, msg) = route("refund_on = [\"200\"]");
    assert!(msg.contains("a status from 400 to 599"), "{msg}");
    let (_, _, msg) = route("settle = \"query:x\"");
    assert!(msg.contains("an upstream answer has no query"), "{msg}");
    let (_, _, msg) = route("when = { \"header:x\" = [] }");
    assert!(msg.starts_with("when \"header:x\""), "{msg}");
    let (_, _, msg) = route("when = { \"nope\" = \"x\" }");
    assert!(msg.starts_with("when: value source"), "{msg}");
    let limit = |body: &str| {
        err_at(&format!(
            "{BASE}\n[plans.free]\n[[plans.free.limits]]\n{body}\n"
        ))
        .2
    };
    let msg = limit("name = \"c\"\nkind = \"credits\"");
    assert_eq!(msg, "limit \"c\" (credits) needs `grant`");
    let msg = limit("name = \"c\"\nkind = \"credits\"\ngrant = 5\ncount = \"cost\"");
    assert_eq!(
        msg,
        "limit \"c\": `count` does not apply to a credits limit"
    );
    let msg = limit("name = \"c\"\nkind = \"credits\"\ngrant = 5\nrefill = \"1.5s\"");
    assert!(msg.contains("ms, s, m, h, d or w"), "{msg}");
    let msg = limit("name = \"c\"\nkind = \"credits\"\ngrant = 5\nrefill = \"1500ms\"");
    assert!(msg.contains("whole number of seconds"), "{msg}");
    let msg = limit("name = \"c\"\nkind = \"concurrency\"\nmax = 1\ncount = \"cost\"");
    assert_eq!(
        msg,
        "limit \"c\": `count` does not apply to a concurrency limit"
    );
}

#[test]
fn semantic_errors_point_at_the_value() {
    let (line, col, msg) = err_at(&format!("{BASE}\n[plans.free]\n[[plans.free.limits]]\nname = \"m\"\nroutes = [\"gen\", \"nope\"]\nrequests = 1\nwindow = \"1m\"\n"));
    assert_eq!((line, col), (17, 10));
    assert_eq!(msg, "unknown route \"nope\": routes are gen, status");
    let (line, col, msg) = err_at(&format!("{BASE}\n[plans.free]\n[[plans.free.limits]]\nname = \"m\"\nrequests = 1\nwindow = \"1 fortnight\"\n"));
    assert_eq!((line, col), (18, 10));
    assert!(msg.starts_with("invalid duration"), "{msg}");
    let (line, _, msg) = err_at(&format!("{BASE}\n[plans.free]\n[[plans.free.limits]]\nname = \"m\"\nrequests = 0\nwindow = \"1m\"\n"));
    assert_eq!(line, 17);
    assert!(msg.contains("requests must be"), "{msg}");
    let limit = |body: &str| {
        err_at(&format!(
            "{BASE}\n[plans.free]\n[[plans.free.limits]]\n{body}\n"
        ))
        .2
    };
    let msg = limit("name = \"m\"\nkind = \"leaky\"");
    assert!(msg.contains("unknown variant `leaky`"), "{msg}");
    let msg = limit("name = \"m\"\nrequests = 1\nwindow = \"1m\"\nmax = 2");
    assert_eq!(msg, "limit \"m\": `max` does not apply to a fixed limit");
    let msg = limit("name = \"c\"\nkind = \"concurrency\"");
    assert_eq!(msg, "limit \"c\" (concurrency) needs `max`");
    let msg = limit("name = \"c\"\nkind = \"concurrency\"\nmax = 2\nqueue = { max_len = 3 }");
    assert!(msg.contains("missing field `max_wait`"), "{msg}");
    let (_, _, msg) = err_at(&format!("{BASE}\n[[routes]]\nname = \"up\"\npath = \"/up\"\nmax_body_by_type = {{ \"image\" = \"1MB\" }}\n"));
    assert!(msg.starts_with("invalid content type \"image\""), "{msg}");
    let (line, _, msg) = err_at("[upstream]\nurl = \"https://example.com\"\n");
    assert_eq!(line, 2);
    assert!(msg.contains("only http://"), "{msg}");
}

#[test]
fn same_name_may_repeat_on_disjoint_routes_only() {
    let ok = format!("{BASE}\n[plans.free]\n[[plans.free.limits]]\nname = \"minute\"\nroutes = [\"gen\"]\nrequests = 3\nwindow = \"1m\"\n[[plans.free.limits]]\nname = \"minute\"\nroutes = [\"status\"]\nrequests = 1\nwindow = \"1m\"\n");
    let p = load_text(&ok).unwrap();
    assert_eq!(p.plans[0].by_route[0].len(), 1);
    let clash = ok.replace("routes = [\"status\"]", "routes = \"*\"");
    let (_, _, msg) = err_at(&clash);
    assert!(msg.contains("both cover route \"gen\""), "{msg}");
}

#[test]
fn counter_ids_survive_number_changes_but_not_window_changes() {
    let text = |requests: u32, window: &str| {
        format!("{BASE}\n[plans.free]\n[[plans.free.limits]]\nname = \"m\"\nroutes = \"*\"\nper_route = true\nrequests = {requests}\nwindow = \"{window}\"\n")
    };
    let a = load_text(&text(3, "1m")).unwrap();
    let b = load_text(&text(30, "1m")).unwrap();
    let c = load_text(&text(3, "2m")).unwrap();
    let id = |p: &Policy, r: usize| p.plans[0].by_route[r][0].counter;
    assert_eq!(id(&a, 0), id(&b, 0));
    assert_ne!(id(&a, 0), id(&c, 0));
    assert_ne!(
        id(&a, 0),
        id(&a, 1),
        "per_route: each route its own counter"
    );
}

#[test]
fn messages_say_what_to_write_instead() {
    // A bare number where a duration string goes.
    let (line, col, msg) = err_at(&format!("{BASE}\n[upstream.x]\n").replace(
        "url = \"http://127.0.0.1:9000\"",
        "url = \"http://127.0.0.1:9000\"\ntimeout = 120",
    ));
    assert_eq!((line, col), (4, 11));
    assert!(
        msg.starts_with(
            "timeout is a duration: write it as a string with a unit, e.g. timeout = \"120s\""
        ),
        "{msg}"
    );
    // "monthly" for a credits refill or a window.
    let (_, _, msg) = err_at(&format!("{BASE}\n[plans.free]\n[[plans.free.limits]]\nname = \"c\"\nkind = \"credits\"\ngrant = 5\nrefill = \"monthly\"\n"));
    assert!(msg.contains("write \"month\" for calendar months"), "{msg}");
    let (_, _, msg) = err_at(&format!("{BASE}\n[plans.free]\n[[plans.free.limits]]\nname = \"m\"\nrequests = 5\nwindow = \"1 month\"\n"));
    assert!(msg.contains("write \"month\" for calendar months"), "{msg}");
    // A keys file that is not there: the config line naming it.
    let (line, col, msg) = err_at(&format!(
        "{BASE}\n[identity]\nkeys_file = \"missing.toml\"\n"
    ));
    assert_eq!((line, col), (15, 13));
    assert!(msg.starts_with("keys_file \"missing.toml\": "), "{msg}");
}

#[test]
fn keys_file_errors_name_the_keys_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir,
        "keys.toml",
        "[[keys]]\nkey = \"k1\"\nplan = \"free\"\n\n[[keys]]\nkey = \"k2\"\nplan = \"gold\"\n",
    );
    let cfg = write(
        &dir,
        "t.toml",
        &format!("{BASE}\n[identity]\nkeys_file = \"keys.toml\"\n\n[plans.free]\n"),
    );
    let err = load(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("keys.toml:7:8: unknown plan \"gold\""),
        "{err}"
    );
}

#[test]
fn keys_file_with_digests_and_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let digest = hex::encode(crate::keys::identity::digest("secret"));
    write(&dir, "keys.toml", &format!("[[keys]]\nsha256 = \"{digest}\"\naccount = \"acme\"\n\n[[keys]]\nkey = \"old\"\nrevoked = true\n"));
    let cfg = write(
        &dir,
        "t.toml",
        &format!("{BASE}\n[identity]\nkeys_file = \"keys.toml\"\n\n[plans.free]\n"),
    );
    let p = load(&cfg).unwrap();
    let keys = p.identity.keys.as_ref().unwrap();
    assert_eq!(keys.len(), 2);
    let rec = keys.get(&crate::keys::identity::digest("secret")).unwrap();
    assert_eq!(rec.account.as_deref(), Some("acme"));
    assert!(
        keys.get(&crate::keys::identity::digest("old"))
            .unwrap()
            .revoked
    );
}

#[test]
fn missing_file_is_reported() {
    let err = load(std::path::Path::new("/nonexistent/turnstile.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("/nonexistent/turnstile.toml: "), "{err}");
}

#[test]
fn shipped_examples_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut paths = vec![root.join("turnstile.toml")];
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        // Keys files sit beside the configs that name them.
        if !std::fs::read_to_string(&path).unwrap().contains("[[keys]]") {
            paths.push(path);
        }
    }
    assert!(paths.len() >= 6);
    for path in paths {
        let policy = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!policy.table().is_empty());
    }
}

#[test]
fn an_admin_api_reachable_from_other_hosts_needs_a_token() {
    let open = format!("{BASE}\n[admin]\nlisten = \"0.0.0.0:9090\"\n");
    let (line, col, message) = err_at(&open);
    let listen_line = open.lines().position(|l| l.starts_with("listen")).unwrap() + 1;
    assert_eq!((line, col), (listen_line, 10), "{message}");
    assert!(message.contains("without a token"), "{message}");
    assert!(load_text(&format!("{open}insecure = true\n")).is_ok());
    assert!(load_text(&format!("{open}token = \"s3cret\"\n")).is_ok());
    // Loopback needs none.
    assert!(load_text(&format!("{BASE}\n[admin]\nlisten = \"127.0.0.1:9090\"\n")).is_ok());
    // From a file beside the config, or from the environment.
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "admin-token", "from-a-file\n");
    let path = write(
        &dir,
        "t.toml",
        &format!("{open}token_file = \"admin-token\"\n"),
    );
    let policy = load(&path).unwrap();
    assert_eq!(policy.admin.unwrap().token.as_deref(), Some("from-a-file"));
    let missing = format!("{open}token_env = \"TURNSTILE_TEST_UNSET_TOKEN_VAR\"\n");
    let (_, _, message) = err_at(&missing);
    assert!(
        message.contains("TURNSTILE_TEST_UNSET_TOKEN_VAR"),
        "{message}"
    );
}

#[test]
fn hardening_settings_have_defaults_and_take_values() {
    let policy = load_text(BASE).unwrap();
    assert_eq!(policy.server.idle_timeout, Duration::from_secs(60));
    assert_eq!(policy.server.body_timeout, Duration::from_secs(30));
    assert_eq!(policy.server.max_connections, 10_000);
    assert_eq!(policy.server.max_buffered, 256_000_000);
    assert!(!policy.server.case_sensitive_paths);
    assert_eq!(policy.store.max_counters, 1_000_000);
    assert_eq!(policy.log.refusals_per_second, 100);
    let text = format!(
        "[server]\nidle_timeout = \"5s\"\nbody_timeout = \"2s\"\nmax_connections = 10\nmax_buffered = \"1MiB\"\ncase_sensitive_paths = true\n[store]\nmax_counters = 7\n[log]\nrefusals_per_second = 3\n{BASE}"
    );
    let policy = load_text(&text).unwrap();
    assert_eq!(policy.server.max_buffered, 1 << 20);
    assert_eq!(policy.server.max_connections, 10);
    assert_eq!(policy.store.max_counters, 7);
    assert_eq!(policy.log.refusals_per_second, 3);
    let (_, _, message) = err_at(&format!("[server]\nmax_connections = 0\n{BASE}"));
    assert!(message.contains("at least 1"), "{message}");
}

#[test]
fn jobs_limits_and_job_routes_are_validated_with_positions() {
    let jobs_limit = "\n[plans.p]\n[[plans.p.limits]]\nname = \"jobs\"\nkind = \"jobs\"\nmax = 5\nroutes = [\"gen\"]\n";
    // The submission route must say where its answer names the job.
    let (line, _, msg) = err_at(&format!("{BASE}{jobs_limit}"));
    assert_eq!(line, 15, "the limit's table");
    assert!(
        msg.contains("route \"gen\" does not say where its answer names one"),
        "{msg}"
    );

    let submit = BASE.replace(
        "path = \"/v1/gen\"",
        "path = \"/v1/gen\"\njob = { id = \"json:/id\" }",
    );
    let p = load_text(&format!("{submit}{jobs_limit}")).unwrap();
    let Rule::Jobs(j) = p.plans[0].limits[0].rule else {
        panic!("not a jobs rule")
    };
    assert_eq!(
        (j.max, j.max_duration, j.retry_after),
        (nz(5), 3600 * SECOND, 5 * SECOND),
        "max_duration 1h and retry_after 5s by default"
    );

    for (route_line, expected) in [
        (
            "job_status = { id = \"path:nope\", state = \"json:/s\", done = [\"done\"] }",
            "no {nope} segment",
        ),
        (
            "job_status = { id = \"path:id\", state = \"query:s\", done = [\"done\"] }",
            "an upstream answer has no query",
        ),
        (
            "job_status = { id = \"path:id\", state = \"json:/s\", done = [] }",
            "at least one state",
        ),
        ("job_cancel = { id = \"json:id\" }", "starts with '/'"),
        (
            "job = { id = \"json:/id\" }\njob_cancel = { id = \"path:id\" }",
            "exclude each other",
        ),
    ] {
        let text = BASE.replace(
            "path = \"/v1/status/{id}\"",
            &format!("path = \"/v1/status/{{id}}\"\n{route_line}"),
        );
        let (line, _, msg) = err_at(&text);
        assert!(line >= 13, "{line}: {msg}");
        assert!(msg.contains(expected), "{route_line}: {msg}");
    }
    let queued = format!("{submit}{jobs_limit}queue = {{ max_wait = \"1s\" }}\n");
    assert!(err_at(&queued)
        .2
        .contains("`queue` does not apply to a jobs limit"));
}

#[test]
fn telemetry_settings_are_checked() {
    let p = load_text(&format!(
        "{BASE}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\n"
    ))
    .unwrap();
    let t = p.telemetry.unwrap();
    assert_eq!(
        (t.sample_ratio, t.service_name.as_str(), t.export_interval),
        (1.0, "turnstile", std::time::Duration::from_secs(5))
    );
    assert!(load_text(BASE).unwrap().telemetry.is_none());
    let (line, col, msg) = err_at(&format!(
        "{BASE}\n[telemetry]\notlp_endpoint = \"collector:4317\"\n"
    ));
    assert_eq!((line, col), (15, 17));
    assert!(msg.contains("http:// or https:// URL"), "{msg}");
    let (_, _, msg) = err_at(&format!(
        "{BASE}\n[telemetry]\notlp_endpoint = \"http://c:4317\"\nsample_ratio = 1.5\n"
    ));
    assert!(msg.starts_with("sample_ratio must be from 0 to 1"), "{msg}");
}
