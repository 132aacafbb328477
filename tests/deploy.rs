//! The deployment files in `deploy/` (docs/production.md) are what they
//! say: the Kubernetes manifest parses, its embedded config loads, its
//! probes and ports point at turnstile's listeners, and the systemd unit
//! runs and reloads the binary the way the docs describe.

use std::path::Path;

use serde_yaml_ng::Value;

fn deploy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn documents() -> Vec<Value> {
    let text = deploy("kubernetes-sidecar.yaml");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} in the manifest"))
}

#[test]
fn the_kubernetes_sidecar_config_loads_and_its_probes_reach_the_admin_listener() {
    let docs = documents();
    assert_eq!(docs.len(), 3, "ConfigMap, Deployment, Service");
    // The ConfigMap's files are a config turnstile accepts.
    let data = &kind(&docs, "ConfigMap")["data"];
    let dir = tempfile::tempdir().unwrap();
    for file in ["turnstile.toml", "keys.toml"] {
        std::fs::write(dir.path().join(file), data[file].as_str().unwrap()).unwrap();
    }
    // The Pod sets it from the secret (checked below).
    std::env::set_var("TURNSTILE_ADMIN_TOKEN", "from-the-secret");
    let policy =
        turnstile::load(&dir.path().join("turnstile.toml")).unwrap_or_else(|e| panic!("{e}"));
    let admin = policy
        .admin
        .as_ref()
        .expect("an admin listener for the probes");
    assert!(
        policy.identity.keys.as_ref().is_some_and(|k| k.len() == 1),
        "the keys file holds the example key"
    );

    let deployment = kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().unwrap();
    let t = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("turnstile"))
        .expect("a turnstile container");
    let port = |name: &str| {
        t["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port {name}"))
    };
    assert_eq!(port("proxy"), u64::from(policy.server.listen.port()));
    assert_eq!(port("admin"), u64::from(admin.listen.port()));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(t[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            t[probe]["httpGet"]["port"].as_str(),
            Some("admin"),
            "{probe}"
        );
    }
    // The admin token comes from a secret, under the name the config reads.
    let env = t["env"].as_sequence().unwrap();
    assert!(env
        .iter()
        .any(|e| e["name"].as_str() == Some("TURNSTILE_ADMIN_TOKEN")
            && e["valueFrom"]["secretKeyRef"]["name"].as_str().is_some()));
    assert!(data["turnstile.toml"]
        .as_str()
        .unwrap()
        .contains("token_env = \"TURNSTILE_ADMIN_TOKEN\""));
    // Rollouts let in-flight exchanges drain.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > policy.server.shutdown_grace.as_secs(), "{grace}");
    // The upstream is the API container in the same Pod.
    assert_eq!(policy.upstream.authority.as_str(), "127.0.0.1:8000");
    // The Service sends traffic to turnstile, never to the API directly.
    let service = kind(&docs, "Service");
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("proxy")
    );
    // The state volume is where the snapshot is written.
    let mounts = t["volumeMounts"].as_sequence().unwrap();
    let snapshot = policy.store.snapshot.as_ref().expect("a snapshot");
    assert!(mounts
        .iter()
        .any(|m| snapshot.starts_with(m["mountPath"].as_str().unwrap())));
}

#[test]
fn the_systemd_unit_checks_runs_and_reloads_the_config() {
    let unit = deploy("turnstile.service");
    let line = |key: &str| {
        unit.lines()
            .find(|l| l.starts_with(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .to_owned()
    };
    assert!(line("ExecStartPre").contains("turnstile check --config /etc/turnstile/turnstile.toml"));
    assert!(line("ExecStart").contains("--config /etc/turnstile/turnstile.toml"));
    assert!(line("ExecReload").contains("-HUP $MAINPID"));
    assert_eq!(line("KillSignal"), "KillSignal=SIGTERM");
    assert_eq!(line("StateDirectory"), "StateDirectory=turnstile");
    let nofile: u64 = line("LimitNOFILE")
        .trim_start_matches("LimitNOFILE=")
        .parse()
        .unwrap();
    assert!(nofile > 10_000, "above the default max_connections");
    for section in ["[Unit]", "[Service]", "[Install]"] {
        assert!(unit.contains(section), "{section}");
    }
}

/// The install recipe of docs/production.md, run as written into a
/// scratch root (`/etc`, `/usr/local/bin` and the unit folder moved under
/// it; `systemctl` left out): the config it installs needs the admin token
/// the recipe writes to the unit's `EnvironmentFile`, and keeps its state
/// in the unit's `StateDirectory`.
#[test]
fn the_systemd_recipe_installs_a_config_with_a_token_and_state_in_the_state_directory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = std::fs::read_to_string(root.join("docs/production.md")).unwrap();
    let start = docs.find("```sh\ninstall -m 755").expect("the recipe");
    let recipe = &docs[start + 6..];
    let recipe = &recipe[..recipe.find("```").unwrap()];
    let scratch = tempfile::tempdir().unwrap();
    let at = scratch.path().display().to_string();
    let script: String = recipe
        .lines()
        .filter(|l| !l.starts_with("systemctl"))
        .map(|l| {
            l.replace("target/release/turnstile", env!("CARGO_BIN_EXE_turnstile"))
                .replace("/usr/local/bin/", &format!("{at}/usr/local/bin/"))
                .replace("/etc/", &format!("{at}/etc/"))
                + "\n"
        })
        .collect();
    std::fs::create_dir_all(scratch.path().join("usr/local/bin")).unwrap();
    std::fs::create_dir_all(scratch.path().join("etc/systemd/system")).unwrap();
    let ran = std::process::Command::new("bash")
        .args(["-euc", &script])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let etc = scratch.path().join("etc/turnstile");
    let config = etc.join("turnstile.toml");
    // The unit reads the token from the file the recipe wrote.
    let unit = std::fs::read_to_string(scratch.path().join("etc/systemd/system/turnstile.service"))
        .unwrap();
    assert!(
        unit.contains("EnvironmentFile=-/etc/turnstile/admin.env"),
        "{unit}"
    );
    let env = std::fs::read_to_string(etc.join("admin.env")).unwrap();
    let token = env
        .trim()
        .strip_prefix("TURNSTILE_ADMIN_TOKEN=")
        .expect("the token line");
    assert_eq!(token.len(), 64, "{env}");
    let check = |token: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"));
        c.args(["check", "--config"])
            .arg(&config)
            .env_remove("TURNSTILE_ADMIN_TOKEN");
        if let Some(t) = token {
            c.env("TURNSTILE_ADMIN_TOKEN", t);
        }
        c.output().unwrap()
    };
    let with = check(Some(token));
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    // Without the token the unit's ExecStartPre refuses to start: the admin
    // API is never open without it.
    let without = check(None);
    assert!(!without.status.success());
    assert!(String::from_utf8_lossy(&without.stderr).contains("token_env"));
    // The snapshot is in /var/lib/<StateDirectory>, writable under
    // ProtectSystem=strict.
    let state = unit
        .lines()
        .find_map(|l| l.strip_prefix("StateDirectory="))
        .unwrap();
    let installed = std::fs::read_to_string(&config).unwrap();
    let snapshot = installed
        .lines()
        .find_map(|l| l.strip_prefix("snapshot = \""))
        .and_then(|l| l.split('"').next())
        .expect("a snapshot path");
    assert!(
        snapshot.starts_with(&format!("/var/lib/{state}/")),
        "{snapshot}"
    );
    assert!(unit.contains("ProtectSystem=strict"));
}
