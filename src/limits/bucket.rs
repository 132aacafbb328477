//! `kind = "bucket"`: a token bucket as GCRA: one request every `interval`,
//! at most `burst` in a row.

use std::num::NonZeroU32;

use super::{CounterState, LimitKind, Verdict};
use crate::clock::{Nanos, SECOND};

/// A bucket's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Bucket capacity in requests (at least 1).
    pub burst: NonZeroU32,
    /// Time to earn one token, in nanoseconds (at least 1).
    pub interval: Nanos,
}

impl LimitKind for Bucket {
    const NAME: &'static str = "bucket";
    const REDIS_KIND: u8 = 3;

    fn new_state(&self) -> CounterState {
        CounterState::Bucket { tat: 0 }
    }

    fn fits(state: &CounterState) -> bool {
        matches!(state, CounterState::Bucket { .. })
    }

    fn evaluate(&self, state: &mut CounterState, now: Nanos, units: u32) -> Verdict {
        let (burst, interval) = (self.burst.get(), self.interval);
        let tat = match *state {
            CounterState::Bucket { tat } => tat,
            _ => 0,
        };
        let tolerance = interval * burst as Nanos;
        let tat = tat.max(now);
        let next_tat = tat + interval * Nanos::from(units);
        if next_tat <= now + tolerance {
            let remaining = ((now + tolerance - next_tat) / interval) as u32;
            Verdict {
                admitted: true,
                limit: burst,
                used: burst - remaining,
                remaining,
                reset_at: next_tat,
                retry_at: now,
            }
        } else {
            Verdict {
                admitted: false,
                limit: burst,
                used: burst,
                remaining: 0,
                reset_at: tat,
                retry_at: next_tat.saturating_sub(tolerance),
            }
        }
    }

    fn record(&self, state: &mut CounterState, now: Nanos, units: u32) {
        if let CounterState::Bucket { tat } = state {
            *tat = (*tat).max(now) + self.interval * Nanos::from(units);
        }
    }

    fn unrecord(&self, state: &mut CounterState, _at: Nanos, units: u32) {
        if let CounterState::Bucket { tat } = state {
            *tat = tat.saturating_sub(self.interval * Nanos::from(units));
        }
    }

    fn charge(&self, state: &mut CounterState, _at: Nanos, units: u32) {
        if let CounterState::Bucket { tat } = state {
            *tat = tat.saturating_add(self.interval * Nanos::from(units));
        }
    }

    fn expires_at(&self, state: &CounterState) -> Nanos {
        match *state {
            CounterState::Bucket { tat } => tat,
            _ => 0,
        }
    }

    fn shown_limit(&self) -> u32 {
        self.burst.get()
    }

    /// The time to refill a full bucket.
    fn window_secs(&self, _now: Nanos) -> u64 {
        (self.interval * u64::from(self.burst.get())).div_ceil(SECOND)
    }

    fn summary(&self, name: &str, window_text: &str) -> String {
        format!("{name} bucket {window_text} burst {}", self.burst)
    }

    /// `(burst, interval in microseconds)`.
    fn redis_args(&self) -> (u64, u64) {
        (u64::from(self.burst.get()), (self.interval / 1_000).max(1))
    }
}
