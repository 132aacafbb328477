//! In-process counters: a sharded map from subject to that subject's counters.
//!
//! A request locks the counters of its (at most two) subjects in a fixed order,
//! decides every limit, and counts only if all admit: atomic without a global
//! lock. Idle subjects are evicted by [`MemoryStore::evict_expired`] once
//! every window they hold has passed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;

use super::{Decision, LimitCheck, Store, StoreError, Subject};
use crate::clock::{Clock, Nanos};
use crate::limits::{CounterState, Rule};

#[derive(Debug)]
struct Counter {
    id: u64,
    state: CounterState,
    expires_at: Nanos,
}

#[derive(Debug, Default)]
struct Counters {
    /// Set when the sweeper removed this entry from the map: holders retry.
    evicted: bool,
    list: Vec<Counter>,
}

impl Counters {
    fn slot(&mut self, id: u64, rule: &Rule, live: &AtomicUsize) -> usize {
        if let Some(i) = self.list.iter().position(|c| c.id == id) {
            return i;
        }
        live.fetch_add(1, Ordering::Relaxed);
        self.list.push(Counter {
            id,
            state: rule.new_state(),
            expires_at: 0,
        });
        self.list.len() - 1
    }
}

type Handle = Arc<Mutex<Counters>>;

fn lock(h: &Handle) -> MutexGuard<'_, Counters> {
    // A panic while holding the lock cannot leave a counter half-written in a
    // way that matters more than losing the request: keep serving.
    h.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counters held in this process.
pub struct MemoryStore {
    map: DashMap<Subject, Handle>,
    clock: Arc<dyn Clock>,
    live: AtomicUsize,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("subjects", &self.map.len())
            .finish()
    }
}

