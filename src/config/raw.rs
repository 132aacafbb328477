//! The config file as written: serde structs that refuse unknown keys and keep
//! the source position of every value that a later check may complain about.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::units::RawSize;

/// A spanned table of response templates by refusal name.
pub type RawResponses = Spanned<BTreeMap<String, Spanned<RawResponse>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub upstream: RawUpstream,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub headers: RawHeaders,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub plans: BTreeMap<String, Spanned<RawPlan>>,
    pub responses: Option<RawResponses>,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub refusals_per_second: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Spanned<String>>,
    pub token: Option<String>,
    pub token_file: Option<Spanned<String>>,
    pub token_env: Option<Spanned<String>>,
    pub insecure: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<String>>,
    pub unmatched: Option<RawUnmatched>,
    pub max_body: Option<Spanned<RawSize>>,
    pub header_timeout: Option<Spanned<String>>,
    pub trust_forwarded: Option<bool>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub mcp_max_body: Option<Spanned<RawSize>>,
    pub case_sensitive_paths: Option<bool>,
    pub idle_timeout: Option<Spanned<String>>,
    pub body_timeout: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<u32>>,
    pub max_buffered: Option<Spanned<RawSize>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawUnmatched {
    Forward,
    Reject,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Spanned<String>,
    pub timeout: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub preserve_host: Option<bool>,
    pub account_header: Option<Spanned<String>>,
    pub plan_header: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub sources: Option<Vec<Spanned<String>>>,
    pub prefix: Option<Spanned<String>>,
    pub keys_file: Option<Spanned<String>>,
    pub unknown_key: Option<RawUnknownKey>,
    pub default_plan: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawUnknownKey {
    Reject,
    Default,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaders {
    pub prefix: Option<Spanned<String>>,
    pub reset: Option<RawReset>,
    pub on_success: Option<bool>,
    pub ietf: Option<bool>,
    pub primary: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawReset {
    Unix,
    Seconds,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<Spanned<RawBackend>>,
    pub snapshot: Option<Spanned<String>>,
    pub snapshot_interval: Option<Spanned<String>>,
    pub url: Option<Spanned<String>>,
    pub cluster: Option<bool>,
    pub prefix: Option<String>,
    pub timeout: Option<Spanned<String>>,
    pub on_error: Option<RawOnError>,
    pub lease: Option<Spanned<String>>,
    pub max_counters: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawBackend {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawOnError {
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Spanned<String>,
    pub method: Option<Spanned<String>>,
    pub path: Spanned<String>,
    pub host: Option<Spanned<String>>,
    pub max_body: Option<Spanned<RawSize>>,
    pub timeout: Option<Spanned<String>>,
    pub auth: Option<bool>,
    pub responses: Option<RawResponses>,
    pub max_body_by_type: Option<BTreeMap<String, Spanned<RawSize>>>,
    pub mcp_tool: Option<Spanned<String>>,
    pub format: Option<RawFormat>,
    pub plans: Option<Spanned<Vec<String>>>,
    pub arg_limits: Option<Vec<Spanned<RawArgLimit>>>,
    pub job: Option<Spanned<RawJob>>,
    pub job_status: Option<Spanned<RawJobStatus>>,
    pub job_cancel: Option<Spanned<RawJob>>,
}

/// `job = { id = "..." }` and `job_cancel = { id = "..." }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    pub id: Spanned<String>,
}

/// `job_status = { id, state, done }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobStatus {
    pub id: Spanned<String>,
    pub state: Spanned<String>,
    pub done: Spanned<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawFormat {
    Json,
    Mcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawArgLimit {
    pub pointers: Vec<String>,
    pub min_chars: Option<u64>,
    pub max_chars: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResponse {
    pub status: Option<Spanned<u16>>,
    pub content_type: Option<Spanned<String>>,
    pub body: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    #[serde(default)]
    pub limits: Vec<Spanned<RawLimit>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawKind {
    Fixed,
    Rolling,
    Bucket,
    Concurrency,
    Jobs,
}

impl RawKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RawKind::Fixed => "fixed",
            RawKind::Rolling => "rolling",
            RawKind::Bucket => "bucket",
            RawKind::Concurrency => "concurrency",
            RawKind::Jobs => "jobs",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawPer {
    Key,
    Account,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawRouteSet {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    pub name: Spanned<String>,
    pub kind: Option<RawKind>,
    pub routes: Option<Spanned<RawRouteSet>>,
    pub per_route: Option<bool>,
    pub per: Option<RawPer>,
    pub requests: Option<Spanned<i64>>,
    pub window: Option<Spanned<String>>,
    pub rate: Option<Spanned<String>>,
    pub burst: Option<Spanned<i64>>,
    pub max: Option<Spanned<i64>>,
    pub retry_after: Option<Spanned<String>>,
    pub queue: Option<Spanned<RawQueue>>,
    pub headers: Option<Spanned<String>>,
    pub max_duration: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub max_wait: Spanned<String>,
    pub max_len: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeysFile {
    #[serde(default)]
    pub keys: Vec<Spanned<RawKey>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub key: Option<Spanned<String>>,
    pub sha256: Option<Spanned<String>>,
    pub account: Option<String>,
    pub plan: Option<Spanned<String>>,
    pub revoked: Option<bool>,
}
