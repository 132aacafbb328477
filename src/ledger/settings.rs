//! `[ledger]` as the config compiles it, and what the ledger knows of
//! each limit (its name and its `alerts`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};

pub use crate::limits::credits::{Alert, Level};
use crate::limits::Rule;

/// `[ledger] durable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// A charge's event is on disk before the request is forwarded.
    Sync,
    /// Events are written at most a second later.
    Interval,
}

/// `[ledger]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSettings {
    /// The ledger's database file.
    pub path: PathBuf,
    /// When events reach the disk.
    pub durable: Durable,
    /// Delivered events older than this may be dropped.
    pub retain: Duration,
    /// Where events are sent.
    pub sinks: Vec<SinkSettings>,
}

/// One `[[ledger.sinks]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSettings {
    /// The name metrics and the dashboard show (`name`, or the kind and
    /// its position: `http`, `file`, `http-2`).
    pub name: Arc<str>,
    /// Where to.
    pub kind: SinkKind,
}

/// A sink's kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    /// CloudEvents batches POSTed to `url`.
    Http {
        /// `http://` or `https://host:port/path`.
        url: Uri,
        /// https: trust only the certificates in this PEM file (default:
        /// Mozilla's roots, compiled in).
        ca: Option<PathBuf>,
        /// At most this many events a request.
        batch: usize,
        /// Extra headers (values read from the environment at start).
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// One JSON event per line, appended to `path`.
    File {
        /// The file.
        path: PathBuf,
    },
}

/// What the ledger knows of one counter: its limit's name and rule, and
/// its alerts.
#[derive(Debug, Clone)]
pub struct LimitInfo {
    /// The limit's name (`limit` in events).
    pub name: Arc<str>,
    /// Its rule (a rebuild makes its state).
    pub rule: Rule,
    /// `alerts`, credits only.
    pub alerts: Arc<[Alert]>,
}
