//! What the stores tell the ledger: every change of a credits balance and
//! every job start and end, written while the subject's counters are
//! locked, so the order of the entries is the order of the changes and
//! each entry's balance is the balance that change left.
//!
//! The store only reports; the ledger (a layer above) names, numbers,
//! writes and exports the entries. Without a ledger nothing is built.

use std::sync::Arc;

use super::Subject;
use crate::clock::Nanos;

/// The exchange a change belongs to, for the ledger's events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The exchange's id (`X-Request-Id`).
    pub request_id: Box<str>,
    /// The route's name.
    pub route: Arc<str>,
    /// The caller's key fingerprint.
    pub key_fp: Box<str>,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// The upstream said it is done (a status answer in a done state, or
    /// the upstream's own `POST /v1/jobs/end`).
    Done,
    /// A cancel answer.
    Cancelled,
    /// `max_duration` passed before anyone saw it end.
    Expired,
    /// The admin API (`DELETE /v1/jobs`).
    Admin,
    /// A job whose submission answer could not be read at its id: it held
    /// its slot until `max_duration`.
    Unreadable,
}

impl How {
    /// As events write it.
    pub fn as_str(self) -> &'static str {
        match self {
            How::Done => "done",
            How::Cancelled => "cancelled",
            How::Expired => "expired",
            How::Admin => "admin",
            How::Unreadable => "unreadable",
        }
    }
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A request's cost taken at admission.
    Charged,
    /// The difference when the answer's figure replaced the estimate.
    Settled,
    /// A charge given back (the request was refused after all, or failed).
    Refunded,
    /// Added by the admin API.
    Added,
    /// Set by the admin API.
    Set,
    /// Back to the grant at a refill boundary.
    Refilled,
    /// A job started (its submission's answer named it).
    JobStarted,
    /// A job ended.
    JobEnded(How),
    /// A quota refused a request for this subject; it admits again at
    /// `until` (the ledger keeps the first of each window).
    QuotaExhausted {
        /// When the limit admits again.
        until: Nanos,
    },
}

/// One change, as the store saw it under the subject's lock.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// What changed.
    pub change: Change,
    /// Whose counter.
    pub subject: &'a Subject,
    /// Which counter (its config id: the ledger knows its limit).
    pub counter: u64,
    /// The grant of the caller's plan, for a credits balance (plans may
    /// share one balance with different grants; 0 otherwise).
    pub grant: u32,
    /// Signed change of the balance (0 for jobs and quotas).
    pub amount: i64,
    /// The balance after it (credits only).
    pub balance: Option<i64>,
    /// The job (job events).
    pub job_id: Option<&'a str>,
    /// When.
    pub at: Nanos,
    /// The exchange that made it (none: the admin API, an expiry).
    pub origin: Option<&'a Origin>,
}

/// Where the stores write their entries (the ledger).
pub trait Journal: Send + Sync + 'static {
    /// Takes one entry, in the order the changes happen (called while the
    /// subject is locked: must not block). Returns the entry's position,
    /// which durability waits use; 0 when nothing was kept.
    fn write(&self, entry: Entry<'_>) -> u64;

    /// The balances at which `counter`'s low-balance alerts fire for a
    /// plan granting `grant`, in the order of its `alerts` (Redis's
    /// scripts check them where the balance changes).
    fn alert_levels(&self, _counter: u64, _grant: u32) -> Vec<i64> {
        Vec::new()
    }

    /// What the ledger holds of each Redis counter it saw change, for
    /// rebuilding a Redis that lost turnstile's data (reads the disk).
    fn recorded(&self) -> Vec<Recorded> {
        Vec::new()
    }

    /// The position of the last event the ledger holds (0: none).
    fn last_position(&self) -> u64 {
        0
    }
}

/// One Redis counter as the ledger last saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Its Redis key.
    pub key: String,
    /// What it holds.
    pub state: RecordedState,
}

/// What a counter held, per the ledger.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordedState {
    /// A credits balance: the latest, the grant it was figured against,
    /// and the limit's refill (`redis_args`' b), at `at`.
    Balance {
        /// The balance.
        balance: i64,
        /// The grant of the plan that changed it last.
        grant: i64,
        /// The refill, as the scripts take it.
        refill: u64,
        /// When.
        at: Nanos,
    },
    /// Jobs started and not ended: (id, when it expires).
    Jobs(Vec<(String, Nanos)>),
}

/// An event the scripts appended to the ledger's Redis stream: its stream
/// id and fields (`lua/prelude.lua`, `note`).
#[derive(Debug, Clone, Default)]
pub struct Appended {
    /// The stream id's time (ms).
    pub ms: u64,
    /// The stream id's sequence within that millisecond.
    pub seq: u64,
    /// Field name to value.
    pub fields: Vec<(String, String)>,
}

impl Appended {
    /// The value of field `name` ("" when absent).
    pub fn field(&self, name: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// The ledger position of stream id `ms-seq`: sorted as the stream is (a
/// millisecond holds fewer than 65,536 events of one Redis).
pub fn stream_position(ms: u64, seq: u64) -> u64 {
    (ms << 16) | seq.min(0xffff)
}

/// The stream id of a ledger position (the inverse of [`stream_position`]).
pub fn stream_id(position: u64) -> (u64, u64) {
    (position >> 16, position & 0xffff)
}

/// A store's journal, when a ledger is configured.
pub(crate) type JournalSlot = std::sync::OnceLock<Arc<dyn Journal>>;
