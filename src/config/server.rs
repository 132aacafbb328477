//! `[server]`, `[upstream]`, `[store]`, `[admin]` and `[headers]`: the
//! settings around the routes and plans.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use http::{HeaderName, HeaderValue, StatusCode, Uri};

use crate::limits::HeaderTrio;
use crate::respond::{HeaderSettings, ResetFormat, ResponseSet, Template, RESPONSE_NAMES};
use crate::store::{OnError, RedisSettings};
use crate::wire::header_case::Spellings;

use super::raw::{
    RawAdmin, RawBackend, RawConfig, RawHeaders, RawOnError, RawReset, RawResponses, RawServer,
    RawStore, RawTelemetry, RawUnmatched, RawUpstream,
};
use super::{
    duration, header_name, listen_address, size, AdminSettings, Backend, ConfigError, LogSettings,
    ServerSettings, Source, StoreSettings, TelemetrySettings, Unmatched, UpstreamSettings,
};

/// `[store]`.
pub(super) fn compile_store(
    src: &Source,
    raw: &RawStore,
    base: &Path,
) -> Result<StoreSettings, ConfigError> {
    let store = StoreSettings {
        backend: compile_backend(src, raw)?,
        snapshot: raw.snapshot.as_ref().map(|p| base.join(p.get_ref())),
        snapshot_interval: duration(src, &raw.snapshot_interval, Duration::from_secs(5))?,
        max_counters: match &raw.max_counters {
            None => 1_000_000,
            Some(n) if *n.get_ref() >= 1 => *n.get_ref() as usize,
            Some(n) => return Err(src.at(n.span(), "max_counters must be at least 1")),
        },
    };
    if store.snapshot_interval.is_zero() {
        let span = raw
            .snapshot_interval
            .as_ref()
            .map(|s| s.span())
            .unwrap_or(0..0);
        return Err(src.at(span, "snapshot_interval must be above zero"));
    }
    Ok(store)
}

fn compile_backend(src: &Source, raw: &RawStore) -> Result<Backend, ConfigError> {
    let redis_only: [(&str, Option<Range<usize>>); 4] = [
        ("url", raw.url.as_ref().map(|s| s.span())),
        ("timeout", raw.timeout.as_ref().map(|s| s.span())),
        ("lease", raw.lease.as_ref().map(|s| s.span())),
        ("cluster", raw.cluster.map(|_| 0..0)),
    ];
    let backend = raw.backend.as_ref().map(|b| *b.get_ref());
    if backend != Some(RawBackend::Redis) {
        if let Some((field, span)) = redis_only.iter().find(|(_, span)| span.is_some()) {
            return Err(src.at(
                span.clone().unwrap_or(0..0),
                format!("`{field}` applies to backend = \"redis\" only"),
            ));
        }
        return Ok(Backend::Memory);
    }
    if let Some(snapshot) = &raw.snapshot {
        return Err(src.at(
            snapshot.span(),
            "snapshots are for the memory backend: with redis the counters live in Redis",
        ));
    }
    let span = raw.backend.as_ref().map(|b| b.span()).unwrap_or(0..0);
    let url = raw.url.as_ref().ok_or_else(|| {
        src.at(
            span,
            "backend = \"redis\" needs `url`, e.g. \"redis://127.0.0.1:6379\"",
        )
    })?;
    if !url.get_ref().starts_with("redis://") && !url.get_ref().starts_with("rediss://") {
        return Err(src.at(
            url.span(),
            format!(
                "invalid redis url {:?}: expected redis://host:port",
                url.get_ref()
            ),
        ));
    }
    let timeout = duration(src, &raw.timeout, Duration::from_millis(50))?;
    let lease = duration(src, &raw.lease, Duration::from_secs(10))?;
    if lease < Duration::from_millis(300) {
        let span = raw.lease.as_ref().map(|l| l.span()).unwrap_or(0..0);
        return Err(src.at(
            span,
            "lease must be at least 300ms (it is renewed every third of it)",
        ));
    }
    Ok(Backend::Redis(RedisSettings {
        url: url.get_ref().clone(),
        cluster: raw.cluster.unwrap_or(false),
        prefix: raw.prefix.clone().unwrap_or_else(|| "turnstile:".into()),
        timeout,
        on_error: match raw.on_error {
            Some(RawOnError::Allow) => OnError::Allow,
            Some(RawOnError::Deny) => OnError::Deny,
            _ => OnError::Local,
        },
        lease,
    }))
}

