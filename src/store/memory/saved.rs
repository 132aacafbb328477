//! The memory store's counters written to and read from the snapshot file.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::snapshot::{self, SavedCounter, SavedSubject, SnapshotError};
use crate::clock::Nanos;
use crate::limits::{CounterState, Job, Rule};
use crate::store::Subject;

use super::{lock, Counter, MemoryStore};

impl MemoryStore {
    /// Every window counter and job still live, for a snapshot (concurrency
    /// slots and pending submissions belong to this process's exchanges and
    /// are not saved).
    pub(crate) fn saved(&self) -> Vec<SavedSubject> {
        let now = self.inner.clock.now();
        let mut out = Vec::new();
        for entry in self.inner.map.iter() {
            let g = lock(entry.value());
            let counters: Vec<SavedCounter> = g
                .list
                .iter()
                .filter_map(|c| saved_counter(c, now))
                .collect();
            if !counters.is_empty() {
                out.push(SavedSubject {
                    subject: entry.key().clone(),
                    counters,
                });
            }
        }
        out
    }

    /// Writes every live window counter to `path` atomically. Returns how many.
    pub fn save_snapshot(&self, path: &Path) -> Result<usize, SnapshotError> {
        let subjects = self.saved();
        let count = subjects.iter().map(|s| s.counters.len()).sum();
        let bytes = snapshot::encode(self.inner.clock.now(), subjects)?;
        snapshot::write_atomically(path, &bytes)?;
        Ok(count)
    }

    /// Loads counters from `path`, dropping those whose windows have passed.
    /// Returns how many were restored.
    pub fn load_snapshot(&self, path: &Path) -> Result<usize, SnapshotError> {
        let bytes = std::fs::read(path)?;
        let now = self.inner.clock.now();
        let mut restored = 0;
        for saved in snapshot::decode(&bytes)? {
            let handle = self.inner.handle(&saved.subject);
            let mut g = lock(&handle);
            for c in saved.counters.into_iter().filter(|c| c.expires_at > now) {
                if g.list.iter().any(|x| x.id == c.id) {
                    continue;
                }
                if let crate::limits::CounterState::Jobs(j) = &c.state {
                    for job in &j.jobs {
                        let at = (&saved.subject, c.id, job.expires);
                        self.inner.job_index.add(&job.id, at.0, at.1, at.2);
                    }
                }
                g.list.push(Counter::new(c.id, c.state, c.expires_at));
                restored += 1;
            }
        }
        self.inner.live.fetch_add(restored, Ordering::Relaxed);
        self.inner.enforce_cap();
        Ok(restored)
    }
}

/// One counter as a snapshot keeps it: window counters while they last,
/// jobs without the submissions still pending (they belong to this process).
fn saved_counter(c: &Counter, now: Nanos) -> Option<SavedCounter> {
    let (state, expires_at) = match &c.state {
        CounterState::Concurrency { .. } => return None,
        CounterState::Jobs(j) => {
            let jobs: Vec<Job> = j.jobs.iter().filter(|j| j.expires > now).cloned().collect();
            let expires_at = jobs.iter().map(|j| j.expires).max()?;
            let state = crate::limits::JobsState { pending: 0, jobs };
            (CounterState::Jobs(Box::new(state)), expires_at)
        }
        state => (state.clone(), c.expires_at),
    };
    (expires_at > now).then_some(SavedCounter {
        id: c.id,
        expires_at,
        state,
    })
}

impl MemoryStore {
    /// Sets one counter's state as the ledger rebuilt it (over the
    /// snapshot's).
    pub fn restore_state(&self, subject: &Subject, counter: u64, rule: &Rule, state: CounterState) {
        let handle = self.inner.handle(subject);
        let mut g = lock(&handle);
        let i = g.slot(counter, rule, &self.inner.live);
        g.list[i].state = state;
        g.list[i].expires_at = rule.expires_at(&g.list[i].state);
    }

    /// Puts back the jobs in progress the ledger shows on one jobs
    /// counter, (id, start) each, in place of the snapshot's; how many
    /// are held (those past `max_duration` are not).
    pub fn restore_jobs(
        &self,
        subject: &Subject,
        counter: u64,
        rule: &Rule,
        jobs: &[(String, Nanos)],
    ) -> usize {
        let Rule::Jobs(limit) = rule else {
            return 0;
        };
        let now = self.inner.clock.now();
        let handle = self.inner.handle(subject);
        let mut g = lock(&handle);
        let i = g.slot(counter, rule, &self.inner.live);
        let c = &mut g.list[i];
        if !rule.fits(&c.state) {
            c.state = rule.new_state();
        }
        if let CounterState::Jobs(j) = &mut c.state {
            j.jobs.clear();
        }
        for (id, started) in jobs {
            limit.restore(&mut c.state, id, *started, now);
        }
        c.expires_at = rule.expires_at(&c.state);
        let held: Vec<(Box<str>, Nanos)> = match &c.state {
            CounterState::Jobs(j) => j.jobs.iter().map(|j| (j.id.clone(), j.expires)).collect(),
            _ => Vec::new(),
        };
        drop(g);
        for (id, expires) in &held {
            self.inner.job_index.add(id, subject, counter, *expires);
        }
        held.len()
    }
}
