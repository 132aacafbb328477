//! The config file as written: serde structs that refuse unknown keys and keep
//! the source position of every value that a later check may complain about.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::units::RawSize;

/// A spanned table of response templates by refusal name.
pub(crate) type RawResponses = Spanned<BTreeMap<String, Spanned<RawResponse>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) server: RawServer,
    pub(crate) upstream: RawUpstream,
    /// `[upstreams.NAME]`: more upstreams, chosen by a route's `upstream`.
    #[serde(default)]
    pub(crate) upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    pub(crate) identity: RawIdentity,
    #[serde(default)]
    pub(crate) headers: RawHeaders,
    #[serde(default)]
    pub(crate) store: RawStore,
    #[serde(default)]
    pub(crate) routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub(crate) plans: BTreeMap<String, Spanned<RawPlan>>,
    pub(crate) responses: Option<RawResponses>,
    pub(crate) admin: Option<RawAdmin>,
    #[serde(default)]
    pub(crate) log: RawLog,
    pub(crate) telemetry: Option<RawTelemetry>,
    pub(crate) decision: Option<Spanned<RawDecision>>,
    /// `[[capacity]]`: shared pools of slots.
    #[serde(default)]
    pub(crate) capacity: Vec<Spanned<RawCapacity>>,
    /// `[ledger]`: the record of every credit and job.
    pub(crate) ledger: Option<Spanned<RawLedger>>,
}

/// `[ledger]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLedger {
    pub(crate) path: Spanned<String>,
    pub(crate) durable: Option<Spanned<String>>,
    pub(crate) retain: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) sinks: Vec<Spanned<RawSink>>,
}

/// One `[[ledger.sinks]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSink {
    pub(crate) kind: Spanned<String>,
    pub(crate) name: Option<Spanned<String>>,
    pub(crate) url: Option<Spanned<String>>,
    pub(crate) batch: Option<Spanned<i64>>,
    pub(crate) headers: Option<BTreeMap<String, Spanned<String>>>,
    pub(crate) path: Option<Spanned<String>>,
    pub(crate) ca: Option<Spanned<String>>,
}

/// One `[[capacity]]` pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCapacity {
    pub(crate) name: Spanned<String>,
    pub(crate) max: Spanned<i64>,
    pub(crate) routes: Spanned<Vec<Spanned<String>>>,
    pub(crate) max_wait: Option<Spanned<String>>,
    pub(crate) max_queue: Option<Spanned<i64>>,
    pub(crate) weights: Option<BTreeMap<String, Spanned<i64>>>,
    pub(crate) reserve: Option<BTreeMap<String, Spanned<i64>>>,
    pub(crate) fair_per: Option<Spanned<String>>,
    pub(crate) retry_after: Option<Spanned<String>>,
    pub(crate) max_duration: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTelemetry {
    pub(crate) otlp_endpoint: Spanned<String>,
    pub(crate) sample_ratio: Option<Spanned<f64>>,
    pub(crate) service_name: Option<String>,
    pub(crate) export_interval: Option<Spanned<String>>,
    pub(crate) metrics: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub(crate) refusals_per_second: Option<u32>,
    pub(crate) access: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) listen: Option<Spanned<String>>,
    pub(crate) token: Option<String>,
    pub(crate) token_file: Option<Spanned<String>>,
    pub(crate) token_env: Option<Spanned<String>>,
    pub(crate) insecure: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub(crate) listen: Option<Spanned<String>>,
    pub(crate) usage_path: Option<Spanned<String>>,
    pub(crate) unmatched: Option<RawUnmatched>,
    pub(crate) max_body: Option<Spanned<RawSize>>,
    pub(crate) header_timeout: Option<Spanned<String>>,
    pub(crate) trust_forwarded: Option<bool>,
    pub(crate) shutdown_grace: Option<Spanned<String>>,
    pub(crate) mcp_max_body: Option<Spanned<RawSize>>,
    pub(crate) case_sensitive_paths: Option<bool>,
    pub(crate) idle_timeout: Option<Spanned<String>>,
    pub(crate) body_timeout: Option<Spanned<String>>,
    pub(crate) max_connections: Option<Spanned<u32>>,
    pub(crate) max_concurrent_streams: Option<Spanned<u32>>,
    pub(crate) max_buffered: Option<Spanned<RawSize>>,
    pub(crate) resolve_timeout: Option<Spanned<String>>,
    pub(crate) tls: Option<Spanned<RawTls>>,
}