pub(super) fn compile_admin(
    src: &Source,
    a: &RawAdmin,
    base: &Path,
) -> Result<AdminSettings, ConfigError> {
    let listen = listen_address(src, a.listen.as_ref())?
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090)));
    let mut token = a.token.clone().filter(|t| !t.is_empty());
    if let Some(file) = &a.token_file {
        let path = base.join(file.get_ref());
        let text = std::fs::read_to_string(&path).map_err(|e| {
            src.at(
                file.span(),
                format!("cannot read token_file {}: {e}", path.display()),
            )
        })?;
        token = Some(text.trim().to_owned()).filter(|t| !t.is_empty());
        if token.is_none() {
            return Err(src.at(
                file.span(),
                format!("token_file {} is empty", path.display()),
            ));
        }
    }
    if let Some(var) = &a.token_env {
        token = std::env::var(var.get_ref())
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        if token.is_none() {
            return Err(src.at(
                var.span(),
                format!(
                    "token_env: the environment variable {} is unset or empty",
                    var.get_ref()
                ),
            ));
        }
    }
    let sources = [
        a.token.is_some(),
        a.token_file.is_some(),
        a.token_env.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() > 1 {
        let span = a
            .token_file
            .as_ref()
            .or(a.token_env.as_ref())
            .map(|s| s.span())
            .unwrap_or(0..0);
        return Err(src.at(
            span,
            "give the admin token one way: token, token_file or token_env",
        ));
    }
    if token.is_none() && !listen.ip().is_loopback() && !a.insecure.unwrap_or(false) {
        let span = a.listen.as_ref().map(|s| s.span()).unwrap_or(0..0);
        return Err(src.at(
            span,
            format!(
                "the admin API on {listen} is reachable from other hosts without a token: set token_env, token_file or token, or insecure = true if that is on purpose"
            ),
        ));
    }
    Ok(AdminSettings { listen, token })
}

pub(super) fn compile_server(
    src: &Source,
    raw: &RawServer,
    base: &Path,
) -> Result<ServerSettings, ConfigError> {
    let listen = listen_address(src, raw.listen.as_ref())?
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
    Ok(ServerSettings {
        listen,
        unmatched: match raw.unmatched {
            Some(RawUnmatched::Reject) => Unmatched::Reject,
            _ => Unmatched::Forward,
        },
        max_body: size(src, &raw.max_body, 100_000_000)?,
        header_timeout: duration(src, &raw.header_timeout, Duration::from_secs(10))?,
        trust_forwarded: raw.trust_forwarded.unwrap_or(false),
        shutdown_grace: duration(src, &raw.shutdown_grace, Duration::from_secs(30))?,
        mcp_max_body: size(src, &raw.mcp_max_body, 1_000_000)?,
        case_sensitive_paths: raw.case_sensitive_paths.unwrap_or(false),
        idle_timeout: duration(src, &raw.idle_timeout, Duration::from_secs(60))?,
        body_timeout: duration(src, &raw.body_timeout, Duration::from_secs(30))?,
        max_connections: match &raw.max_connections {
            None => 10_000,
            Some(n) if *n.get_ref() >= 1 => *n.get_ref() as usize,
            Some(n) => return Err(src.at(n.span(), "max_connections must be at least 1")),
        },
        max_concurrent_streams: match &raw.max_concurrent_streams {
            None => 100,
            Some(n) if *n.get_ref() >= 1 => *n.get_ref(),
            Some(n) => return Err(src.at(n.span(), "max_concurrent_streams must be at least 1")),
        },
        max_buffered: size(src, &raw.max_buffered, 256_000_000)?,
        resolve_timeout: duration(src, &raw.resolve_timeout, Duration::from_secs(2))?,
        tls: match &raw.tls {
            None => None,
            Some(t) => {
                let files = t.get_ref();
                let loaded = crate::wire::tls::TlsSettings::load(
                    &base.join(&files.cert),
                    &base.join(&files.key),
                );
                Some(loaded.map_err(|m| src.at(t.span(), m))?)
            }
        },
        usage_path: match &raw.usage_path {
            None => None,
            Some(p) if p.get_ref().starts_with('/') && !p.get_ref().contains(['?', '#']) => {
                Some(p.get_ref().clone())
            }
            Some(p) => {
                return Err(src.at(
                    p.span(),
                    "usage_path must be a path starting with / (no query), e.g. \"/v1/limits\"",
                ))
            }
        },
    })
}

/// `[upstream]` and every `[upstreams.NAME]` (in name order, with its name).
#[allow(clippy::type_complexity)]
pub(super) fn compile_upstreams(
    src: &Source,
    raw: &RawConfig,
) -> Result<(UpstreamSettings, Vec<(Arc<str>, UpstreamSettings)>), ConfigError> {
    let upstream = compile_upstream(src, &raw.upstream)?;
    let mut named = Vec::with_capacity(raw.upstreams.len());
    for (name, table) in &raw.upstreams {
        named.push((
            name.as_str().into(),
            compile_upstream(src, table.get_ref())?,
        ));
    }
    Ok((upstream, named))
}