impl MemoryStore {
    /// An empty store reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            map: DashMap::new(),
            clock,
            live: AtomicUsize::new(0),
        }
    }

    /// Number of counters held.
    pub fn live_counters(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Number of subjects with counters.
    pub fn subjects(&self) -> usize {
        self.map.len()
    }

    fn handle(&self, subject: &Subject) -> Handle {
        if let Some(h) = self.map.get(subject) {
            return h.clone();
        }
        self.map.entry(subject.clone()).or_default().clone()
    }

    /// Runs `f` with the counters of every subject of `checks` locked, in a
    /// fixed order (sorted subjects) so multi-subject requests cannot deadlock.
    /// `f` gets the locked counters and, per check, the index of its subject.
    fn with_locked<R>(
        &self,
        checks: &[LimitCheck<'_>],
        f: impl FnOnce(&mut [MutexGuard<'_, Counters>], &[usize]) -> R,
    ) -> R {
        let mut subjects: Vec<&Subject> = checks.iter().map(|c| &c.subject).collect();
        subjects.sort_unstable();
        subjects.dedup();
        let owner: Vec<usize> = checks
            .iter()
            .map(|c| subjects.iter().position(|s| **s == c.subject).unwrap_or(0))
            .collect();
        loop {
            let handles: Vec<Handle> = subjects.iter().map(|s| self.handle(s)).collect();
            let mut guards: Vec<MutexGuard<'_, Counters>> = handles.iter().map(lock).collect();
            if guards.iter().any(|g| g.evicted) {
                // The sweeper removed an entry between lookup and lock: look up again.
                continue;
            }
            return f(&mut guards, &owner);
        }
    }

    /// Decides at an explicit time (the [`Store`] impl uses the clock).
    pub fn decide_at(&self, checks: &[LimitCheck<'_>], now: Nanos) -> Decision {
        self.with_locked(checks, |guards, owner| {
            let mut slots = Vec::with_capacity(checks.len());
            let mut verdicts = Vec::with_capacity(checks.len());
            for (c, &g) in checks.iter().zip(owner) {
                let i = guards[g].slot(c.counter, c.rule, &self.live);
                verdicts.push(c.rule.evaluate(&mut guards[g].list[i].state, now));
                slots.push((g, i));
            }
            let admitted = verdicts.iter().all(|v| v.admitted);
            if !admitted {
                verdicts.iter_mut().for_each(|v| *v = v.uncounted());
            } else {
                for (c, &(g, i)) in checks.iter().zip(&slots) {
                    let counter = &mut guards[g].list[i];
                    c.rule.record(&mut counter.state, now);
                    counter.expires_at = c.rule.expires_at(&counter.state);
                }
            }
            Decision {
                now,
                admitted,
                verdicts,
            }
        })
    }

    /// Takes back one request admitted at `at` (see [`Store::refund`]).
    pub fn refund_at(&self, checks: &[LimitCheck<'_>], at: Nanos) {
        self.with_locked(checks, |guards, owner| {
            for (c, &g) in checks.iter().zip(owner) {
                if let Some(counter) = guards[g].list.iter_mut().find(|x| x.id == c.counter) {
                    c.rule.unrecord(&mut counter.state, at);
                }
            }
        });
    }

    /// Drops every counter whose windows have all passed by now, and subjects
    /// left without counters. Returns how many counters were dropped.
    pub fn evict_expired(&self) -> usize {
        let now = self.clock.now();
        let mut dropped = 0;
        self.map.retain(|_, handle| {
            let mut g = lock(handle);
            let before = g.list.len();
            g.list.retain(|c| c.expires_at > now);
            dropped += before - g.list.len();
            if g.list.is_empty() {
                g.evicted = true;
                false
            } else {
                true
            }
        });
        self.live.fetch_sub(dropped, Ordering::Relaxed);
        dropped
    }
}

impl Store for MemoryStore {
    async fn decide(&self, checks: &[LimitCheck<'_>]) -> Result<Decision, StoreError> {
        Ok(self.decide_at(checks, self.clock.now()))
    }

    async fn refund(&self, checks: &[LimitCheck<'_>], at: Nanos) -> Result<(), StoreError> {
        self.refund_at(checks, at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, SECOND};
    use crate::limits::Window;

    fn key(n: u8) -> Subject {
        Subject::Key([n; 32])
    }

    #[test]
    fn all_or_nothing_across_limits_and_subjects() {
        let clock = ManualClock::at_secs(1_000_020);
        let store = MemoryStore::new(Arc::new(clock.clone()));
        let minute = Rule::Fixed {
            requests: 3,
            window: Window::Span(60 * SECOND),
        };
        let daily = Rule::Fixed {
            requests: 4,
            window: Window::Span(86_400 * SECOND),
        };
        let checks = |who: Subject| {
            vec![
                LimitCheck {
                    subject: who.clone(),
                    counter: 1,
                    rule: &minute,
                },
                LimitCheck {
                    subject: Subject::Account("acme".into()),
                    counter: 2,
                    rule: &daily,
                },
            ]
        };
        let now = clock.now();
        for _ in 0..3 {
            assert!(store.decide_at(&checks(key(1)), now).admitted);
        }
        // Key 1's minute refuses: the account's daily must not be counted.
        let d = store.decide_at(&checks(key(1)), now);
        assert!(!d.admitted);
        assert_eq!((d.verdicts[1].used, d.verdicts[1].remaining), (3, 1));
        // Another key of the account takes the last daily slot, then the daily refuses.
        assert!(store.decide_at(&checks(key(2)), now).admitted);
        let d = store.decide_at(&checks(key(2)), now);
        assert!(!d.admitted && d.verdicts[0].admitted && !d.verdicts[1].admitted);
    }

    #[test]
    fn idle_counters_are_evicted_after_their_window() {
        let clock = ManualClock::at_secs(1_000_000);
        let store = MemoryStore::new(Arc::new(clock.clone()));
        let minute = Rule::Fixed {
            requests: 3,
            window: Window::Span(60 * SECOND),
        };
        for n in 0..100 {
            let c = [LimitCheck {
                subject: key(n),
                counter: 1,
                rule: &minute,
            }];
            store.decide_at(&c, clock.now());
        }
        assert_eq!((store.subjects(), store.live_counters()), (100, 100));
        assert_eq!(store.evict_expired(), 0);
        clock.advance_secs(20); // the minute ends at 1_000_020
        assert_eq!(store.evict_expired(), 100);
        assert_eq!((store.subjects(), store.live_counters()), (0, 0));
    }

    #[test]
    fn concurrent_threads_never_over_admit() {
        let clock = ManualClock::at_secs(1_000_000);
        let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
        let rule = Rule::Rolling {
            requests: 97,
            window: 60 * SECOND,
        };
        let admitted = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        let c = [LimitCheck {
                            subject: key(7),
                            counter: 9,
                            rule: &rule,
                        }];
                        if store.decide_at(&c, clock.now()).admitted {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        // Eviction racing with decisions must not lose counts.
                        store.evict_expired();
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 97);
    }
}