/// `[server] tls = { cert = "cert.pem", key = "key.pem" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub(crate) cert: String,
    pub(crate) key: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawUnmatched {
    Forward,
    Reject,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub(crate) url: Spanned<String>,
    pub(crate) timeout: Option<Spanned<String>>,
    pub(crate) connect_timeout: Option<Spanned<String>>,
    pub(crate) preserve_host: Option<bool>,
    pub(crate) account_header: Option<Spanned<String>>,
    pub(crate) plan_header: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentity {
    pub(crate) sources: Option<Vec<Spanned<String>>>,
    pub(crate) prefix: Option<Spanned<String>>,
    pub(crate) keys_file: Option<Spanned<String>>,
    pub(crate) unknown_key: Option<RawUnknownKey>,
    pub(crate) default_plan: Option<Spanned<String>>,
    pub(crate) key_store: Option<Spanned<String>>,
    pub(crate) max_keys_per_account: Option<Spanned<u32>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawUnknownKey {
    Reject,
    Default,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHeaders {
    pub(crate) prefix: Option<Spanned<String>>,
    pub(crate) reset: Option<RawReset>,
    pub(crate) on_success: Option<bool>,
    pub(crate) ietf: Option<bool>,
    pub(crate) primary: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawReset {
    Unix,
    Seconds,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub(crate) backend: Option<Spanned<RawBackend>>,
    pub(crate) snapshot: Option<Spanned<String>>,
    pub(crate) snapshot_interval: Option<Spanned<String>>,
    pub(crate) url: Option<Spanned<String>>,
    pub(crate) cluster: Option<bool>,
    pub(crate) prefix: Option<String>,
    pub(crate) timeout: Option<Spanned<String>>,
    pub(crate) on_error: Option<RawOnError>,
    pub(crate) lease: Option<Spanned<String>>,
    pub(crate) max_counters: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawBackend {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawOnError {
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) name: Spanned<String>,
    pub(crate) method: Option<Spanned<String>>,
    pub(crate) path: Spanned<String>,
    pub(crate) host: Option<Spanned<String>>,
    pub(crate) max_body: Option<Spanned<RawSize>>,
    pub(crate) timeout: Option<Spanned<String>>,
    pub(crate) auth: Option<bool>,
    pub(crate) responses: Option<RawResponses>,
    pub(crate) max_body_by_type: Option<BTreeMap<String, Spanned<RawSize>>>,
    pub(crate) mcp_tool: Option<Spanned<String>>,
    pub(crate) format: Option<RawFormat>,
    pub(crate) plans: Option<Spanned<Vec<String>>>,
    pub(crate) arg_limits: Option<Vec<Spanned<RawArgLimit>>>,
    pub(crate) job: Option<Spanned<RawJob>>,
    pub(crate) job_status: Option<Spanned<RawJobStatus>>,
    pub(crate) job_cancel: Option<Spanned<RawJobCancel>>,
    /// A constant or `{ by, prices, default, times }` (read in `content.rs`).
    pub(crate) cost: Option<Spanned<toml::Value>>,
    pub(crate) settle: Option<Spanned<String>>,
    pub(crate) refund_on: Option<Spanned<Vec<Spanned<String>>>>,
    /// Value source → the values that satisfy it (a string or a list).
    pub(crate) when: Option<Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
    pub(crate) max_duration_by_type: Option<BTreeMap<String, Spanned<String>>>,
    pub(crate) url_args: Option<Vec<Spanned<RawUrlArg>>>,
    /// The name of an `[upstreams.NAME]` table (absent: `[upstream]`).
    pub(crate) upstream: Option<Spanned<String>>,
}

/// `url_args = [{ pointers = ["/params/arguments/sourceUrls"] }]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUrlArg {
    pub(crate) pointers: Vec<String>,
}

/// `job = { id = "..." }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJob {
    pub(crate) id: Spanned<String>,
}

/// `job_cancel = { id, state?, done? }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJobCancel {
    pub(crate) id: Spanned<String>,
    pub(crate) state: Option<Spanned<String>>,
    pub(crate) done: Option<Spanned<Vec<String>>>,
}

/// `job_status = { id, state, done }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJobStatus {
    pub(crate) id: Spanned<String>,
    pub(crate) state: Spanned<String>,
    pub(crate) done: Spanned<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawFormat {
    Json,
    Mcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawArgLimit {
    pub(crate) pointers: Vec<String>,
    pub(crate) min_chars: Option<u64>,
    pub(crate) max_chars: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResponse {
    pub(crate) status: Option<Spanned<u16>>,
    pub(crate) content_type: Option<Spanned<String>>,
    pub(crate) body: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlan {
    #[serde(default)]
    pub(crate) limits: Vec<Spanned<RawLimit>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawKind {
    Fixed,
    Rolling,
    Bucket,
    Concurrency,
    Jobs,
    Credits,
}

impl RawKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RawKind::Fixed => "fixed",
            RawKind::Rolling => "rolling",
            RawKind::Bucket => "bucket",
            RawKind::Concurrency => "concurrency",
            RawKind::Jobs => "jobs",
            RawKind::Credits => "credits",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawPer {
    Key,
    Account,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawRouteSet {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimit {
    pub(crate) name: Spanned<String>,
    pub(crate) kind: Option<RawKind>,
    pub(crate) routes: Option<Spanned<RawRouteSet>>,
    pub(crate) per_route: Option<bool>,
    pub(crate) per: Option<RawPer>,
    pub(crate) requests: Option<Spanned<i64>>,
    pub(crate) window: Option<Spanned<String>>,
    pub(crate) rate: Option<Spanned<String>>,
    pub(crate) burst: Option<Spanned<i64>>,
    pub(crate) max: Option<Spanned<i64>>,
    pub(crate) retry_after: Option<Spanned<String>>,
    pub(crate) queue: Option<Spanned<RawQueue>>,
    pub(crate) headers: Option<Spanned<String>>,
    pub(crate) max_duration: Option<Spanned<String>>,
    pub(crate) grant: Option<Spanned<i64>>,
    pub(crate) refill: Option<Spanned<String>>,
    pub(crate) count: Option<Spanned<RawCount>>,
    pub(crate) shadow: Option<Spanned<bool>>,
    pub(crate) alerts: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `count = "requests" | "cost"` on fixed, rolling and bucket limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawCount {
    Requests,
    Cost,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQueue {
    pub(crate) max_wait: Spanned<String>,
    pub(crate) max_len: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKeysFile {
    #[serde(default)]
    pub(crate) keys: Vec<Spanned<RawKey>>,
    #[serde(default)]
    pub(crate) accounts: Vec<Spanned<RawAccount>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccount {
    pub(crate) name: String,
    pub(crate) disabled: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKey {
    pub(crate) key: Option<Spanned<String>>,
    pub sha256: Option<Spanned<String>>,
    pub(crate) account: Option<String>,
    pub(crate) plan: Option<Spanned<String>>,
    pub(crate) revoked: Option<bool>,
    pub(crate) name: Option<String>,
    pub(crate) expires_at: Option<Spanned<String>>,
}

/// `[decision]`: turnstile deciding for another gateway.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDecision {
    pub(crate) listen: Option<Spanned<String>>,
    pub(crate) path_prefix: Option<Spanned<String>>,
    pub(crate) grpc_listen: Option<Spanned<String>>,
    pub(crate) routes: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(crate) envoy: RawEnvoy,
}

/// `[decision.envoy]`: how rate limit service descriptors name the key and route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEnvoy {
    pub(crate) domain: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) route: Option<String>,
}
