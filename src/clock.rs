//! Time as the limiter sees it: nanoseconds since the Unix epoch, read from an
//! injectable [`Clock`] so window tests are exact and instant.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch (fits until the year 2554).
pub type Nanos = u64;

/// One second in [`Nanos`].
pub const SECOND: Nanos = 1_000_000_000;

/// A source of "now" for limiter decisions.
pub trait Clock: Send + Sync + 'static {
    /// The current time in nanoseconds since the Unix epoch.
    fn now(&self) -> Nanos;
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as Nanos)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to; clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A manual clock standing at `now`.
    pub fn new(now: Nanos) -> Self {
        Self(Arc::new(AtomicU64::new(now)))
    }

    /// A manual clock standing at `secs` whole seconds after the epoch.
    pub fn at_secs(secs: u64) -> Self {
        Self::new(secs * SECOND)
    }

    /// Jumps to `now`.
    pub fn set(&self, now: Nanos) {
        self.0.store(now, Ordering::SeqCst);
    }

    /// Moves forward by `by` nanoseconds.
    pub fn advance(&self, by: Nanos) {
        self.0.fetch_add(by, Ordering::SeqCst);
    }

    /// Moves forward by whole seconds.
    pub fn advance_secs(&self, secs: u64) {
        self.advance(secs * SECOND);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        self.0.load(Ordering::SeqCst)
    }
}

/// Whole seconds from `now` until `at`, rounded up (0 when `at` has passed).
pub fn secs_until_ceil(now: Nanos, at: Nanos) -> u64 {
    at.saturating_sub(now).div_ceil(SECOND)
}
