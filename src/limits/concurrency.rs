//! `kind = "concurrency"`: at most `max` exchanges in flight. A slot is
//! taken at admission and given back when the exchange ends, however it
//! ends (the store's slot guard calls [`LimitKind::release`]).

use std::num::NonZeroU32;

use super::{CounterState, LimitKind, Verdict};
use crate::clock::Nanos;

/// A concurrency limit's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    /// Slots (at least 1).
    pub max: NonZeroU32,
    /// What a refusal's `Retry-After` says, in nanoseconds.
    pub retry_after: Nanos,
}

impl LimitKind for Concurrency {
    const NAME: &'static str = "concurrency";
    const REDIS_KIND: u8 = 4;
    const HOLDS_SLOT: bool = true;
    const QUOTA: bool = false;

    fn new_state(&self) -> CounterState {
        CounterState::Concurrency { in_flight: 0 }
    }

    fn fits(state: &CounterState) -> bool {
        matches!(state, CounterState::Concurrency { .. })
    }

    fn evaluate(&self, state: &mut CounterState, now: Nanos, _units: u32) -> Verdict {
        let in_flight = match *state {
            CounterState::Concurrency { in_flight } => in_flight,
            _ => 0,
        };
        let at = if in_flight < self.max.get() {
            now
        } else {
            now + self.retry_after
        };
        Verdict::of_count(self.max.get(), in_flight, 1, now, at, at)
    }

    fn record(&self, state: &mut CounterState, _now: Nanos, _units: u32) {
        if let CounterState::Concurrency { in_flight } = state {
            *in_flight = in_flight.saturating_add(1);
        }
    }

    fn release(&self, state: &mut CounterState) {
        if let CounterState::Concurrency { in_flight } = state {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Never while a slot is held.
    fn expires_at(&self, state: &CounterState) -> Nanos {
        match *state {
            CounterState::Concurrency { in_flight } if in_flight > 0 => Nanos::MAX,
            _ => 0,
        }
    }

    fn shown_limit(&self) -> u32 {
        self.max.get()
    }

    fn summary(&self, name: &str, _window_text: &str) -> String {
        format!("{name} {} at once", self.max)
    }

    /// `(max, retry_after in microseconds)`.
    fn redis_args(&self) -> (u64, u64) {
        (u64::from(self.max.get()), self.retry_after / 1_000)
    }
}
