//! `[ledger]` and its sinks, and a credits limit's `alerts`
//! (docs/ledger.md), compiled and checked.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use toml::Spanned;

use super::raw::{RawLedger, RawLimit, RawSink};
use super::{duration, Backend, ConfigError, Policy, Source};
use crate::ledger::{Alert, Durable, LedgerSettings, Level, LimitInfo, SinkKind, SinkSettings};
use crate::limits::Rule;

/// At most this many thresholds per balance.
const MAX_ALERTS: usize = 32;
/// An HTTP sink's batch at most.
const MAX_BATCH: i64 = 1000;

/// `[ledger]`, when written.
pub(super) fn compile_ledger(
    src: &Source,
    raw: Option<&Spanned<RawLedger>>,
    base: &Path,
    backend: &Backend,
) -> Result<Option<LedgerSettings>, ConfigError> {
    let Some(table) = raw else {
        return Ok(None);
    };
    if matches!(backend, Backend::Redis(r) if r.cluster) {
        return Err(src.at(
            table.span(),
            "[ledger] with Redis needs one Redis (or a primary with replicas): its events are one stream, \
             written by the scripts that change each balance, which a Redis Cluster cannot hold for every account",
        ));
    }
    let l = table.get_ref();
    if l.path.get_ref().trim().is_empty() {
        return Err(src.at(
            l.path.span(),
            "[ledger] path is empty: name the ledger's file",
        ));
    }
    let durable = match l.durable.as_ref().map(|d| (d.get_ref().as_str(), d.span())) {
        None | Some(("sync", _)) => Durable::Sync,
        Some(("interval", _)) => Durable::Interval,
        Some((other, span)) => {
            return Err(src.at(
                span,
                format!("[ledger] durable = {other:?}: expected \"sync\" or \"interval\""),
            ))
        }
    };
    let retain = duration(src, &l.retain, Duration::from_secs(90 * 86_400))?;
    let mut sinks: Vec<SinkSettings> = Vec::with_capacity(l.sinks.len());
    for s in &l.sinks {
        let sink = compile_sink(src, s, base, &sinks)?;
        if sinks.iter().any(|o| o.name == sink.name) {
            let span = s.get_ref().name.as_ref().map_or(s.span(), |n| n.span());
            return Err(src.at(
                span,
                format!(
                    "two ledger sinks are named {:?}: give each its own `name`",
                    sink.name
                ),
            ));
        }
        sinks.push(sink);
    }
    Ok(Some(LedgerSettings {
        path: base.join(l.path.get_ref()),
        durable,
        retain,
        sinks,
    }))
}

fn compile_sink(
    src: &Source,
    s: &Spanned<RawSink>,
    base: &Path,
    earlier: &[SinkSettings],
) -> Result<SinkSettings, ConfigError> {
    let raw = s.get_ref();
    let kind_text = raw.kind.get_ref().as_str();
    let kind = match kind_text {
        "http" => http_sink(src, s, base)?,
        "file" => {
            let Some(path) = &raw.path else {
                return Err(src.at(s.span(), "a file sink needs `path`"));
            };
            if raw.url.is_some() || raw.headers.is_some() || raw.batch.is_some() || raw.ca.is_some()
            {
                return Err(src.at(
                    s.span(),
                    "a file sink takes `path` only (url, batch, headers and ca are for http sinks)",
                ));
            }
            SinkKind::File {
                path: base.join(path.get_ref()),
            }
        }
        other => {
            return Err(src.at(
                raw.kind.span(),
                format!("ledger sink kind {other:?}: expected \"http\" or \"file\""),
            ))
        }
    };
    let name: Arc<str> = match &raw.name {
        Some(n) if n.get_ref().is_empty() => {
            return Err(src.at(n.span(), "a ledger sink's name cannot be empty"))
        }
        Some(n) => n.get_ref().as_str().into(),
        None => {
            // `http`, `file`; a second of a kind `http-2`.
            let same = earlier
                .iter()
                .filter(|o| std::mem::discriminant(&o.kind) == std::mem::discriminant(&kind))
                .count();
            match same {
                0 => kind_text.into(),
                n => format!("{kind_text}-{}", n + 1).into(),
            }
        }
    };
    Ok(SinkSettings { name, kind })
}

