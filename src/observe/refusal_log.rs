//! Refusal log lines, rate limited: a flood of refused requests must not
//! become a flood of log lines. At most `[log] refusals_per_second` lines a
//! second are written; the rest are counted by reason and summed up in one
//! line a second ([`RefusalLog::flush`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::clock::{Nanos, SECOND};

/// Decides which refusals are logged, and counts the others.
#[derive(Debug)]
pub struct RefusalLog {
    per_second: AtomicU32,
    second: AtomicU64,
    written: AtomicU32,
    suppressed: Mutex<BTreeMap<&'static str, u64>>,
}

impl RefusalLog {
    /// At most `per_second` lines a second.
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second: AtomicU32::new(per_second),
            second: AtomicU64::new(0),
            written: AtomicU32::new(0),
            suppressed: Mutex::new(BTreeMap::new()),
        }
    }

    /// Changes the rate (reload).
    pub fn set_rate(&self, per_second: u32) {
        self.per_second.store(per_second, Ordering::Relaxed);
    }

    /// Whether a refusal for `reason` at `now` may be logged; when not, it
    /// is counted for the next summary.
    pub fn admit(&self, reason: &'static str, now: Nanos) -> bool {
        let second = now / SECOND;
        let current = self.second.load(Ordering::Relaxed);
        if second != current
            && self
                .second
                .compare_exchange(current, second, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.written.store(0, Ordering::Relaxed);
        }
        if self.written.fetch_add(1, Ordering::Relaxed) < self.per_second.load(Ordering::Relaxed) {
            return true;
        }
        let mut suppressed = self
            .suppressed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *suppressed.entry(reason).or_default() += 1;
        false
    }

    /// Takes the counts of suppressed lines since the last call, by reason.
    pub fn take_suppressed(&self) -> BTreeMap<&'static str, u64> {
        std::mem::take(
            &mut *self
                .suppressed
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Writes one summary line if anything was suppressed since the last call.
    pub fn flush(&self) {
        let suppressed = self.take_suppressed();
        if suppressed.is_empty() {
            return;
        }
        let total: u64 = suppressed.values().sum();
        let by_reason = suppressed
            .iter()
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::warn!(
            suppressed = total,
            by_reason = %by_reason,
            "refusal log lines suppressed (rate limited by [log] refusals_per_second)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_rate_each_second_and_the_rest_counted_by_reason() {
        let log = RefusalLog::new(3);
        let t = 1_000 * SECOND;
        let admitted = (0..10)
            .filter(|i| {
                log.admit(
                    if i % 2 == 0 {
                        "rate_limited"
                    } else {
                        "unauthorized"
                    },
                    t,
                )
            })
            .count();
        assert_eq!(admitted, 3);
        let s = log.take_suppressed();
        assert_eq!(s.get("rate_limited"), Some(&3));
        assert_eq!(s.get("unauthorized"), Some(&4));
        assert!(log.take_suppressed().is_empty());
        // A new second, a new allowance.
        assert!(log.admit("rate_limited", t + SECOND));
    }
}
