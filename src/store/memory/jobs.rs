//! Jobs in the memory store: ended by id, listed, counted.

use std::sync::atomic::Ordering;

use crate::limits::{CounterState, Job, Rule};
use crate::store::OwnedCheck;

use super::{lock, MemoryStore};

impl MemoryStore {
    /// Ends job `id` in whichever of `counters` holds it; true if one did.
    pub fn end_job(&self, counters: &[OwnedCheck], id: &str) -> bool {
        let mut ended = false;
        for c in counters {
            let Rule::Jobs(jobs) = c.rule else { continue };
            let Some(handle) = self.inner.map.get(&c.subject).map(|h| h.clone()) else {
                continue;
            };
            let mut g = lock(&handle);
            if let Some(counter) = g.list.iter_mut().find(|x| x.id == c.counter) {
                if jobs.end(&mut counter.state, id) {
                    counter.expires_at = c.rule.expires_at(&counter.state);
                    ended = true;
                }
            }
        }
        ended
    }

    /// The jobs in progress on one counter, oldest first.
    pub fn jobs(&self, counter: &OwnedCheck) -> Vec<Job> {
        let now = self.now();
        match self.peek(&counter.subject, counter.counter) {
            Some(CounterState::Jobs(j)) => j.jobs.into_iter().filter(|j| j.expires > now).collect(),
            _ => Vec::new(),
        }
    }

    /// Jobs in progress, summed over every counter (for metrics).
    pub fn jobs_in_progress(&self) -> u64 {
        let now = self.now();
        let mut total = 0;
        for entry in self.inner.map.iter() {
            for c in &lock(entry.value()).list {
                if let CounterState::Jobs(j) = &c.state {
                    total += j.jobs.iter().filter(|j| j.expires > now).count() as u64;
                }
            }
        }
        total
    }

    /// Jobs whose `max_duration` passed before they were seen ending, since start.
    pub fn jobs_expired(&self) -> u64 {
        self.inner.jobs_expired.load(Ordering::Relaxed)
    }
}