fn http_sink(src: &Source, s: &Spanned<RawSink>, base: &Path) -> Result<SinkKind, ConfigError> {
    let raw = s.get_ref();
    let Some(url) = &raw.url else {
        return Err(src.at(s.span(), "an http sink needs `url`"));
    };
    if raw.path.is_some() {
        return Err(src.at(s.span(), "an http sink takes `url`, not `path`"));
    }
    let uri: Uri = url
        .get_ref()
        .parse()
        .map_err(|_| src.at(url.span(), format!("invalid sink url {:?}", url.get_ref())))?;
    let https = uri.scheme_str() == Some("https");
    if !(https || uri.scheme_str() == Some("http")) || uri.host().is_none() {
        return Err(src.at(
            url.span(),
            format!(
                "sink url {:?}: expected http://host[:port]/path or https://...",
                url.get_ref()
            ),
        ));
    }
    let ca = match &raw.ca {
        None => None,
        Some(_) if !https => {
            return Err(src.at(s.span(), "`ca` is for an https sink url"));
        }
        Some(c) => {
            let path = base.join(c.get_ref());
            crate::wire::client::tls_config(Some(&path)).map_err(|m| src.at(c.span(), m))?;
            Some(path)
        }
    };
    let batch = match &raw.batch {
        None => 100,
        Some(b) if (1..=MAX_BATCH).contains(b.get_ref()) => *b.get_ref() as usize,
        Some(b) => {
            return Err(src.at(
                b.span(),
                format!("batch = {}: expected 1 to {MAX_BATCH}", b.get_ref()),
            ))
        }
    };
    let mut headers = Vec::new();
    for (name, value) in raw.headers.iter().flatten() {
        let Ok(name) = HeaderName::try_from(name.as_str()) else {
            return Err(src.at(value.span(), format!("{name:?} is not a header name")));
        };
        let text = match value.get_ref().strip_prefix("env:") {
            Some(var) => std::env::var(var).map_err(|_| {
                src.at(
                    value.span(),
                    format!(
                        "sink header {name} reads the environment variable {var}, which is not set"
                    ),
                )
            })?,
            None => value.get_ref().clone(),
        };
        let Ok(value_h) = HeaderValue::try_from(text) else {
            return Err(src.at(
                value.span(),
                format!("the value of sink header {name} cannot be sent in a header"),
            ));
        };
        headers.push((name, value_h));
    }
    Ok(SinkKind::Http {
        url: uri,
        ca,
        batch,
        headers,
    })
}

/// A limit's `alerts` (credits only): `"20%"` of the grant or a number of
/// credits, each once.
pub(super) fn compile_alerts(
    src: &Source,
    raw: &RawLimit,
    rule: &Rule,
) -> Result<Arc<[Alert]>, ConfigError> {
    let Some(list) = &raw.alerts else {
        return Ok(Arc::from(Vec::new()));
    };
    if !matches!(rule, Rule::Credits(_)) {
        return Err(src.at(
            list.span(),
            format!(
                "limit {:?}: alerts are for credits balances, not {}",
                raw.name.get_ref(),
                rule.kind_name()
            ),
        ));
    }
    if list.get_ref().len() > MAX_ALERTS {
        return Err(src.at(list.span(), format!("at most {MAX_ALERTS} alerts")));
    }
    let mut out: Vec<Alert> = Vec::new();
    for a in list.get_ref() {
        let level = level(a.get_ref()).ok_or_else(|| {
            src.at(
                a.span(),
                format!("alert {:?}: expected a share of the grant (\"20%\") or a balance (\"0\", \"100\")", a.get_ref()),
            )
        })?;
        if out.iter().any(|o| o.level == level) {
            return Err(src.at(
                a.span(),
                format!("alert {:?} is written twice", a.get_ref()),
            ));
        }
        out.push(Alert {
            text: a.get_ref().as_str().into(),
            level,
        });
    }
    Ok(Arc::from(out))
}

fn level(text: &str) -> Option<Level> {
    let text = text.trim();
    if let Some(p) = text.strip_suffix('%') {
        let p: f64 = p.trim().parse().ok()?;
        if !(0.0..=100.0).contains(&p) {
            return None;
        }
        return Some(Level::Percent((p * 100.0).round() as u32));
    }
    let n: i64 = text.parse().ok()?;
    (n >= 0).then_some(Level::Units(n))
}

/// `check`'s line for the ledger: where, how durable, and its sinks.
pub(super) fn describe(l: &LedgerSettings) -> String {
    let sinks: Vec<String> = l
        .sinks
        .iter()
        .map(|s| match &s.kind {
            SinkKind::Http { url, batch, .. } => format!("{} (http {url}, batch {batch})", s.name),
            SinkKind::File { path } => format!("{} (file {})", s.name, path.display()),
        })
        .collect();
    format!(
        "ledger {} ({}, retain {} days): sinks {}",
        l.path.display(),
        match l.durable {
            Durable::Sync => "sync",
            Durable::Interval => "interval",
        },
        l.retain.as_secs() / 86_400,
        if sinks.is_empty() {
            "none".to_owned()
        } else {
            sinks.join(", ")
        }
    )
}

impl Policy {
    /// What the ledger names each counter by: the limit's name, rule and
    /// alerts (a counter shared by plans: the first plan's, by name).
    pub fn ledger_limits(&self) -> HashMap<u64, LimitInfo> {
        let mut out = HashMap::new();
        for plan in &self.plans {
            for applied in plan.by_route.iter().flatten() {
                let spec = &plan.limits[applied.limit];
                out.entry(applied.counter).or_insert_with(|| LimitInfo {
                    name: spec.name.clone(),
                    rule: spec.rule,
                    alerts: spec.alerts.clone(),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_levels_read_as_written() {
        assert_eq!(level("20%"), Some(Level::Percent(2000)));
        assert_eq!(level("2.5%"), Some(Level::Percent(250)));
        assert_eq!(level("0"), Some(Level::Units(0)));
        assert_eq!(level("150"), Some(Level::Units(150)));
        assert_eq!(level("-1"), None);
        assert_eq!(level("120%"), None);
        assert_eq!(level("ten"), None);
    }
}
