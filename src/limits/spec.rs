//! A validated limit of a plan: its rule and everything around it that the
//! config says (who is counted, its extra headers, its queue). Built by
//! `config`, read by the stores, the pipeline and the renderer.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use super::Rule;
use crate::clock::Nanos;

/// Which subject a limit counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    /// Each API key its own counter.
    Key,
    /// Keys of one account share the counter.
    Account,
}

/// One validated limit of a plan.
#[derive(Debug, Clone)]
pub struct LimitSpec {
    /// Shown in `X-RateLimit-Type`.
    pub name: Arc<str>,
    /// The maths and numbers.
    pub rule: Rule,
    /// Who is counted.
    pub per: Per,
    /// Window as written (`30m`, `month`), or the rate for buckets (`10/s`).
    pub window_text: Arc<str>,
    /// Extra `{headers}-Limit/-Remaining/-Reset` trio.
    pub headers: Option<HeaderTrio>,
    /// Routes as written, for the `check` table.
    pub routes_text: String,
    /// Whether each route has its own counter.
    pub per_route: bool,
    /// Concurrency limits only: wait for a slot instead of refusing at once.
    pub queue: Option<QueueSpec>,
    /// Whether a request counts its cost rather than 1 (`count = "cost"`,
    /// and every credits balance).
    pub counts_cost: bool,
    /// `shadow = true`: counted and reported as usual, never refusing.
    pub shadow: bool,
    /// `name` as a header value (`X-RateLimit-Type`), made once; `None` if
    /// the name cannot be one.
    pub name_value: Option<http::HeaderValue>,
    /// The limit shown in headers ([`Rule::shown_limit`]) as a header value, made once.
    pub limit_value: http::HeaderValue,
    /// Credits balances: `alerts`, the thresholds the ledger writes a
    /// `credits.low` event at.
    pub alerts: std::sync::Arc<[super::credits::Alert]>,
}

impl LimitSpec {
    /// The window in seconds (for `RateLimit-Policy`'s `w`): a bucket's is the
    /// time to refill a full burst.
    pub fn window_secs(&self, now: Nanos) -> u64 {
        self.rule.window_secs(now)
    }

    /// One line for `turnstile check`.
    pub fn summary(&self) -> String {
        let queue = if self.queue.is_some() { " +queue" } else { "" };
        let shadow = if self.shadow { " (shadow)" } else { "" };
        let cost = if self.counts_cost && self.rule.is_quota() {
            " (cost)"
        } else {
            ""
        };
        let per = match self.per {
            Per::Account => " per account",
            Per::Key => "",
        };
        let per_route = if self.per_route { " per route" } else { "" };
        format!(
            "{}{cost}{per}{per_route}{queue}{shadow}",
            self.rule.summary(&self.name, &self.window_text)
        )
    }
}

/// A concurrency limit's waiting queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSpec {
    /// Longest wait for a slot before the request is refused.
    pub max_wait: Duration,
    /// Most requests waiting at once; a full queue refuses at once.
    pub max_len: usize,
}

/// Names of a `-Limit/-Remaining/-Reset` header trio.
#[derive(Debug, Clone)]
pub struct HeaderTrio {
    /// `{prefix}-Limit`.
    pub limit: HeaderName,
    /// `{prefix}-Remaining`.
    pub remaining: HeaderName,
    /// `{prefix}-Reset`.
    pub reset: HeaderName,
}

impl HeaderTrio {
    /// The trio for `prefix`; fails if the prefix is not a valid header name.
    pub fn new(prefix: &str) -> Result<Self, String> {
        let name = |suffix: &str| {
            HeaderName::from_bytes(format!("{prefix}-{suffix}").as_bytes())
                .map_err(|_| format!("invalid header prefix {prefix:?}"))
        };
        Ok(Self {
            limit: name("Limit")?,
            remaining: name("Remaining")?,
            reset: name("Reset")?,
        })
    }
}
