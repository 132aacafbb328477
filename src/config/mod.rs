//! Configuration (docs/configuration.md) in two stages: `raw` mirrors the TOML file and
//! refuses unknown keys; [`load`] validates it into a [`Policy`] in which
//! routes are compiled matchers, limits are typed rules with precomputed
//! counter ids, and every error names `file:line:col`.
//!
//! One file per area it compiles (`server`, `routes`, `plans`,
//! `keys`, `kinds`, `content`). It builds the validated types of the
//! layers below; none of them imports it.
//!
//! May import: [`crate::jobs`], [`crate::observe`], [`crate::respond`],
//! [`crate::keys`], [`crate::content`], [`crate::store`], [`crate::limits`],
//! [`crate::wire`], [`crate::clock`].

mod capacity;
mod content;
mod decision;
mod keys;
mod kinds;
mod ledger;
mod plans;
mod raw;
mod routes;
mod server;
mod units;

use plans::{compile_plan, positive};
use routes::{compile_routes, gate_routes, type_pattern};
use server::{
    add_responses, compile_headers, compile_operations, compile_server, compile_store,
    compile_upstreams,
};

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue};
use toml::Spanned;

use crate::content::conditions::Condition;
use crate::content::cost::{Cost, RefundOn};
pub use crate::content::mcp::ArgLimit;
use crate::content::routing::RouteMatcher;
use crate::content::values::ValueSource;
use crate::jobs::JobRole;
use crate::keys::identity::IdentitySettings;
pub use crate::limits::{HeaderTrio, LimitSpec, Per, QueueSpec};
pub use crate::observe::trace::TelemetrySettings;
use crate::respond::{HeaderSettings, ResponseSet};
pub use crate::store::{OnError, RedisSettings};
pub use crate::wire::body::display_size;
use crate::wire::body::BodyLimits;
pub use decision::{undecidable, DecisionSettings, EnvoySettings};
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

/// Keys whose value is a duration string (`"30s"`), for the message a bare
/// number gets.
const DURATION_KEYS: [&str; 15] = [
    "header_timeout",
    "shutdown_grace",
    "idle_timeout",
    "body_timeout",
    "resolve_timeout",
    "timeout",
    "connect_timeout",
    "snapshot_interval",
    "lease",
    "settle",
    "window",
    "retry_after",
    "max_duration",
    "refill",
    "max_wait",
];

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
            let span = e.span().unwrap_or(0..0);
            let message = self.explain(e.message().trim(), &span);
            self.at(span, message)
        })
    }

    /// A type error on a duration key (`timeout = 120`) says how durations
    /// are written; other messages are toml's own.
    fn explain(&self, message: &str, span: &Range<usize>) -> String {
        let line_start = self.text[..span.start.min(self.text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let before = &self.text[line_start..span.start.min(self.text.len())];
        let key = before
            .trim_end()
            .strip_suffix('=')
            .map(|k| k.trim().trim_matches('"'))
            .unwrap_or("");
        let value = self.text.get(span.clone()).unwrap_or("").trim();
        if message.starts_with("invalid type") && DURATION_KEYS.contains(&key) {
            let example = match value.parse::<u64>() {
                Ok(n) => format!("{key} = \"{n}s\""),
                Err(_) => format!("{key} = \"30s\""),
            };
            return format!("{key} is a duration: write it as a string with a unit, e.g. {example} (units: ms, s, m, h, d, w)");
        }
        message.to_owned()
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
    /// In Redis, shared by every instance (docs/operations.md, "Distributed mode").
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
    /// Index into [`Policy::upstreams`] (`None`: `[upstream]`).
    pub upstream: Option<usize>,
    /// Index into [`Policy::capacity`]: the pool the route takes a slot of.
    pub capacity: Option<usize>,
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
    /// `[upstreams.NAME]` in name order, each with its name.
    pub upstreams: Vec<(Arc<str>, UpstreamSettings)>,
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
    /// `[telemetry]`; `None`: no traces exported.
    pub telemetry: Option<TelemetrySettings>,
    /// `[decision]`; `None`: no decision endpoints.
    pub decision: Option<DecisionSettings>,
    /// `[[capacity]]` pools in file order.
    pub capacity: Vec<Arc<crate::capacity::PoolSpec>>,
    /// `[ledger]`; `None`: no ledger (read at start).
    pub ledger: Option<crate::ledger::LedgerSettings>,
    /// Routes in file order.
    pub routes: Vec<Route>,
    /// Plans by name order.
    pub plans: Vec<Plan>,
    /// Global refusal templates (used for unmatched requests).
    pub responses: Arc<ResponseSet>,
}

impl Policy {
    /// The upstream settings requests on `route` go to (`None`: unmatched
    /// requests, which go to `[upstream]`).
    pub fn upstream_of(&self, route: Option<&Route>) -> &UpstreamSettings {
        match route.and_then(|r| r.upstream) {
            Some(i) => self.upstreams.get(i).map_or(&self.upstream, |(_, u)| u),
            None => &self.upstream,
        }
    }
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

/// A listen address (`IP:PORT`), if one is written.
fn listen_address(
    src: &Source,
    raw: Option<&Spanned<String>>,
) -> Result<Option<SocketAddr>, ConfigError> {
    raw.map(|s| {
        s.get_ref().parse().map_err(|_| {
            src.at(
                s.span(),
                format!(
                    "invalid listen address {:?}: expected IP:PORT, e.g. \"127.0.0.1:8080\"",
                    s.get_ref()
                ),
            )
        })
    })
    .transpose()
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
    let (upstream, upstreams) = compile_upstreams(src, &raw)?;
    let limit_prefixes = raw
        .plans
        .values()
        .flat_map(|p| &p.get_ref().limits)
        .filter_map(|l| l.get_ref().headers.as_ref().map(|h| h.get_ref().as_str()));
    let headers = compile_headers(src, &raw.headers, limit_prefixes)?;
    let store = compile_store(src, &raw.store, base)?;
    let (log, admin, telemetry) = compile_operations(src, &raw, base)?;

    let mut global = ResponseSet::default();
    if let Some(r) = &raw.responses {
        add_responses(src, r, &mut global)?;
    }
    let global = Arc::new(global);

    let mut routes = compile_routes(src, &raw.routes, &server, (&upstream, &upstreams), &global)?;

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
    let known = Plans {
        plans: &plans,
        names: &plan_names,
    };
    gate_routes(src, &mut routes, &raw.routes, &known)?;
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

    let capacity = capacity::compile_capacity(src, &raw, &mut routes, &plans)?;
    let decision = decision::compile_decision(src, &raw, &routes, &plans)?;
    let ledger = ledger::compile_ledger(src, raw.ledger.as_ref(), base, &store.backend)?;
    let identity = keys::compile_identity(src, &raw.identity, &known, base, &store)?;
    Ok(Policy {
        path: path.to_path_buf(),
        server,
        upstream,
        upstreams,
        identity,
        headers,
        store,
        admin,
        log,
        telemetry,
        decision,
        capacity,
        ledger,
        routes,
        plans,
        responses: global,
    })
}

/// The plans a route, a key or `default_plan` may name, for lookups and
/// messages.
struct Plans<'a> {
    plans: &'a [Plan],
    names: &'a [&'a String],
}

impl Plans<'_> {
    /// The index of the plan `name` names, or an error listing the plans.
    fn index(&self, src: &Source, name: &Spanned<String>) -> Result<usize, ConfigError> {
        plan_index(self.plans, name.get_ref())
            .ok_or_else(|| self.unknown(src, name.get_ref(), name.span()))
    }

    /// "unknown plan": `name`, written at `span`, with the plans there are.
    fn unknown(&self, src: &Source, name: &str, span: std::ops::Range<usize>) -> ConfigError {
        src.at(
            span,
            format!("unknown plan {name:?}: plans are {}", self.list()),
        )
    }

    fn list(&self) -> String {
        let names: Vec<&str> = self.names.iter().map(|n| n.as_str()).collect();
        names.join(", ")
    }
}

