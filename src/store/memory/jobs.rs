//! Jobs in the memory store: ended by id, listed, counted.

use std::sync::atomic::Ordering;

use dashmap::DashMap;
use smallvec::SmallVec;

use crate::clock::Nanos;
use crate::limits::{CounterState, Job, Rule};
use crate::store::journal::{Change, How, Origin};
use crate::store::{OwnedCheck, Subject};

/// The counters holding one job: (subject, counter, the job's expiry).
type Holders = SmallVec<[(Subject, u64, Nanos); 1]>;

/// Job id -> the counters holding it.
#[derive(Default)]
pub(super) struct JobIndex(DashMap<Box<str>, Holders>);

impl JobIndex {
    pub(super) fn add(&self, id: &str, subject: &Subject, counter: u64, expires: Nanos) {
        let mut holders = self.0.entry(id.into()).or_default();
        holders.retain(|(s, c, _)| !(s == subject && *c == counter));
        holders.push((subject.clone(), counter, expires));
    }

    /// Drops the entries of jobs past their expiry.
    pub(super) fn prune(&self, now: Nanos) {
        self.0.retain(|_, holders| {
            holders.retain(|(_, _, expires)| *expires > now);
            !holders.is_empty()
        });
    }
}

use super::journal::Noted;
use super::{lock, MemoryStore};

impl MemoryStore {
    /// Ends job `id` in whichever of `counters` holds it; true if one did.
    pub fn end_job(
        &self,
        counters: &[OwnedCheck],
        id: &str,
        how: How,
        origin: Option<&Origin>,
    ) -> bool {
        let now = self.now();
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
                    if let Some(j) = self.inner.journal() {
                        let noted = Noted {
                            subject: &c.subject,
                            counter: c.counter,
                            grant: 0,
                            at: now,
                            origin,
                        };
                        noted.write(j, Change::JobEnded(how), 0, None, Some(id));
                    }
                }
            }
        }
        ended
    }

    /// Ends job `id` wherever it is held, by its id alone; the subjects
    /// and counters that held it.
    pub fn end_job_by_id(&self, id: &str, how: How) -> Vec<(Subject, u64)> {
        let Some((_, holders)) = self.inner.job_index.0.remove(id) else {
            return Vec::new();
        };
        let now = self.now();
        let mut ended = Vec::new();
        for (subject, counter, _) in holders {
            let Some(handle) = self.inner.map.get(&subject).map(|h| h.clone()) else {
                continue;
            };
            let mut g = lock(&handle);
            let Some(c) = g.list.iter_mut().find(|x| x.id == counter) else {
                continue;
            };
            let CounterState::Jobs(j) = &mut c.state else {
                continue;
            };
            let before = j.jobs.len();
            j.jobs.retain(|j| &*j.id != id);
            if j.jobs.len() < before {
                ended.push((subject.clone(), counter));
                if let Some(journal) = self.inner.journal() {
                    let noted = Noted {
                        subject: &subject,
                        counter,
                        grant: 0,
                        at: now,
                        origin: None,
                    };
                    noted.write(journal, Change::JobEnded(how), 0, None, Some(id));
                }
            }
        }
        ended
    }

    /// Forgets the index entries of jobs past their `max_duration`.
    pub fn prune_job_index(&self) {
        self.inner.job_index.prune(self.now());
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
