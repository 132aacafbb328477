//! `kind = "jobs"`: at most `max` generations in progress at once (docs/configuration.md, "Jobs").
//!
//! A submission takes a *pending* slot at admission, like a concurrency
//! slot. When the upstream's answer names a job id the pending slot becomes
//! that job's ([`Jobs::bind`]) and outlives the exchange, until the job is
//! ended ([`Jobs::end`]: done, cancelled, ended by the admin) or
//! `max_duration` passes. Every other ending gives the pending slot back
//! ([`LimitKind::release`]).

use serde::{Deserialize, Serialize};

use std::num::NonZeroU32;

use super::{CounterState, LimitKind, Verdict};
use crate::clock::Nanos;

/// A jobs limit's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jobs {
    /// Jobs in progress at once (at least 1).
    pub max: NonZeroU32,
    /// A job never seen ending frees its slot this long after submission.
    pub max_duration: Nanos,
    /// What a refusal's `Retry-After` says, in nanoseconds.
    pub retry_after: Nanos,
}

/// One job in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The id the upstream gave it.
    pub id: Box<str>,
    /// When it was submitted.
    pub started: Nanos,
    /// When its slot frees itself (`started + max_duration`).
    pub expires: Nanos,
}

/// What a jobs counter holds: submissions still in flight, and jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobsState {
    /// Submissions admitted whose answer has not named a job yet (they
    /// belong to this process's exchanges: not saved in snapshots).
    pub pending: u32,
    /// Jobs in progress, oldest first.
    pub jobs: Vec<Job>,
}

impl JobsState {
    /// Pending submissions plus jobs in progress.
    pub fn in_progress(&self) -> u32 {
        self.pending.saturating_add(self.jobs.len() as u32)
    }
}

fn state(state: &mut CounterState) -> Option<&mut JobsState> {
    match state {
        CounterState::Jobs(j) => Some(j),
        _ => None,
    }
}

impl Jobs {
    /// Drops the jobs whose `max_duration` has passed by `now`; returns how many.
    pub fn expire(&self, counter: &mut CounterState, now: Nanos) -> usize {
        let Some(s) = state(counter) else { return 0 };
        let before = s.jobs.len();
        s.jobs.retain(|j| j.expires > now);
        before - s.jobs.len()
    }

    /// Drops the jobs whose `max_duration` has passed by `now`; returns them.
    pub fn take_expired(&self, counter: &mut CounterState, now: Nanos) -> Vec<Job> {
        let Some(s) = state(counter) else {
            return Vec::new();
        };
        if s.jobs.iter().all(|j| j.expires > now) {
            return Vec::new();
        }
        let (gone, kept) = std::mem::take(&mut s.jobs)
            .into_iter()
            .partition(|j| j.expires <= now);
        s.jobs = kept;
        gone
    }

    /// Puts back a job the ledger says is in progress (a crash's rebuild):
    /// started at `started`, unless already held or past its `max_duration`.
    pub fn restore(&self, counter: &mut CounterState, id: &str, started: Nanos, now: Nanos) {
        let Some(s) = state(counter) else { return };
        let expires = started.saturating_add(self.max_duration);
        if expires <= now || s.jobs.iter().any(|j| &*j.id == id) {
            return;
        }
        s.jobs.push(Job {
            id: id.into(),
            started,
            expires,
        });
        s.jobs.sort_by_key(|j| j.started);
    }

    /// Turns one pending submission into job `id`, started at `now`. A job
    /// already held under that id is started afresh rather than counted twice.
    pub fn bind(&self, counter: &mut CounterState, id: &str, now: Nanos) {
        let Some(s) = state(counter) else { return };
        s.pending = s.pending.saturating_sub(1);
        s.jobs.retain(|j| &*j.id != id);
        s.jobs.push(Job {
            id: id.into(),
            started: now,
            expires: now.saturating_add(self.max_duration),
        });
    }

    /// Ends job `id`; false when it was not held.
    pub fn end(&self, counter: &mut CounterState, id: &str) -> bool {
        let Some(s) = state(counter) else {
            return false;
        };
        let before = s.jobs.len();
        s.jobs.retain(|j| &*j.id != id);
        s.jobs.len() != before
    }
}