fn plan_index(plans: &[Plan], name: &str) -> Option<usize> {
    plans.iter().position(|p| &*p.name == name)
}

impl Policy {
    /// Every plan's name, in order.
    pub fn plan_names(&self) -> Vec<Arc<str>> {
        self.plans.iter().map(|p| p.name.clone()).collect()
    }

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
        self.table_footer(&mut out);
        out
    }

    /// The lines under the table: where named upstreams' routes go, the
    /// capacity pools, and which routes other gateways may ask about.
    fn table_footer(&self, out: &mut String) {
        for pool in &self.capacity {
            let routes: Vec<&str> = pool
                .routes
                .iter()
                .filter_map(|&i| self.routes.get(i).map(|r| &*r.name))
                .collect();
            let weights: Vec<String> = pool
                .weights
                .iter()
                .map(|(p, w)| format!("{p} {w}"))
                .collect();
            let _ = writeln!(
                out,
                "capacity pool {} ({} at once, waiting up to {} s, weights: {}): {}",
                pool.name,
                pool.max,
                pool.max_wait.as_secs_f64(),
                if weights.is_empty() {
                    "none".into()
                } else {
                    weights.join(", ")
                },
                routes.join(", ")
            );
        }
        if let Some(l) = &self.ledger {
            let _ = writeln!(out, "{}", ledger::describe(l));
        }
        for (i, (name, up)) in self.upstreams.iter().enumerate() {
            let routes: Vec<&str> = self
                .routes
                .iter()
                .filter(|r| r.upstream == Some(i))
                .map(|r| &*r.name)
                .collect();
            let _ = writeln!(
                out,
                "upstream {name} ({}): {}",
                up.authority,
                routes.join(", ")
            );
        }
        if let Some(d) = &self.decision {
            let served: Vec<&str> = self
                .routes
                .iter()
                .filter(|r| d.serves(r))
                .map(|r| &*r.name)
                .collect();
            let at: Vec<String> = [("HTTP", d.listen), ("gRPC", d.grpc_listen)]
                .iter()
                .filter_map(|(what, addr)| addr.map(|a| format!("{what} {a}")))
                .collect();
            let _ = writeln!(
                out,
                "decided for other gateways ({}): {}",
                at.join(", "),
                served.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests;
