//! Staying under `[store] max_counters`: idle counters swept, the least
//! recently used evicted (keys-file callers' last), room checked before a
//! new caller's counters are made.

use std::sync::atomic::Ordering;

use crate::clock::Nanos;
use crate::limits::CounterState;
use crate::store::{LimitCheck, Subject};

use super::journal::Noted;
use super::{live_waiters, lock, SubjectCounters};

use super::{Inner, MemoryStore};

impl Inner {
    /// Past `max_counters`, drops whole subjects until a tenth of the cap is
    /// free again: keys that are not in the keys file first, and among those
    /// the ones whose windows end soonest. Subjects holding concurrency slots
    /// or waiters are kept. Must not be called with a subject locked.
    pub(super) fn enforce_cap(&self) {
        self.evict_over(self.max_counters.load(Ordering::Relaxed));
    }

    /// Past `max` live counters, evicts as [`Inner::enforce_cap`] says.
    pub(super) fn evict_over(&self, max: usize) {
        if self.live.load(Ordering::Relaxed) <= max || self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        let target = max - max / 10;
        let mut candidates: Vec<(bool, Nanos, Subject)> = Vec::new();
        for entry in self.map.iter() {
            let g = lock(entry.value());
            let busy = g.list.iter().any(|c| c.state.holds()) || g.any_waiting();
            if !busy {
                let ends = g.list.iter().map(|c| c.expires_at).max().unwrap_or(0);
                candidates.push((g.pinned, ends, entry.key().clone()));
            }
        }
        candidates.sort_unstable_by_key(|c| (c.0, c.1));
        let mut dropped = 0;
        for (_, _, subject) in candidates {
            if self.live.load(Ordering::Relaxed) <= target {
                break;
            }
            self.map.remove_if(&subject, |_, handle| {
                let mut g = lock(handle);
                let busy = g.list.iter().any(|c| c.state.holds());
                if busy {
                    return false;
                }
                g.evicted = true;
                let n = g.list.len();
                g.list.clear();
                self.live.fetch_sub(n, Ordering::Relaxed);
                dropped += n;
                true
            });
        }
        self.evicted.fetch_add(dropped as u64, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                max_counters = max,
                "counter memory full: evicted the counters closest to expiring ([store] max_counters)"
            );
        }
        self.evicting.store(false, Ordering::Release);
    }

    /// Whether the counters of `checks` may be kept: always for subjects
    /// already counted; for a new one, only while counter memory is under
    /// `max_counters` once everything that can be evicted was. (Counters
    /// that hold something — jobs, spent balances, slots — are never
    /// evicted: dropping one would hand its slot or its credits out again.)
    pub(super) fn room_for(&self, checks: &[LimitCheck<'_>]) -> bool {
        let max = self.max_counters.load(Ordering::Relaxed);
        if self.live.load(Ordering::Relaxed) < max {
            return true;
        }
        if checks.iter().all(|c| self.map.contains_key(&c.subject)) {
            return true;
        }
        self.evict_over(max.saturating_sub(1));
        self.live.load(Ordering::Relaxed) < max
    }
}

impl MemoryStore {
    /// Sets `[store] max_counters`: past it, counters are evicted.
    pub fn set_max_counters(&self, max: usize) {
        self.inner.max_counters.store(max.max(1), Ordering::Relaxed);
        self.inner.enforce_cap();
    }

    /// SubjectCounters evicted to stay under `max_counters`, since start.
    pub fn evicted_counters(&self) -> u64 {
        self.inner.evicted.load(Ordering::Relaxed)
    }

    /// Keeps only counters whose id `keep` accepts (after a reload removed
    /// limits); counters with slots in use or waiters stay until released.
    pub fn retain_counters(&self, keep: impl Fn(u64) -> bool) -> usize {
        let mut dropped = 0;
        for entry in self.inner.map.iter() {
            let mut g = lock(entry.value());
            let before = g.list.len();
            let SubjectCounters { list, queues, .. } = &mut *g;
            list.retain_mut(|c| {
                keep(c.id) || c.expires_at == Nanos::MAX || live_waiters(queues, c.id) > 0
            });
            dropped += before - g.list.len();
            g.tidy_queues();
        }
        self.inner.live.fetch_sub(dropped, Ordering::Relaxed);
        dropped
    }

    /// Drops every counter whose windows have all passed by now, and subjects
    /// left without counters. Returns how many counters were dropped.
    pub fn evict_expired(&self) -> usize {
        let now = self.inner.clock.now();
        let mut dropped = 0;
        let mut jobs_expired = 0;
        let journal = self.inner.journal();
        self.inner.map.retain(|subject, handle| {
            let mut g = lock(handle);
            let before = g.list.len();
            let SubjectCounters { list, queues, .. } = &mut *g;
            list.retain_mut(|c| {
                let keep = c.expires_at > now || live_waiters(queues, c.id) > 0;
                if let (false, CounterState::Jobs(j)) = (keep, &c.state) {
                    jobs_expired += j.jobs.len() as u64;
                    if let Some(journal) = journal {
                        let noted = Noted {
                            subject,
                            counter: c.id,
                            grant: 0,
                            at: now,
                            origin: None,
                        };
                        super::journal::expired(journal, &noted, &j.jobs);
                    }
                }
                keep
            });
            dropped += before - g.list.len();
            g.tidy_queues();
            if g.list.is_empty() {
                g.evicted = true;
                false
            } else {
                true
            }
        });
        self.inner.live.fetch_sub(dropped, Ordering::Relaxed);
        self.inner
            .jobs_expired
            .fetch_add(jobs_expired, Ordering::Relaxed);
        // Give the table's memory back once most of it is idle.
        if self.inner.map.capacity() > 4 * self.inner.map.len().max(1024) {
            self.inner.map.shrink_to_fit();
        }
        dropped
    }
}
