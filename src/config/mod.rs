//! Configuration (docs/configuration.md) in two stages: [`raw`] mirrors the TOML file and
//! refuses unknown keys; [`load`] validates it into a [`Policy`] in which
//! routes are compiled matchers, limits are typed rules with precomputed
//! counter ids, and every error names `file:line:col`.

mod content;
mod kinds;
mod raw;
mod units;

use crate::keys::identity::KeyStoreAt;
use crate::wire::header_case::Spellings;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::content::conditions::Condition;
use crate::content::cost::{Cost, RefundOn};
pub use crate::content::mcp::ArgLimit;
use crate::content::routing::{PathPattern, RouteMatcher};
use crate::content::values::{Side, ValueSource};
use crate::jobs::JobRole;
use crate::keys::identity::{
    self, IdentitySettings, KeyRecord, KeyRegistry, KeySource, UnknownKey,
};
pub use crate::limits::{HeaderTrio, LimitSpec, Per, QueueSpec};
use crate::respond::{HeaderSettings, ResetFormat, ResponseSet, Template, RESPONSE_NAMES};
pub use crate::store::{OnError, RedisSettings};
pub use crate::wire::body::display_size;
use crate::wire::body::BodyLimits;
use raw::*;
pub use units::{parse_duration, parse_rate, parse_size, RawSize};

/// A config problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{file}: {message}")]
    Io {
        /// The file.
        file: String,
        /// What went wrong.
        message: String,
    },
    /// A syntax or semantic error at a position (1-based line and column).
    #[error("{file}:{line}:{col}: {message}")]
    At {
        /// The file.
        file: String,
        /// Line, from 1.
        line: usize,
        /// Column in characters, from 1.
        col: usize,
        /// What is wrong.
        message: String,
    },
}

/// Turns byte spans of one file into `file:line:col` errors.
struct Source {
    file: String,
    text: String,
}

impl Source {
    fn read(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            file: file.clone(),
            message: e.to_string(),
        })?;
        Ok(Self { file, text })
    }

    fn at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        ConfigError::At {
            file: self.file.clone(),
            line,
            col,
            message: message.into(),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|e| {
            let message = e.message().trim().to_owned();
            self.at(e.span().unwrap_or(0..0), message)
        })
    }
}

/// Validated `[server]` settings.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Proxy listen address.
    pub listen: SocketAddr,
    /// What happens to requests no route matches.
    pub unmatched: Unmatched,
    /// Default body limit of every route, in bytes.
    pub max_body: u64,
    /// Time a client has to send its request headers.
    pub header_timeout: Duration,
    /// Append to (true) or replace (false) incoming `X-Forwarded-*`.
    pub trust_forwarded: bool,
    /// How long in-flight exchanges may take to finish on shutdown.
    pub shutdown_grace: Duration,
    /// How much of a JSON body is read to route MCP tool calls or check arguments.
    pub mcp_max_body: u64,
    /// Route patterns compare ASCII letters exactly (default: case ignored).
    pub case_sensitive_paths: bool,
    /// An open connection with no exchange in flight is closed after this.
    pub idle_timeout: Duration,
    /// A request body stalling this long between bytes is cut (408).
    pub body_timeout: Duration,
    /// Most client connections open at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// Most HTTP/2 streams open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Most bytes of request bodies held for inspection at once (503 past it).
    pub max_buffered: u64,
    /// Longest wait for a `url_args` host name to resolve.
    pub resolve_timeout: Duration,
    /// HTTPS on the proxy listener (`None`: plain HTTP).
    pub tls: Option<crate::wire::tls::TlsSettings>,
    /// `GET` here answers the caller's own usage, uncounted (`None`: off).
    pub usage_path: Option<String>,
}

/// Validated `[store]` settings.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Where counters live.
    pub backend: Backend,
    /// Snapshot file (absolute, or relative to the working directory once resolved).
    pub snapshot: Option<PathBuf>,
    /// How often the snapshot is written.
    pub snapshot_interval: Duration,
    /// Most counters kept in memory; past it the least valuable are evicted.
    pub max_counters: usize,
}

/// Validated `[log]` settings.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Most refusal log lines a second before they are summarised.
    pub refusals_per_second: u32,
    /// One access log line per exchange (`[log] access`).
    pub access: bool,
}

/// Validated `[admin]` settings.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Admin listen address.
    pub listen: SocketAddr,
    /// Bearer token required by `/v1/*`.
    pub token: Option<String>,
}

/// `[server] unmatched`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// Forward without identity or limits.
    Forward,
    /// 404 `not_found`.
    Reject,
}

