//! The Grafana dashboard in `deploy/` asks only for what turnstile exports:
//! every metric its queries name is in `/metrics` of a running proxy, with
//! the labels the queries group by; panels have unique ids and do not
//! overlap.

mod support;

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use support::*;

const CONFIG: &str = r#"
[upstream]
url = "{upstream}"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "gen"
method = "POST"
path = "/gen"
job = { id = "json:/id" }

[[routes]]
name = "billed"
path = "/status/*"
cost = { by = "json:/model", prices = { "a" = 2 }, default = 1 }
refund_on = ["5xx"]

[[routes]]
name = "any"
path = "/*"

[plans.free]
[[plans.free.limits]]
name = "minute"
routes = ["any"]
requests = 1
window = "1m"

[[plans.free.limits]]
name = "watch"
routes = ["any"]
requests = 1
window = "1m"
shadow = true

[[plans.free.limits]]
name = "jobs"
kind = "jobs"
routes = ["gen"]
max = 5

[[plans.free.limits]]
name = "credits"
kind = "credits"
routes = ["billed"]
grant = 100
"#;

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON")
}

/// Every query of every panel.
fn queries(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in d["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            out.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for var in d["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            out.push(var["query"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// The sample names `/metrics` can carry, with the labels seen on each:
/// counters as `NAME_total`, histograms as `NAME_bucket`/`_sum`/`_count`.
fn exported(text: &str) -> HashMap<String, HashSet<String>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            let names = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_owned()],
            };
            for n in names {
                out.entry(n).or_default();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap();
            let labels = out.entry(line[..name_end].to_owned()).or_default();
            if let Some(inner) = line.get(name_end + 1..).and_then(|l| l.split('}').next()) {
                for pair in inner.split(',') {
                    if let Some((label, _)) = pair.split_once('=') {
                        labels.insert(label.to_owned());
                    }
                }
            }
        }
    }
    out
}

/// The `turnstile_*` metric names in a query, each with the labels the
/// query groups by or selects on next to it.
fn asked(query: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let grouped: Vec<String> = query
        .split("by (")
        .skip(1)
        .flat_map(|s| s.split(')').next().unwrap().split(','))
        .map(|l| l.trim().to_owned())
        .collect();
    let mut rest = query;
    while let Some(i) = rest.find("turnstile_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_owned();
        let mut labels = grouped.clone();
        if let Some(selector) = tail[end..].strip_prefix('{') {
            for m in selector.split('}').next().unwrap().split(',') {
                let label = m.split(['=', '!', '~']).next().unwrap().trim();
                labels.push(label.to_owned());
            }
        }
        out.push((name, labels));
        rest = &tail[end..];
    }
    out
}

#[tokio::test]
async fn every_query_names_a_metric_turnstile_exports() {
    let up = Upstream::start().await;
    let p = Proxy::start(CONFIG, &up).await;
    // Traffic that fills the labelled families: forwarded, refused (and a
    // shadow limit's would-be refusal), a job, credits spent, a refund.
    for _ in 0..2 {
        call("GET", &p.url("/x"), Some("k")).await;
    }
    assert_eq!(call("POST", &p.url("/gen"), Some("k")).await.status, 200);
    assert_eq!(
        call("GET", &p.url("/status/200"), Some("k")).await.status,
        200
    );
    assert_eq!(
        call("GET", &p.url("/status/500"), Some("k")).await.status,
        500
    );
    let metrics = call("GET", &p.admin_url("/metrics"), None).await.body;
    let exported = exported(&metrics);
    let d = dashboard();
    let mut checked = 0;
    for query in queries(&d) {
        let names = asked(&query);
        assert!(
            !names.is_empty(),
            "a query on nothing of turnstile's: {query}"
        );
        for (name, labels) in names {
            let have = exported
                .get(&name)
                .unwrap_or_else(|| panic!("{name} is not exported (query: {query})"));
            // Labels Prometheus adds, and `le` of histogram buckets.
            for label in labels
                .iter()
                .filter(|l| !["instance", "job", "le"].contains(&l.as_str()))
            {
                assert!(
                    have.is_empty() || have.contains(label),
                    "{name} has no label {label:?} (it has {have:?}; query: {query})"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked}");
}

#[test]
fn panels_have_unique_ids_and_do_not_overlap() {
    let d = dashboard();
    let panels = d["panels"].as_array().unwrap();
    let ids: HashSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len());
    let boxes: Vec<(u64, u64, u64, u64)> = panels
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            let n = |k: &str| g[k].as_u64().unwrap();
            (n("x"), n("y"), n("w"), n("h"))
        })
        .collect();
    for (i, a) in boxes.iter().enumerate() {
        assert!(a.0 + a.2 <= 24, "panel {i} is wider than the grid");
        for b in &boxes[i + 1..] {
            let apart =
                a.0 + a.2 <= b.0 || b.0 + b.2 <= a.0 || a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1;
            assert!(apart, "{a:?} overlaps {b:?}");
        }
    }
}