impl LimitKind for Jobs {
    const NAME: &'static str = "jobs";
    const REDIS_KIND: u8 = 5;
    const HOLDS_SLOT: bool = true;
    const QUOTA: bool = false;

    fn new_state(&self) -> CounterState {
        CounterState::Jobs(Box::default())
    }

    fn fits(state: &CounterState) -> bool {
        matches!(state, CounterState::Jobs(_))
    }

    fn evaluate(&self, counter: &mut CounterState, now: Nanos, _units: u32) -> Verdict {
        self.expire(counter, now);
        let in_progress = state(counter).map_or(0, |s| s.in_progress());
        let at = if in_progress < self.max.get() {
            now
        } else {
            now + self.retry_after
        };
        Verdict::of_count(self.max.get(), in_progress, 1, now, at, at)
    }

    fn record(&self, counter: &mut CounterState, _now: Nanos, _units: u32) {
        if let Some(s) = state(counter) {
            s.pending = s.pending.saturating_add(1);
        }
    }

    fn release(&self, counter: &mut CounterState) {
        if let Some(s) = state(counter) {
            s.pending = s.pending.saturating_sub(1);
        }
    }

    /// Never while a submission is pending; else when the last job expires.
    fn expires_at(&self, counter: &CounterState) -> Nanos {
        match counter {
            CounterState::Jobs(s) if s.pending > 0 => Nanos::MAX,
            CounterState::Jobs(s) => s.jobs.iter().map(|j| j.expires).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn shown_limit(&self) -> u32 {
        self.max.get()
    }

    fn summary(&self, name: &str, _window_text: &str) -> String {
        format!("{name} {} jobs at once", self.max)
    }

    /// `(max, retry_after in microseconds)`; `max_duration` travels with
    /// each job (see `store/lua/kinds/jobs.lua`).
    fn redis_args(&self) -> (u64, u64) {
        (u64::from(self.max.get()), self.retry_after / 1_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SECOND;

    const RULE: Jobs = Jobs {
        max: NonZeroU32::new(2).expect("two"),
        max_duration: 60 * SECOND,
        retry_after: 5 * SECOND,
    };

    #[test]
    fn pending_and_bound_jobs_both_count() {
        let mut s = RULE.new_state();
        assert!(RULE.evaluate(&mut s, 0, 1).admitted);
        RULE.record(&mut s, 0, 1);
        RULE.bind(&mut s, "a", 0);
        RULE.record(&mut s, 0, 1);
        let v = RULE.evaluate(&mut s, SECOND, 1);
        assert!(!v.admitted);
        assert_eq!((v.used, v.retry_at), (2, 6 * SECOND));
        // The pending one fails upstream: its slot comes back.
        RULE.release(&mut s);
        assert!(RULE.evaluate(&mut s, SECOND, 1).admitted);
    }

    #[test]
    fn a_job_ends_by_id_or_by_max_duration() {
        let mut s = RULE.new_state();
        for id in ["a", "b"] {
            RULE.record(&mut s, 0, 1);
            RULE.bind(&mut s, id, 0);
        }
        assert!(!RULE.evaluate(&mut s, 0, 1).admitted);
        assert!(!RULE.end(&mut s, "zzz"), "an id not held changes nothing");
        assert!(RULE.end(&mut s, "a"));
        assert!(!RULE.end(&mut s, "a"), "ends once");
        assert!(RULE.evaluate(&mut s, 0, 1).admitted);
        assert_eq!(RULE.expires_at(&s), 60 * SECOND);
        assert_eq!(RULE.expire(&mut s, 60 * SECOND), 1);
        assert_eq!(RULE.expires_at(&s), 0);
    }

    #[test]
    fn the_same_id_twice_is_one_job() {
        let mut s = RULE.new_state();
        RULE.record(&mut s, 0, 1);
        RULE.bind(&mut s, "a", 0);
        RULE.record(&mut s, 0, 1);
        RULE.bind(&mut s, "a", SECOND);
        let CounterState::Jobs(j) = &s else { panic!() };
        assert_eq!((j.pending, j.jobs.len(), j.jobs[0].started), (0, 1, SECOND));
    }

    #[test]
    fn pending_submissions_keep_the_counter() {
        let mut s = RULE.new_state();
        RULE.record(&mut s, 0, 1);
        assert_eq!(RULE.expires_at(&s), Nanos::MAX);
    }
}