/// Validated `[upstream]` settings.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `http`.
    pub scheme: Scheme,
    /// `host:port` of the upstream.
    pub authority: Authority,
    /// The same, ready to send as `Host` (built once, not per request).
    pub host_header: HeaderValue,
    /// Path prefix prepended to every forwarded path (no trailing `/`; may be empty).
    pub base_path: String,
    /// Default exchange timeout (routes may override).
    pub timeout: Duration,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Keep the client's `Host` (true) or send the upstream's (false).
    pub preserve_host: bool,
    /// Header carrying the caller's account upstream.
    pub account_header: HeaderName,
    /// Header carrying the caller's plan upstream.
    pub plan_header: HeaderName,
}

/// `[store] backend`: where counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// In this process.
    Memory,
    /// In Redis, shared by every instance (README, "Distributed mode").
    Redis(RedisSettings),
}

/// A limit as applied to one route: which limit, and its counter id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedLimit {
    /// Index into [`Plan::limits`].
    pub limit: usize,
    /// Stable id of the counter (hashed from what identifies it: plan, limit, routes, kind, window).
    pub counter: u64,
}

/// A validated plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Plan name.
    pub name: Arc<str>,
    /// The name as a header value (sent upstream).
    pub header_value: HeaderValue,
    /// The plan's limits in file order.
    pub limits: Vec<LimitSpec>,
    /// For each route index: the limits covering it, in file order.
    pub by_route: Vec<Vec<AppliedLimit>>,
}

/// How a route's refusals are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Plain HTTP status and JSON body (docs/headers-and-refusals.md).
    Json,
    /// MCP tool errors: HTTP 200 JSON-RPC results with `isError` (docs/configuration.md, "MCP servers"); 401 stays 401.
    Mcp,
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in the config (file order).
    pub index: usize,
    /// Route name.
    pub name: Arc<str>,
    /// What it matches.
    pub matcher: RouteMatcher,
    /// Body limits: whole body and by content type.
    pub body: BodyLimits,
    /// Exchange timeout.
    pub timeout: Duration,
    /// Whether a key is required.
    pub auth: bool,
    /// The path pattern as written.
    pub path_text: String,
    /// MCP: matches only `tools/call` requests for this tool.
    pub mcp_tool: Option<String>,
    /// How refusals are shaped.
    pub format: Format,
    /// Plan gating: indices of the plans allowed (`None`: every plan).
    pub plans: Option<Vec<usize>>,
    /// Names of the allowed plans, for the 403.
    pub plan_names: Vec<Arc<str>>,
    /// Rules on JSON argument sizes.
    pub arg_limits: Vec<ArgLimit>,
    /// What the route's answers mean for jobs in progress (docs/configuration.md, "Jobs").
    pub job: JobRole,
    /// Media duration limits by content type (`max_duration_by_type`).
    pub media: crate::content::media::MediaLimits,
    /// JSON values that must be fetchable public URLs (`url_args`).
    pub url_args: Vec<crate::content::urls::UrlArg>,
    /// What a request costs (`None`: 1).
    pub cost: Option<Cost>,
    /// Where the answer says what the request cost.
    pub settle: Option<ValueSource>,
    /// The outcomes that give back everything the exchange consumed.
    pub refund_on: RefundOn,
    /// Conditions on request values; all must hold for the route to match.
    pub when: Vec<Condition>,
    /// Whether matching this route reads the JSON body (`mcp_tool`, or a
    /// `json:` condition).
    pub match_reads_json: bool,
    /// Whether the upstream's answer is read (`job`, `job_status`,
    /// `job_cancel`, `settle`): the request asks for a whole, uncompressed answer.
    pub reads_answer: bool,
    /// Refusal templates in force (route over global).
    pub responses: Arc<ResponseSet>,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The config file it came from.
    pub path: PathBuf,
    /// `[server]`.
    pub server: ServerSettings,
    /// `[upstream]`.
    pub upstream: UpstreamSettings,
    /// `[identity]` with the keys file.
    pub identity: IdentitySettings,
    /// `[headers]`.
    pub headers: HeaderSettings,
    /// `[store]`.
    pub store: StoreSettings,
    /// `[admin]`; `None`: no admin listener.
    pub admin: Option<AdminSettings>,
    /// `[log]`.
    pub log: LogSettings,
    /// Routes in file order.
    pub routes: Vec<Route>,
    /// Plans by name order.
    pub plans: Vec<Plan>,
    /// Global refusal templates (used for unmatched requests).
    pub responses: Arc<ResponseSet>,
}

/// Loads and validates a config file (and its keys file).
pub fn load(path: &Path) -> Result<Policy, ConfigError> {
    let src = Source::read(path)?;
    let raw: RawConfig = src.parse()?;
    let base = path.parent().unwrap_or(Path::new("."));
    compile(&src, raw, base, path)
}

fn duration(
    src: &Source,
    raw: &Option<Spanned<String>>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(default),
        Some(s) => parse_duration(s.get_ref()).map_err(|m| src.at(s.span(), m)),
    }
}