fn compile_upstream(src: &Source, raw: &RawUpstream) -> Result<UpstreamSettings, ConfigError> {
    let url = raw.url.get_ref();
    let bad = |m: String| src.at(raw.url.span(), m);
    let uri: Uri = url
        .parse()
        .map_err(|_| bad(format!("invalid upstream url {url:?}")))?;
    let scheme = uri.scheme().cloned().ok_or_else(|| {
        bad(format!(
            "upstream url {url:?} needs a scheme, e.g. \"http://127.0.0.1:9000\""
        ))
    })?;
    if scheme != Scheme::HTTP {
        return Err(bad(format!("upstream url {url:?}: only http:// is supported (turnstile runs beside the API it protects)")));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| bad(format!("upstream url {url:?} needs a host")))?;
    if uri.query().is_some() {
        return Err(bad(format!(
            "upstream url {url:?} must not have a query string"
        )));
    }
    let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| {
        bad(format!(
            "upstream url {url:?}: host is not a valid Host header"
        ))
    })?;
    Ok(UpstreamSettings {
        scheme,
        authority,
        host_header,
        base_path: uri.path().trim_end_matches('/').to_owned(),
        timeout: duration(src, &raw.timeout, Duration::from_secs(300))?,
        connect_timeout: duration(src, &raw.connect_timeout, Duration::from_secs(5))?,
        preserve_host: raw.preserve_host.unwrap_or(true),
        account_header: header_name(src, &raw.account_header, "x-turnstile-account")?,
        plan_header: header_name(src, &raw.plan_header, "x-turnstile-plan")?,
    })
}

pub(super) fn compile_headers<'a>(
    src: &Source,
    raw: &'a RawHeaders,
    limit_prefixes: impl Iterator<Item = &'a str>,
) -> Result<HeaderSettings, ConfigError> {
    let (prefix, span) = match &raw.prefix {
        Some(p) => (p.get_ref().as_str(), p.span()),
        None => ("X-RateLimit", 0..0),
    };
    let spellings = Spellings::for_prefixes(std::iter::once(prefix).chain(limit_prefixes));
    let main = HeaderTrio::new(prefix).map_err(|m| src.at(span.clone(), m))?;
    let kind = HeaderName::from_bytes(format!("{prefix}-Type").as_bytes())
        .map_err(|_| src.at(span, "invalid header prefix"))?;
    Ok(HeaderSettings {
        main,
        kind,
        reset: match raw.reset {
            Some(RawReset::Seconds) => ResetFormat::Seconds,
            _ => ResetFormat::Unix,
        },
        on_success: raw.on_success.unwrap_or(true),
        ietf: raw.ietf.unwrap_or(false),
        primary: raw.primary.as_ref().map(|p| p.get_ref().clone()),
        spellings: Arc::new(spellings),
    })
}

pub(super) fn add_responses(
    src: &Source,
    raw: &RawResponses,
    set: &mut ResponseSet,
) -> Result<(), ConfigError> {
    for (name, r) in raw.get_ref() {
        let span = r.span();
        let r = r.get_ref();
        let status = match &r.status {
            None => None,
            Some(s) => Some(
                StatusCode::from_u16(*s.get_ref())
                    .map_err(|_| src.at(s.span(), format!("invalid status {}", s.get_ref())))?,
            ),
        };
        let content_type = match &r.content_type {
            None => HeaderValue::from_static("application/json"),
            Some(c) => HeaderValue::from_str(c.get_ref())
                .map_err(|_| src.at(c.span(), "invalid content_type"))?,
        };
        let template = Template::new(status, content_type, r.body.as_deref());
        if !set.set(name, Arc::new(template)) {
            return Err(src.at(
                span,
                format!(
                    "unknown response {name:?}: expected one of {}",
                    RESPONSE_NAMES.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// `[log]`, `[admin]` and `[telemetry]`: how turnstile is watched.
pub(super) fn compile_operations(
    src: &Source,
    raw: &RawConfig,
    base: &Path,
) -> Result<
    (
        LogSettings,
        Option<AdminSettings>,
        Option<TelemetrySettings>,
    ),
    ConfigError,
> {
    let log = LogSettings {
        refusals_per_second: raw.log.refusals_per_second.unwrap_or(100),
        access: raw.log.access.unwrap_or(false),
    };
    let admin = match &raw.admin {
        None => None,
        Some(a) => Some(compile_admin(src, a, base)?),
    };
    let telemetry = match &raw.telemetry {
        None => None,
        Some(t) => Some(compile_telemetry(src, t)?),
    };
    Ok((log, admin, telemetry))
}

fn compile_telemetry(src: &Source, t: &RawTelemetry) -> Result<TelemetrySettings, ConfigError> {
    let endpoint = t.otlp_endpoint.get_ref().trim();
    let parsed: Result<http::Uri, _> = endpoint.parse();
    let usable = parsed.as_ref().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http") | Some("https")) && u.authority().is_some()
    });
    if !usable {
        return Err(src.at(
            t.otlp_endpoint.span(),
            "otlp_endpoint must be an http:// or https:// URL of an OTLP/gRPC collector, e.g. \"http://127.0.0.1:4317\"",
        ));
    }
    let sample_ratio = match &t.sample_ratio {
        None => 1.0,
        Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
        Some(r) => {
            return Err(src.at(
                r.span(),
                "sample_ratio must be from 0 to 1 (0.01: one trace in a hundred)",
            ))
        }
    };
    Ok(TelemetrySettings {
        otlp_endpoint: endpoint.to_owned(),
        sample_ratio,
        service_name: t
            .service_name
            .clone()
            .unwrap_or_else(|| "turnstile".to_owned()),
        export_interval: duration(src, &t.export_interval, std::time::Duration::from_secs(5))?,
        metrics: t.metrics.unwrap_or(false),
    })
}
