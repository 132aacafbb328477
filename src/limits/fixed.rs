//! `kind = "fixed"`: at most `requests` per window aligned to the Unix epoch
//! (`"1d"` resets at 00:00 UTC) or per calendar month.

use std::num::NonZeroU32;

use super::{CounterState, LimitKind, Verdict, Window};
use crate::clock::{Nanos, SECOND};

impl Fixed {
    /// The count of the window containing `at`, while it is the one held.
    fn count_of<'a>(&self, state: &'a mut CounterState, at: Nanos) -> Option<&'a mut u32> {
        match state {
            CounterState::Fixed {
                window_start,
                count,
            } if *window_start == self.window.bounds(at).0 => Some(count),
            _ => None,
        }
    }
}

/// A fixed window's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    /// Requests admitted per window (at least 1).
    pub requests: NonZeroU32,
    /// The window.
    pub window: Window,
}

impl LimitKind for Fixed {
    const NAME: &'static str = "fixed";
    const REDIS_KIND: u8 = 1;

    fn new_state(&self) -> CounterState {
        CounterState::Fixed {
            window_start: 0,
            count: 0,
        }
    }

    fn fits(state: &CounterState) -> bool {
        matches!(state, CounterState::Fixed { .. })
    }

    fn evaluate(&self, state: &mut CounterState, now: Nanos, units: u32) -> Verdict {
        let (start, end) = self.window.bounds(now);
        let used = match *state {
            CounterState::Fixed {
                window_start,
                count,
            } if window_start == start => count,
            _ => 0,
        };
        Verdict::of_count(self.requests.get(), used, units, now, end, end)
    }

    fn record(&self, state: &mut CounterState, now: Nanos, units: u32) {
        let CounterState::Fixed {
            window_start,
            count,
        } = state
        else {
            return;
        };
        let (start, _) = self.window.bounds(now);
        if *window_start != start {
            *window_start = start;
            *count = 0;
        }
        *count = count.saturating_add(units);
    }

    fn unrecord(&self, state: &mut CounterState, at: Nanos, units: u32) {
        if let Some(count) = self.count_of(state, at) {
            *count = count.saturating_sub(units);
        }
    }

    fn charge(&self, state: &mut CounterState, at: Nanos, units: u32) {
        if let Some(count) = self.count_of(state, at) {
            *count = count.saturating_add(units);
        }
    }

    fn expires_at(&self, state: &CounterState) -> Nanos {
        match *state {
            CounterState::Fixed { window_start, .. } => self.window.bounds(window_start).1,
            _ => 0,
        }
    }

    fn shown_limit(&self) -> u32 {
        self.requests.get()
    }

    fn window_secs(&self, now: Nanos) -> u64 {
        self.window.len_secs(now)
    }

    fn summary(&self, name: &str, window_text: &str) -> String {
        format!("{name} {}/{window_text}", self.requests)
    }

    /// `(requests, window seconds)`; 0 seconds: the calendar month.
    fn redis_args(&self) -> (u64, u64) {
        let secs = match self.window {
            Window::Span(len) => len / SECOND,
            Window::Month => 0,
        };
        (u64::from(self.requests.get()), secs)
    }
}