fn size(src: &Source, raw: &Option<Spanned<RawSize>>, default: u64) -> Result<u64, ConfigError> {
    match raw {
        None => Ok(default),
        Some(s) => parse_size(s.get_ref()).map_err(|m| src.at(s.span(), m)),
    }
}

fn header_name(
    src: &Source,
    raw: &Option<Spanned<String>>,
    default: &'static str,
) -> Result<HeaderName, ConfigError> {
    match raw {
        None => Ok(HeaderName::from_static(default)),
        Some(s) => HeaderName::from_bytes(s.get_ref().as_bytes())
            .map_err(|_| src.at(s.span(), format!("invalid header name {:?}", s.get_ref()))),
    }
}

fn compile(src: &Source, raw: RawConfig, base: &Path, path: &Path) -> Result<Policy, ConfigError> {
    let server = compile_server(src, &raw.server, base)?;
    let upstream = compile_upstream(src, &raw.upstream)?;
    let limit_prefixes = raw
        .plans
        .values()
        .flat_map(|p| &p.get_ref().limits)
        .filter_map(|l| l.get_ref().headers.as_ref().map(|h| h.get_ref().as_str()));
    let headers = compile_headers(src, &raw.headers, limit_prefixes)?;
    let store = compile_store(src, &raw.store, base)?;
    let log = LogSettings {
        refusals_per_second: raw.log.refusals_per_second.unwrap_or(100),
        access: raw.log.access.unwrap_or(false),
    };
    let admin = match &raw.admin {
        None => None,
        Some(a) => Some(compile_admin(src, a, base)?),
    };

    let mut global = ResponseSet::default();
    if let Some(r) = &raw.responses {
        add_responses(src, r, &mut global)?;
    }
    let global = Arc::new(global);

    let mut routes = compile_routes(src, &raw.routes, &server, &upstream, &global)?;

    let plan_names: Vec<&String> = raw.plans.keys().collect();
    let mut plans = Vec::with_capacity(raw.plans.len());
    for (name, plan) in &raw.plans {
        plans.push(compile_plan(src, name, plan, &routes)?);
    }
    if plans.is_empty() {
        // No [plans]: every key is on an implicit plan without limits.
        plans.push(Plan {
            name: "default".into(),
            header_value: HeaderValue::from_static("default"),
            limits: Vec::new(),
            by_route: vec![Vec::new(); routes.len()],
        });
    }
    gate_routes(src, &mut routes, &raw.routes, &plans, &plan_names)?;
    if let Some(primary) = &headers.primary {
        let known = plans
            .iter()
            .any(|p| p.limits.iter().any(|l| &*l.name == primary.as_str()));
        if !known && !plans.is_empty() {
            let span = raw
                .headers
                .primary
                .as_ref()
                .map(|s| s.span())
                .unwrap_or(0..0);
            return Err(src.at(
                span,
                format!("[headers] primary names {primary:?}, which no plan has as a limit"),
            ));
        }
    }

    let identity = compile_identity(src, &raw.identity, &plans, &plan_names, base, &store)?;
    Ok(Policy {
        path: path.to_path_buf(),
        server,
        upstream,
        identity,
        headers,
        store,
        admin,
        log,
        routes,
        plans,
        responses: global,
    })
}

