//! The rolling window's memory: admissions grouped per second.
//!
//! An admission in second `s` counts until `s + 1 + window`, so the log never
//! over-admits and under-admits by at most one second. It holds one entry per
//! second that saw admissions inside the window: at most
//! `min(requests, window seconds)` entries, however many requests arrive.

use std::collections::VecDeque;

use std::num::NonZeroU32;

use super::{CounterState, LimitKind, Verdict};
use crate::clock::{Nanos, SECOND};

/// `kind = "rolling"`: at most `requests` in any interval of `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rolling {
    /// Requests admitted per interval (at least 1).
    pub requests: NonZeroU32,
    /// The interval length in nanoseconds, a whole number of seconds.
    pub window: Nanos,
}

impl LimitKind for Rolling {
    const NAME: &'static str = "rolling";
    const REDIS_KIND: u8 = 2;

    fn new_state(&self) -> CounterState {
        CounterState::Rolling(Box::default())
    }

    fn fits(state: &CounterState) -> bool {
        matches!(state, CounterState::Rolling(_))
    }

    fn evaluate(&self, state: &mut CounterState, now: Nanos, units: u32) -> Verdict {
        let (requests, window) = (self.requests.get(), self.window);
        let CounterState::Rolling(log) = state else {
            let exit = RollingLog::exit_of(now, window);
            return Verdict::of_count(requests, 0, units, now, exit, exit);
        };
        log.prune(now, window);
        let used = log.total();
        let oldest_exit = log
            .oldest_exit(window)
            .unwrap_or_else(|| RollingLog::exit_of(now, window));
        let after = used.saturating_add(units);
        let retry_at = if after <= requests {
            now
        } else if units > requests {
            // Never fits: the window's length, for lack of a better answer.
            RollingLog::exit_of(now, window)
        } else {
            log.exit_when_count_drops_by(after - requests, window)
        };
        Verdict::of_count(requests, used, units, now, oldest_exit, retry_at)
    }

    fn record(&self, state: &mut CounterState, now: Nanos, units: u32) {
        if let CounterState::Rolling(log) = state {
            log.push(now, units);
        }
    }

    fn unrecord(&self, state: &mut CounterState, at: Nanos, units: u32) {
        if let CounterState::Rolling(log) = state {
            log.remove(at, units);
        }
    }

    fn charge(&self, state: &mut CounterState, at: Nanos, units: u32) {
        if let CounterState::Rolling(log) = state {
            log.add_at(at, units);
        }
    }

    fn expires_at(&self, state: &CounterState) -> Nanos {
        match state {
            CounterState::Rolling(log) => log.newest_exit(self.window).unwrap_or(0),
            _ => 0,
        }
    }

    fn shown_limit(&self) -> u32 {
        self.requests.get()
    }

    fn window_secs(&self, _now: Nanos) -> u64 {
        self.window / SECOND
    }

    fn summary(&self, name: &str, window_text: &str) -> String {
        format!("{name} {}/rolling {window_text}", self.requests)
    }

    /// `(requests, window seconds)`.
    fn redis_args(&self) -> (u64, u64) {
        (u64::from(self.requests.get()), self.window / SECOND)
    }
}

/// Admission counts per whole second, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RollingLog {
    seconds: VecDeque<(u64, u32)>,
    total: u32,
}

impl RollingLog {
    /// When an admission made at `at` stops counting.
    pub fn exit_of(at: Nanos, window: Nanos) -> Nanos {
        (at / SECOND + 1) * SECOND + window
    }

    /// Admissions still inside the window (after [`prune`](Self::prune)).
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Drops the seconds whose admissions left the window by `now`.
    pub fn prune(&mut self, now: Nanos, window: Nanos) {
        while let Some(&(sec, count)) = self.seconds.front() {
            if Self::exit_of(sec * SECOND, window) > now {
                break;
            }
            self.seconds.pop_front();
            self.total -= count;
        }
    }

    /// Records `units` admitted at `now` (the newest second held or later).
    pub fn push(&mut self, now: Nanos, units: u32) {
        if units == 0 {
            return;
        }
        let sec = now / SECOND;
        match self.seconds.back_mut() {
            Some((last, count)) if *last >= sec => *count = count.saturating_add(units),
            _ => self.seconds.push_back((sec, units)),
        }
        self.total = self.total.saturating_add(units);
    }

    /// Adds `units` to the second of `at`, if that second is still held
    /// (a settled cost above its estimate).
    pub fn add_at(&mut self, at: Nanos, units: u32) {
        let sec = at / SECOND;
        if let Some(i) = self.seconds.iter().rposition(|&(s, _)| s == sec) {
            self.seconds[i].1 = self.seconds[i].1.saturating_add(units);
            self.total = self.total.saturating_add(units);
        }
    }

    /// Takes back up to `units` recorded at `at`, if that second is still held.
    pub fn remove(&mut self, at: Nanos, units: u32) {
        let sec = at / SECOND;
        if let Some(i) = self.seconds.iter().rposition(|&(s, _)| s == sec) {
            let taken = units.min(self.seconds[i].1);
            self.seconds[i].1 -= taken;
            self.total -= taken;
            if self.seconds[i].1 == 0 {
                self.seconds.remove(i);
            }
        }
    }

    /// When the oldest admission leaves the window.
    pub fn oldest_exit(&self, window: Nanos) -> Option<Nanos> {
        self.seconds
            .front()
            .map(|&(sec, _)| Self::exit_of(sec * SECOND, window))
    }

    /// When the newest admission leaves the window.
    pub fn newest_exit(&self, window: Nanos) -> Option<Nanos> {
        self.seconds
            .back()
            .map(|&(sec, _)| Self::exit_of(sec * SECOND, window))
    }

    /// When at least `n` admissions will have left the window.
    pub fn exit_when_count_drops_by(&self, n: u32, window: Nanos) -> Nanos {
        let mut left = 0u32;
        let mut last = 0;
        for &(sec, count) in &self.seconds {
            left += count;
            last = Self::exit_of(sec * SECOND, window);
            if left >= n {
                break;
            }
        }
        last
    }

    /// Number of per-second entries held (bounded memory check).
    pub fn entries(&self) -> usize {
        self.seconds.len()
    }

    /// The entries, oldest first, as `(unix second, admissions)`.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.seconds.iter().copied()
    }

    /// Rebuilds a log from `(unix second, admissions)` pairs, oldest first.
    pub fn from_entries(entries: impl IntoIterator<Item = (u64, u32)>) -> Self {
        let mut log = Self::default();
        for (sec, count) in entries {
            log.seconds.push_back((sec, count));
            log.total += count;
        }
        log
    }
}
