//! Counter storage behind one trait whose unit of work is "decide every limit
//! of this request": admit only if all admit, count only then, atomically.
//! The memory backend lives here; a networked backend makes the same
//! decision in one round trip.

mod memory;

use std::future::Future;
use std::sync::Arc;

pub use memory::MemoryStore;

use crate::clock::Nanos;
use crate::identity::KeyDigest;
use crate::limits::{Rule, Verdict};

/// Who a counter counts for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// One API key (by digest); also a key that is its own account.
    Key(KeyDigest),
    /// A named account from the keys file.
    Account(Arc<str>),
}

/// One limit to check for a request.
#[derive(Debug, Clone)]
pub struct LimitCheck<'a> {
    /// Whose counter.
    pub subject: Subject,
    /// Which counter of that subject (stable id from the config).
    pub counter: u64,
    /// The rule and its numbers.
    pub rule: &'a Rule,
}

/// The outcome of one request's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The time the decision was made at.
    pub now: Nanos,
    /// True if every limit admitted (and all were counted).
    pub admitted: bool,
    /// One verdict per check, in order.
    pub verdicts: Vec<Verdict>,
}

/// The store could not decide.
#[derive(Debug, Clone, thiserror::Error)]
#[error("counter store unavailable: {0}")]
pub struct StoreError(pub String);

/// Decides all limits of one request atomically.
pub trait Store: Send + Sync + 'static {
    /// Admits the request only if every check admits, and only then counts it
    /// against all of them; concurrent calls never over-admit.
    fn decide(
        &self,
        checks: &[LimitCheck<'_>],
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send;

    /// Takes back a request that [`decide`](Store::decide) admitted at `at`
    /// with the same checks but that was refused afterwards (it consumes no quota).
    fn refund(
        &self,
        checks: &[LimitCheck<'_>],
        at: Nanos,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