/// `[store]`.
fn compile_store(src: &Source, raw: &RawStore, base: &Path) -> Result<StoreSettings, ConfigError> {
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

/// Every `[[routes]]` entry in file order; names must be unique.
fn compile_routes(
    src: &Source,
    raw: &[Spanned<RawRoute>],
    server: &ServerSettings,
    upstream: &UpstreamSettings,
    global: &Arc<ResponseSet>,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes = Vec::with_capacity(raw.len());
    let mut names = HashSet::new();
    for r in raw {
        let r = r.get_ref();
        if !names.insert(r.name.get_ref().clone()) {
            return Err(src.at(
                r.name.span(),
                format!("duplicate route name {:?}", r.name.get_ref()),
            ));
        }
        let mut route = compile_route(src, r, server, upstream, global)?;
        route.index = routes.len();
        routes.push(route);
    }
    Ok(routes)
}

/// Plan gating: each route's `plans = [...]` resolved to plan indices.
fn gate_routes(
    src: &Source,
    routes: &mut [Route],
    raw: &[Spanned<RawRoute>],
    plans: &[Plan],
    plan_names: &[&String],
) -> Result<(), ConfigError> {
    for (route, raw_route) in routes.iter_mut().zip(raw) {
        let Some(names) = &raw_route.get_ref().plans else {
            continue;
        };
        let mut allowed = Vec::new();
        for name in names.get_ref() {
            let index = plan_index(plans, name)
                .filter(|_| !plan_names.is_empty())
                .ok_or_else(|| {
                    src.at(
                        names.span(),
                        format!("unknown plan {name:?}: plans are {}", list(plan_names)),
                    )
                })?;
            allowed.push(index);
            route.plan_names.push(plans[index].name.clone());
        }
        route.plans = Some(allowed);
    }
    Ok(())
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

fn compile_admin(src: &Source, a: &RawAdmin, base: &Path) -> Result<AdminSettings, ConfigError> {
    let listen = match &a.listen {
        None => SocketAddr::from(([127, 0, 0, 1], 9090)),
        Some(s) => s.get_ref().parse().map_err(|_| {
            src.at(
                s.span(),
                format!("invalid listen address {:?}: expected IP:PORT", s.get_ref()),
            )
        })?,
    };
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

fn compile_server(
    src: &Source,
    raw: &RawServer,
    base: &Path,
) -> Result<ServerSettings, ConfigError> {
    let listen = match &raw.listen {
        None => SocketAddr::from(([0, 0, 0, 0], 8080)),
        Some(s) => s.get_ref().parse().map_err(|_| {
            src.at(
                s.span(),
                format!(
                    "invalid listen address {:?}: expected IP:PORT, e.g. \"0.0.0.0:8080\"",
                    s.get_ref()
                ),
            )
        })?,
    };
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

fn compile_headers<'a>(
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

fn add_responses(
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

fn compile_route(
    src: &Source,
    r: &RawRoute,
    server: &ServerSettings,
    upstream: &UpstreamSettings,
    global: &Arc<ResponseSet>,
) -> Result<Route, ConfigError> {
    let method = match &r.method {
        None => None,
        Some(m) => Some(
            Method::from_bytes(m.get_ref().to_ascii_uppercase().as_bytes())
                .map_err(|_| src.at(m.span(), format!("invalid method {:?}", m.get_ref())))?,
        ),
    };
    let path = PathPattern::parse_with_case(r.path.get_ref(), server.case_sensitive_paths)
        .map_err(|m| src.at(r.path.span(), m))?;
    let host = r
        .host
        .as_ref()
        .map(|h| crate::content::routing::strip_port(h.get_ref()).to_ascii_lowercase());
    let when = content::when(src, r, &path)?;
    let job = job_role(src, r, &path)?;
    let settle = content::settle(src, r, &path)?;
    let responses = match &r.responses {
        None => global.clone(),
        Some(own) => {
            let mut set = (**global).clone();
            add_responses(src, own, &mut set)?;
            Arc::new(set)
        }
    };
    Ok(Route {
        index: 0,
        name: r.name.get_ref().as_str().into(),
        body: BodyLimits {
            max: size(src, &r.max_body, server.max_body)?,
            by_type: by_type(src, r.max_body_by_type.as_ref())?,
        },
        timeout: duration(src, &r.timeout, upstream.timeout)?,
        auth: r.auth.unwrap_or(true),
        path_text: r.path.get_ref().clone(),
        mcp_tool: r.mcp_tool.as_ref().map(|t| t.get_ref().clone()),
        format: match r.format {
            Some(RawFormat::Mcp) => Format::Mcp,
            _ => Format::Json,
        },
        plans: None,
        plan_names: Vec::new(),
        arg_limits: arg_limits(src, r.arg_limits.as_deref())?,
        media: content::media_limits(src, r)?,
        url_args: content::url_args(src, r)?,
        cost: content::cost(src, r, &path)?,
        refund_on: content::refund_on(src, r)?,
        match_reads_json: r.mcp_tool.is_some() || crate::content::conditions::need_json(&when),
        reads_answer: !matches!(job, JobRole::None) || settle.is_some(),
        job,
        settle,
        when,
        matcher: RouteMatcher { method, path, host },
        responses,
    })
}

/// The route's `job`, `job_status` or `job_cancel` (at most one).
fn job_role(src: &Source, r: &RawRoute, pattern: &PathPattern) -> Result<JobRole, ConfigError> {
    let source = |s: &Spanned<String>, side: Side| {
        ValueSource::parse(s.get_ref(), side, pattern).map_err(|m| src.at(s.span(), m))
    };
    let mut roles = Vec::new();
    if let Some(j) = &r.job {
        roles.push((
            j.span(),
            JobRole::Submit {
                id: source(&j.get_ref().id, Side::Response)?,
            },
        ));
    }
    if let Some(j) = &r.job_status {
        let raw = j.get_ref();
        if raw.done.get_ref().is_empty() {
            return Err(src.at(raw.done.span(), "`done` lists at least one state"));
        }
        roles.push((
            j.span(),
            JobRole::Status {
                id: source(&raw.id, Side::Request)?,
                state: source(&raw.state, Side::Response)?,
                done: raw.done.get_ref().clone(),
            },
        ));
    }
    if let Some(j) = &r.job_cancel {
        let raw = j.get_ref();
        let check = match (&raw.state, &raw.done) {
            (None, None) => None,
            (Some(state), Some(done)) if !done.get_ref().is_empty() => {
                Some((source(state, Side::Response)?, done.get_ref().clone()))
            }
            (Some(_), Some(done)) => {
                return Err(src.at(done.span(), "`done` lists at least one state"))
            }
            (Some(state), None) => {
                return Err(src.at(
                    state.span(),
                    "`state` needs `done`: the states in which the job was cancelled",
                ))
            }
            (None, Some(done)) => {
                return Err(src.at(
                    done.span(),
                    "`done` needs `state`: where the answer says the job's state",
                ))
            }
        };
        roles.push((
            j.span(),
            JobRole::Cancel {
                id: source(&raw.id, Side::Request)?,
                check,
            },
        ));
    }
    match roles.len() {
        0 => Ok(JobRole::None),
        1 => Ok(roles.remove(0).1),
        _ => Err(src.at(
            roles[1].0.clone(),
            format!(
                "route {:?}: `job`, `job_status` and `job_cancel` exclude each other",
                r.name.get_ref()
            ),
        )),
    }
}

fn arg_limits(
    src: &Source,
    raw: Option<&[Spanned<RawArgLimit>]>,
) -> Result<Vec<ArgLimit>, ConfigError> {
    let mut out = Vec::new();
    for a in raw.into_iter().flatten() {
        let span = a.span();
        let a = a.get_ref();
        if a.pointers.is_empty() {
            return Err(src.at(
                span,
                "arg_limits needs at least one pointer, e.g. \"/params/arguments/text\"",
            ));
        }
        if let Some(bad) = a
            .pointers
            .iter()
            .find(|p| !p.is_empty() && !p.starts_with('/'))
        {
            return Err(src.at(
                span,
                format!("invalid JSON pointer {bad:?}: it must be empty or start with '/'"),
            ));
        }
        match (a.min_chars, a.max_chars) {
            (None, None) => {
                return Err(src.at(span, "arg_limits needs min_chars, max_chars or both"))
            }
            (Some(min), Some(max)) if min > max => {
                return Err(src.at(
                    span,
                    format!("min_chars ({min}) is above max_chars ({max})"),
                ))
            }
            _ => {}
        }
        out.push(ArgLimit {
            pointers: a.pointers.clone(),
            min_chars: a.min_chars,
            max_chars: a.max_chars,
        });
    }
    Ok(out)
}

fn by_type(
    src: &Source,
    raw: Option<&std::collections::BTreeMap<String, Spanned<RawSize>>>,
) -> Result<Vec<(String, u64)>, ConfigError> {
    let mut out = Vec::new();
    for (pattern, limit) in raw.into_iter().flatten() {
        out.push((
            type_pattern(src, pattern, limit.span())?,
            parse_size(limit.get_ref()).map_err(|m| src.at(limit.span(), m))?,
        ));
    }
    Ok(out)
}

/// A content-type pattern of a `*_by_type` table, lower-cased: `type/subtype`,
/// `type/*` or `*/*`.
fn type_pattern(src: &Source, pattern: &str, span: Range<usize>) -> Result<String, ConfigError> {
    let p = pattern.trim().to_ascii_lowercase();
    let valid = match p.split_once('/') {
        Some((major, minor)) => {
            !major.is_empty()
                && !minor.is_empty()
                && (major != "*" || minor == "*")
                && !minor.contains('/')
        }
        None => false,
    };
    if !valid {
        return Err(src.at(
            span,
            format!("invalid content type {pattern:?}: expected \"type/subtype\", \"type/*\" or \"*/*\""),
        ));
    }
    Ok(p)
}

fn counter_id(parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// A whole number from 1 to `u32::MAX`: limits cannot be written down as zero.
fn positive(src: &Source, v: &Spanned<i64>, what: &str) -> Result<NonZeroU32, ConfigError> {
    u32::try_from(*v.get_ref())
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| {
            src.at(
                v.span(),
                format!("{what} must be a whole number from 1 to {}", u32::MAX),
            )
        })
}

/// The routes a limit covers (indices) and its `routes` as written, for the
/// counter identity and the `check` table.
fn covered_routes(
    src: &Source,
    routes: &[Route],
    l: &RawLimit,
) -> Result<(Vec<usize>, String), ConfigError> {
    Ok(match &l.routes {
        None => ((0..routes.len()).collect(), "*".into()),
        Some(sel) => match sel.get_ref() {
            RawRouteSet::One(s) if s == "*" => ((0..routes.len()).collect(), "*".into()),
            RawRouteSet::One(s) => (vec![route_index(src, routes, s, sel.span())?], s.clone()),
            RawRouteSet::Many(list) => {
                let mut idx = Vec::new();
                for s in list {
                    idx.push(route_index(src, routes, s, sel.span())?);
                }
                let sorted: BTreeSet<&String> = list.iter().collect();
                (
                    idx,
                    sorted.into_iter().cloned().collect::<Vec<_>>().join(","),
                )
            }
        },
    })
}

fn compile_plan(
    src: &Source,
    name: &str,
    raw: &Spanned<RawPlan>,
    routes: &[Route],
) -> Result<Plan, ConfigError> {
    let mut limits = Vec::new();
    let mut by_route: Vec<Vec<AppliedLimit>> = vec![Vec::new(); routes.len()];
    for l in &raw.get_ref().limits {
        let spec = compile_limit(src, l, routes)?;
        let (covered, _) = covered_routes(src, routes, l.get_ref())?;
        let applied = Applied {
            plan: name,
            index: limits.len(),
            spec: &spec,
            raw: l,
        };
        for r in covered.into_iter().filter(|&r| routes[r].auth) {
            let a = applied.to_route(src, &routes[r], &by_route[r], &limits)?;
            by_route[r].push(a);
        }
        limits.push(spec);
    }
    let header_value = HeaderValue::from_str(name).map_err(|_| {
        src.at(
            raw.span(),
            format!("plan name {name:?} cannot be sent in a header"),
        )
    })?;
    Ok(Plan {
        name: name.into(),
        header_value,
        limits,
        by_route,
    })
}

/// One limit of a plan, validated (its routes are applied separately).
fn compile_limit(
    src: &Source,
    l: &Spanned<RawLimit>,
    routes: &[Route],
) -> Result<LimitSpec, ConfigError> {
    let raw = l.get_ref();
    let (rule, window_text, queue) = kinds::compile_rule(src, l.span(), raw)?;
    let (_, routes_text) = covered_routes(src, routes, raw)?;
    let headers = match &raw.headers {
        None => None,
        Some(h) => Some(HeaderTrio::new(h.get_ref()).map_err(|m| src.at(h.span(), m))?),
    };
    Ok(LimitSpec {
        name: raw.name.get_ref().as_str().into(),
        name_value: http::HeaderValue::from_str(raw.name.get_ref()).ok(),
        limit_value: http::HeaderValue::from(rule.shown_limit()),
        rule,
        per: match raw.per {
            Some(RawPer::Account) => Per::Account,
            _ => Per::Key,
        },
        window_text: window_text.into(),
        headers,
        routes_text,
        per_route: raw.per_route.unwrap_or(false),
        queue,
        counts_cost: matches!(rule, crate::limits::Rule::Credits(_))
            || raw
                .count
                .as_ref()
                .is_some_and(|c| *c.get_ref() == RawCount::Cost),
        shadow: shadow(src, raw, &rule)?,
    })
}

/// `shadow = true`: quotas over time only (a slot, a job or a balance that
/// never refuses would be taken and never checked).
fn shadow(src: &Source, raw: &RawLimit, rule: &crate::limits::Rule) -> Result<bool, ConfigError> {
    match &raw.shadow {
        Some(s) if *s.get_ref() && !rule.is_quota() => Err(src.at(
            s.span(),
            format!(
                "limit {:?}: shadow applies to fixed, rolling and bucket limits, not {}",
                raw.name.get_ref(),
                rule.kind_name()
            ),
        )),
        Some(s) => Ok(*s.get_ref()),
        None => Ok(false),
    }
}

/// A limit being applied to the routes it covers.
struct Applied<'a> {
    plan: &'a str,
    index: usize,
    spec: &'a LimitSpec,
    raw: &'a Spanned<RawLimit>,
}

impl Applied<'_> {
    /// The limit on `route`, with its counter id; `already`: the limits on
    /// it so far (two of one name may not cover one route).
    fn to_route(
        &self,
        src: &Source,
        route: &Route,
        already: &[AppliedLimit],
        limits: &[LimitSpec],
    ) -> Result<AppliedLimit, ConfigError> {
        let lname = &*self.spec.name;
        let raw = self.raw.get_ref();
        let kind = raw.kind.unwrap_or(RawKind::Fixed);
        if kind == RawKind::Jobs && !matches!(route.job, JobRole::Submit { .. }) {
            return Err(src.at(
                self.raw.span(),
                format!(
                    "limit {lname:?} counts jobs, but route {:?} does not say where its answer names one: add `job = {{ id = \"json:/id\" }}` to the route",
                    &*route.name
                ),
            ));
        }
        if already
            .iter()
            .any(|a| limits_name(limits, a.limit) == lname)
        {
            return Err(src.at(
                raw.name.span(),
                format!(
                    "two limits named {lname:?} in plan {:?} both cover route {:?}",
                    self.plan, &*route.name
                ),
            ));
        }
        // The counter's identity leaves out the numbers a reload may change,
        // and the plan: counters belong to the subject, so a key's plan
        // change keeps its window counts, jobs and balance, and keys of one
        // account on different plans share its `per = "account"` counters
        // (each request checked against its own plan's figures).
        let identity_window = match kind {
            RawKind::Fixed | RawKind::Rolling => &*self.spec.window_text,
            RawKind::Bucket | RawKind::Concurrency | RawKind::Jobs | RawKind::Credits => "",
        };
        let route_part = if self.spec.per_route {
            &*route.name
        } else {
            ""
        };
        let mut identity = vec![
            lname,
            &self.spec.routes_text,
            kind.as_str(),
            identity_window,
            route_part,
        ];
        // Counting cost is another counter than counting requests.
        if self.spec.counts_cost && kind != RawKind::Credits {
            identity.push("cost");
        }
        let counter = counter_id(&identity);
        Ok(AppliedLimit {
            limit: self.index,
            counter,
        })
    }
}

fn limits_name(limits: &[LimitSpec], i: usize) -> &str {
    limits.get(i).map_or("", |l| &l.name)
}

fn route_index(
    src: &Source,
    routes: &[Route],
    name: &str,
    span: Range<usize>,
) -> Result<usize, ConfigError> {
    routes
        .iter()
        .position(|r| &*r.name == name)
        .ok_or_else(|| src.at(span, format!("unknown route {name:?}")))
}

fn plan_index(plans: &[Plan], name: &str) -> Option<usize> {
    plans.iter().position(|p| &*p.name == name)
}

fn compile_identity(
    src: &Source,
    raw: &RawIdentity,
    plans: &[Plan],
    plan_names: &[&String],
    base: &Path,
    store: &StoreSettings,
) -> Result<IdentitySettings, ConfigError> {
    let sources = match &raw.sources {
        None => vec![
            KeySource::Bearer,
            KeySource::Header(HeaderName::from_static("x-api-key")),
        ],
        Some(list) => {
            let mut out = Vec::new();
            for s in list {
                out.push(KeySource::parse(s.get_ref()).map_err(|m| src.at(s.span(), m))?);
            }
            if out.is_empty() {
                return Err(src.at(0..0, "[identity] sources must name at least one source"));
            }
            out
        }
    };
    let prefix = raw.prefix.as_ref().map(|p| p.get_ref().clone());
    let unknown_key = match raw.unknown_key {
        Some(RawUnknownKey::Default) => UnknownKey::Default,
        _ => UnknownKey::Reject,
    };
    let default_plan = match &raw.default_plan {
        Some(p) => Some(plan_index(plans, p.get_ref()).ok_or_else(|| {
            src.at(
                p.span(),
                format!(
                    "unknown plan {:?}: plans are {}",
                    p.get_ref(),
                    list(plan_names)
                ),
            )
        })?),
        None if plans.len() == 1 => Some(0),
        None if plan_names.is_empty() => Some(0),
        None => None,
    };
    let key_store = match &raw.key_store {
        None => None,
        Some(k) => {
            let redis = matches!(store.backend, Backend::Redis(_));
            match (k.get_ref().as_str(), redis) {
                ("redis", true) => Some(KeyStoreAt::Redis),
                ("redis", false) => return Err(src.at(k.span(), "key_store = \"redis\" needs the redis backend ([store] backend = \"redis\"); with the memory backend give a SQLite file, e.g. \"state/keys.db\"")),
                (_, true) => return Err(src.at(k.span(), "with the redis backend runtime keys live in Redis, so every instance sees them: write key_store = \"redis\"")),
                ("", false) => return Err(src.at(k.span(), "key_store must name a SQLite file, e.g. \"state/keys.db\"")),
                (path, false) => Some(KeyStoreAt::Sqlite(base.join(path))),
            }
        }
    };
    let max_keys_per_account = match &raw.max_keys_per_account {
        Some(n) if *n.get_ref() == 0 => {
            return Err(src.at(n.span(), "max_keys_per_account must be at least 1"))
        }
        n => n.as_ref().map(|n| *n.get_ref()),
    };
    let keys = match &raw.keys_file {
        None => None,
        Some(f) => Some(load_keys(
            &base.join(f.get_ref()),
            plans,
            plan_names,
            default_plan,
            prefix.as_deref(),
            max_keys_per_account,
        )?),
    };
    let needs_default =
        (keys.is_none() && key_store.is_none()) || unknown_key == UnknownKey::Default;
    if needs_default && default_plan.is_none() && !plans.is_empty() {
        return Err(src.at(0..0, format!("[identity] default_plan is required: keys without a keys-file entry need a plan (one of {})", list(plan_names))));
    }
    Ok(IdentitySettings {
        sources,
        prefix,
        unknown_key,
        default_plan,
        keys,
        key_store,
        max_keys_per_account,
    })
}

fn list(names: &[&String]) -> String {
    names
        .iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn load_keys(
    path: &Path,
    plans: &[Plan],
    plan_names: &[&String],
    default_plan: Option<usize>,
    prefix: Option<&str>,
    cap: Option<u32>,
) -> Result<KeyRegistry, ConfigError> {
    let src = Source::read(path)?;
    let raw: RawKeysFile = src.parse()?;
    let mut reg = KeyRegistry::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut active: HashMap<&str, u32> = HashMap::new();
    for k in &raw.keys {
        let span = k.span();
        let k = k.get_ref();
        let digest = match (&k.key, &k.sha256) {
            (Some(key), None) => {
                if let Some(p) = prefix {
                    if !key.get_ref().starts_with(p) {
                        return Err(src.at(key.span(), format!("key does not start with the identity prefix {p:?}, so it could never be used")));
                    }
                }
                identity::digest(key.get_ref())
            }
            (None, Some(h)) => {
                let mut d = [0u8; 32];
                hex::decode_to_slice(h.get_ref().trim(), &mut d)
                    .map_err(|_| src.at(h.span(), "sha256 must be 64 hex characters"))?;
                d
            }
            _ => return Err(src.at(span, "each key needs exactly one of `key` or `sha256`")),
        };
        let plan = match &k.plan {
            Some(p) => plan_index(plans, p.get_ref()).ok_or_else(|| {
                src.at(
                    p.span(),
                    format!(
                        "unknown plan {:?}: plans are {}",
                        p.get_ref(),
                        list(plan_names)
                    ),
                )
            })?,
            None => default_plan.ok_or_else(|| {
                src.at(
                    span.clone(),
                    "key has no `plan` and there is no default_plan",
                )
            })?,
        };
        let expires_at = match &k.expires_at {
            None => None,
            Some(t) => Some(
                crate::keys::runtime::parse_time(t.get_ref()).map_err(|m| src.at(t.span(), m))?,
            ),
        };
        let record = KeyRecord {
            account: k.account.as_deref().map(Arc::from),
            plan,
            revoked: k.revoked.unwrap_or(false),
            expires_at,
            name: k.name.as_deref().map(Arc::from),
        };
        if let (Some(cap), Some(account)) = (cap, k.account.as_deref()) {
            if record.active(now) {
                let n = active.entry(account).or_default();
                *n += 1;
                if *n > cap {
                    return Err(src.at(span, format!("account {account:?} has more than max_keys_per_account = {cap} active keys (this is number {n})")));
                }
            }
        }
        if !reg.insert(digest, record) {
            return Err(src.at(span, "duplicate key"));
        }
    }
    for a in &raw.accounts {
        if a.get_ref().disabled.unwrap_or(false) {
            reg.disable(&a.get_ref().name);
        }
    }
    Ok(reg)
}

impl Policy {
    /// The index of the plan called `name`.
    pub fn plan_index(&self, name: &str) -> Option<usize> {
        plan_index(&self.plans, name)
    }

    /// The routes × plans table printed by `turnstile check`.
    pub fn table(&self) -> String {
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut header = vec!["route".to_owned(), "match".to_owned(), "body".to_owned()];
        header.extend(self.plans.iter().map(|p| p.name.to_string()));
        rows.push(header);
        for (i, r) in self.routes.iter().enumerate() {
            let m = &r.matcher;
            let mut matched = format!(
                "{} {}",
                m.method.as_ref().map_or("*", |m| m.as_str()),
                r.path_text
            );
            if let Some(t) = &r.mcp_tool {
                let _ = write!(matched, " tool={t}");
            }
            for c in &r.when {
                let _ = write!(matched, " {}={}", c.source, c.values.join("|"));
            }
            match &r.cost {
                Some(crate::content::cost::Cost::Constant(n)) => {
                    let _ = write!(matched, " cost={n}");
                }
                Some(crate::content::cost::Cost::Priced { by, .. }) => {
                    let _ = write!(matched, " cost=by {by}");
                }
                None => {}
            }
            let mut body = display_size(r.body.max);
            for (pattern, limit) in &r.body.by_type {
                let _ = write!(body, ", {pattern} {}", display_size(*limit));
            }
            for (pattern, secs) in &r.media.by_type {
                let _ = write!(
                    body,
                    ", {pattern} {}",
                    crate::content::media::shown(*secs, *secs)
                );
            }
            let mut row = vec![r.name.to_string(), matched, body];
            for (plan_index, p) in self.plans.iter().enumerate() {
                let cell = if !r.auth {
                    "public".to_owned()
                } else if r
                    .plans
                    .as_ref()
                    .is_some_and(|allowed| !allowed.contains(&plan_index))
                {
                    "403 plan_required".to_owned()
                } else if p.by_route[i].is_empty() {
                    "-".to_owned()
                } else {
                    p.by_route[i]
                        .iter()
                        .map(|a| p.limits[a.limit].summary())
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                row.push(cell);
            }
            rows.push(row);
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in rows {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| format!("{cell:<w$}", w = widths[c]))
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        out
    }
}

#[cfg(test)]
mod tests;
