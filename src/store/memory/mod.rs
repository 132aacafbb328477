//! In-process counters: a sharded map from subject to that subject's counters.
//!
//! A request locks the counters of its (at most two) subjects in a fixed order,
//! decides every limit, and counts only if all admit: atomic without a global
//! lock. Idle subjects are evicted by [`MemoryStore::evict_expired`] once
//! every window they hold has passed.
//!
//! Concurrency slots are [`Slot`] guards: dropping one gives the slot back,
//! or hands it straight to the first live waiter of the limit's queue, so
//! waiters are served in arrival order and newcomers cannot jump the queue.

use std::collections::VecDeque;

use dashmap::DashMap;
use smallvec::SmallVec;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

use super::journal::{Change, Journal, JournalSlot, Origin};
use super::{Decision, JobClaim, Lease, LimitCheck, Store, StoreError, Subject, Verdicts};
use crate::clock::{Clock, Nanos};
use crate::limits::{Concurrency, CounterState, Rule, Verdict};
use journal::Noted;

mod credits;
mod evict;
mod jobs;
mod journal;
mod saved;
pub(crate) mod snapshot;
pub use snapshot::SnapshotError;

/// Requests waiting for a concurrency slot, oldest first.
type Waiters = VecDeque<oneshot::Sender<Slot>>;

/// The waiters of a subject's queued concurrency limits, by counter id.
type Queues = SmallVec<[(u64, Waiters); 1]>;

/// One counter: 32 bytes, so that two fit inline in a subject's entry.
#[derive(Debug)]
struct Counter {
    id: u64,
    expires_at: Nanos,
    state: CounterState,
}

impl Counter {
    fn new(id: u64, state: CounterState, expires_at: Nanos) -> Self {
        Self {
            id,
            expires_at,
            state,
        }
    }
}

#[derive(Debug, Default)]
struct SubjectCounters {
    /// Set when the sweeper removed this entry from the map: holders retry.
    evicted: bool,
    /// The subject is in the keys file: evicted last under memory pressure.
    pinned: bool,
    /// Most subjects hold one or two counters: kept inline.
    list: SmallVec<[Counter; 2]>,
    /// Only subjects with a queued concurrency limit ever allocate this.
    queues: Option<Box<Queues>>,
}

/// Drops the waiters that left (client gone or timed out); how many are left.
fn prune(w: &mut Waiters) -> usize {
    w.retain(|w| !w.is_closed());
    w.len()
}

/// Live waiters of counter `id` in `queues` (those gone are dropped on the way).
fn live_waiters(queues: &mut Option<Box<Queues>>, id: u64) -> usize {
    let Some(queues) = queues else {
        return 0;
    };
    queues
        .iter_mut()
        .find(|(q, _)| *q == id)
        .map_or(0, |(_, w)| prune(w))
}

impl SubjectCounters {
    fn slot(&mut self, id: u64, rule: &Rule, live: &AtomicUsize) -> usize {
        if let Some(i) = self.list.iter().position(|c| c.id == id) {
            return i;
        }
        live.fetch_add(1, Ordering::Relaxed);
        self.list.push(Counter::new(id, rule.new_state(), 0));
        self.list.len() - 1
    }

    fn live_waiters(&mut self, id: u64) -> usize {
        live_waiters(&mut self.queues, id)
    }

    /// Whether any request waits on one of this subject's limits.
    fn any_waiting(&self) -> bool {
        self.queues
            .as_ref()
            .is_some_and(|q| q.iter().any(|(_, w)| !w.is_empty()))
    }

    /// Live waiters on all of this subject's limits.
    fn all_live_waiters(&mut self) -> usize {
        let Some(queues) = &mut self.queues else {
            return 0;
        };
        queues.iter_mut().map(|(_, w)| prune(w)).sum()
    }

    /// The queue of counter `id`, made on first use.
    fn queue(&mut self, id: u64) -> &mut Waiters {
        let queues = self.queues.get_or_insert_with(Box::default);
        let i = match queues.iter().position(|(q, _)| *q == id) {
            Some(i) => i,
            None => {
                queues.push((id, Waiters::new()));
                queues.len() - 1
            }
        };
        &mut queues[i].1
    }

    /// The oldest waiter of counter `id`, taken off its queue.
    fn pop_waiter(&mut self, id: u64) -> Option<oneshot::Sender<Slot>> {
        let queues = self.queues.as_mut()?;
        let (_, w) = queues.iter_mut().find(|(q, _)| *q == id)?;
        w.pop_front()
    }

    /// Drops the queues nobody waits in (after counters were removed).
    fn tidy_queues(&mut self) {
        if let Some(queues) = &mut self.queues {
            queues.retain_mut(|(_, w)| prune(w) > 0);
            if queues.is_empty() {
                self.queues = None;
            }
        }
    }
}

type Handle = Arc<Mutex<SubjectCounters>>;

fn lock(h: &Handle) -> MutexGuard<'_, SubjectCounters> {
    // A panic while holding the lock cannot leave a counter half-written in a
    // way that matters more than losing the request: keep serving.
    h.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Inner {
    map: DashMap<Subject, Handle, foldhash::fast::RandomState>,
    clock: Arc<dyn Clock>,
    live: AtomicUsize,
    /// `[store] max_counters`.
    max_counters: AtomicUsize,
    /// One eviction pass at a time.
    evicting: AtomicBool,
    /// SubjectCounters dropped to stay under `max_counters`, ever.
    evicted: AtomicU64,
    /// Jobs whose `max_duration` passed, ever.
    jobs_expired: AtomicU64,
    /// Job id -> the counters holding it, with the job's expiry (for
    /// ending a job by its id alone).
    job_index: jobs::JobIndex,
    /// The ledger, when one is configured.
    journal: JournalSlot,
}

/// SubjectCounters held in this process. Clones share the same counters.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("subjects", &self.inner.map.len())
            .finish()
    }
}

/// One concurrency slot held for an exchange; dropping it gives it back.
pub(crate) struct Slot {
    store: Option<Arc<Inner>>,
    subject: Subject,
    counter: u64,
    rule: Rule,
    /// A job claim's exchange, for the ledger's `job.started`.
    origin: Option<Arc<Origin>>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("counter", &self.counter)
            .finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            store.release(&self.subject, self.counter, self.rule);
        }
    }
}

/// What one locked attempt at a decision came to.
enum Attempt {
    /// Decided (admitted or refused for good).
    Done(Decision),
    /// Refused by one queued concurrency limit; wait for a slot on `rx`.
    Queued {
        refused: Decision,
        rx: oneshot::Receiver<Slot>,
        check: usize,
    },
}

impl Inner {
    /// The ledger, when one is configured.
    #[inline]
    fn journal(&self) -> Option<&dyn Journal> {
        self.journal.get().map(|j| &**j)
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
        f: impl FnOnce(&mut [MutexGuard<'_, SubjectCounters>], &[usize]) -> R,
    ) -> R {
        // Fast path, one subject (most requests): lock its counters while the
        // map's shard is read-locked. No Arc traffic, no allocation. Safe: a
        // mutex holder never waits for a shard lock, and the sweeper (which
        // write-locks a shard) cannot run on a shard read-locked here.
        const ONE_OWNER: [usize; 8] = [0; 8];
        if let Some(first) = checks.first() {
            if checks.len() <= ONE_OWNER.len() && checks.iter().all(|c| c.subject == first.subject)
            {
                loop {
                    let Some(entry) = self.map.get(&first.subject) else {
                        drop(self.map.entry(first.subject.clone()).or_default());
                        continue;
                    };
                    let mut guard = lock(entry.value());
                    if guard.evicted {
                        continue;
                    }
                    return f(std::slice::from_mut(&mut guard), &ONE_OWNER[..checks.len()]);
                }
            }
        }
        let mut subjects: Vec<&Subject> = checks.iter().map(|c| &c.subject).collect();
        subjects.sort_unstable();
        subjects.dedup();
        let owner: Vec<usize> = checks
            .iter()
            .map(|c| subjects.iter().position(|s| **s == c.subject).unwrap_or(0))
            .collect();
        loop {
            let handles: Vec<Handle> = subjects.iter().map(|s| self.handle(s)).collect();
            let mut guards: Vec<MutexGuard<'_, SubjectCounters>> =
                handles.iter().map(lock).collect();
            if guards.iter().any(|g| g.evicted) {
                // The sweeper removed an entry between lookup and lock: look up again.
                continue;
            }
            return f(&mut guards, &owner);
        }
    }

    /// One decision under lock. `reserved`: a check whose slot was handed to
    /// this request by the queue (already counted).
    fn attempt(
        self: &Arc<Self>,
        checks: &[LimitCheck<'_>],
        now: Nanos,
        reserved: Option<&mut Option<Slot>>,
        origin: Option<&Arc<Origin>>,
    ) -> Attempt {
        let reserved_check = reserved.as_ref().and_then(|r| r.as_ref()).and_then(|slot| {
            checks
                .iter()
                .position(|c| c.counter == slot.counter && c.subject == slot.subject)
        });
        self.with_locked(checks, |guards, owner| {
            let mut verdicts = Verdicts::new();
            let mut slots = CounterSlots::new();
            self.evaluate_all(
                guards,
                owner,
                checks,
                now,
                reserved_check,
                (&mut verdicts, &mut slots),
            );
            if !verdicts
                .iter()
                .zip(checks)
                .all(|(v, c)| v.admitted || c.shadow)
            {
                if let Some(j) = self.journal() {
                    journal::exhausted(j, checks, &verdicts, now, origin);
                }
                return refused(guards, &slots, checks, now, verdicts);
            }
            let (lease, written) =
                self.record_all(guards, &slots, checks, (now, origin), reserved_check);
            // The handed-over slot now belongs to the lease.
            if let (Some(_), Some(r)) = (reserved_check, reserved) {
                if let Some(mut slot) = r.take() {
                    slot.store = None;
                }
            }
            Attempt::Done(Decision {
                now,
                admitted: true,
                verdicts,
                lease,
                written,
            })
        })
    }

    /// Every check's verdict, counting nothing, and where its counter is
    /// (guard, index), pushed onto `out` (filled in place: no copies of the
    /// inline vectors). Expired jobs are dropped (and counted) on the way.
    #[inline(always)]
    fn evaluate_all(
        &self,
        guards: &mut [MutexGuard<'_, SubjectCounters>],
        owner: &[usize],
        checks: &[LimitCheck<'_>],
        now: Nanos,
        reserved_check: Option<usize>,
        out: (&mut Verdicts, &mut CounterSlots),
    ) {
        let (verdicts, slots) = out;
        for (i, (c, &g)) in checks.iter().zip(owner).enumerate() {
            guards[g].pinned |= c.pinned;
            let s = guards[g].slot(c.counter, c.rule, &self.live);
            let counter = &mut guards[g].list[s];
            if let Rule::Jobs(jobs) = c.rule {
                let gone = match self.journal() {
                    None => jobs.expire(&mut counter.state, now) as u64,
                    Some(j) => {
                        let gone = jobs.take_expired(&mut counter.state, now);
                        journal::expired(j, &Noted::of(c, now, None), &gone);
                        gone.len() as u64
                    }
                };
                if gone > 0 {
                    self.jobs_expired.fetch_add(gone, Ordering::Relaxed);
                }
            }
            let verdict = if reserved_check == Some(i) {
                held_verdict(c.rule, &counter.state, now)
            } else {
                let v = c.rule.evaluate(&mut counter.state, now, c.units);
                behind_waiters(c.rule, &mut guards[g], c.counter, v, now)
            };
            verdicts.push(verdict);
            slots.push((g, s));
        }
    }

    /// Counts an admitted request against every check; the slots it holds
    /// and the ledger position of its last entry.
    #[inline(always)]
    fn record_all(
        self: &Arc<Self>,
        guards: &mut [MutexGuard<'_, SubjectCounters>],
        slots: &CounterSlots,
        checks: &[LimitCheck<'_>],
        (now, origin): (Nanos, Option<&Arc<Origin>>),
        reserved_check: Option<usize>,
    ) -> (Lease, u64) {
        let mut lease = Vec::new();
        let mut written = 0;
        // Built only when a jobs limit admitted: most requests hold none.
        let mut jobs: Option<Vec<JobClaim>> = None;
        for (i, (c, &(g, s))) in checks.iter().zip(slots).enumerate() {
            let counter = &mut guards[g].list[s];
            if reserved_check != Some(i) {
                match self.journal() {
                    None => c.rule.record(&mut counter.state, now, c.units),
                    Some(j) => {
                        written = written.max(credits::record_noted(
                            j,
                            c,
                            &mut counter.state,
                            now,
                            origin,
                        ));
                    }
                }
            }
            counter.expires_at = c.rule.expires_at(&counter.state);
            if c.rule.holds_slot() {
                let slot = Slot {
                    store: Some(self.clone()),
                    subject: c.subject.clone(),
                    counter: c.counter,
                    rule: *c.rule,
                    origin: match c.rule {
                        Rule::Jobs(_) if self.journal().is_some() => origin.cloned(),
                        _ => None,
                    },
                };
                match c.rule {
                    Rule::Jobs(_) => jobs
                        .get_or_insert_with(Vec::new)
                        .push(JobClaim::memory(slot)),
                    _ => lease.push(Box::new(slot) as Box<dyn Send + Sync>),
                }
            }
        }
        let lease = match jobs {
            Some(jobs) => Lease::new(lease).with_jobs(jobs),
            None => Lease::new(lease),
        };
        (lease, written)
    }

    /// Gives a slot back, or hands it to the oldest live waiter.
    fn release(self: &Arc<Self>, subject: &Subject, counter: u64, rule: Rule) {
        let handle = self.handle(subject);
        let mut g = lock(&handle);
        if !g.list.iter().any(|c| c.id == counter) {
            return;
        }
        while let Some(waiter) = g.pop_waiter(counter) {
            let slot = Slot {
                store: Some(self.clone()),
                subject: subject.clone(),
                counter,
                rule,
                origin: None,
            };
            match waiter.send(slot) {
                Ok(()) => return,
                // That waiter left (client gone or timed out): disarm and try the next.
                Err(mut slot) => slot.store = None,
            }
        }
        let Some(c) = g.list.iter_mut().find(|c| c.id == counter) else {
            return;
        };
        rule.release(&mut c.state);
        c.expires_at = rule.expires_at(&c.state);
    }
}

impl Slot {
    /// Turns this pending submission into job `id` (docs/configuration.md, "Jobs"); the slot
    /// then belongs to the job, not to the exchange.
    pub(super) fn bind_job(mut self, id: &str) {
        let (Some(store), Rule::Jobs(jobs)) = (self.store.take(), self.rule) else {
            return;
        };
        let now = store.clock.now();
        let handle = store.handle(&self.subject);
        let mut g = lock(&handle);
        if let Some(c) = g.list.iter_mut().find(|c| c.id == self.counter) {
            jobs.bind(&mut c.state, id, now);
            c.expires_at = self.rule.expires_at(&c.state);
            if let Some(j) = store.journal() {
                let noted = Noted {
                    subject: &self.subject,
                    counter: self.counter,
                    grant: 0,
                    at: now,
                    origin: self.origin.as_deref(),
                };
                noted.write(j, Change::JobStarted, 0, None, Some(id));
            }
        }
        drop(g);
        let expires = now.saturating_add(jobs.max_duration);
        store
            .job_index
            .add(id, &self.subject, self.counter, expires);
    }
}

/// Where each check's counter is: (guard, index in that subject's list).
type CounterSlots = SmallVec<[(usize, usize); 4]>;

/// A concurrency verdict as newcomers get it: behind requests already
/// waiting in the limit's queue, never ahead of them.
#[inline(always)]
fn behind_waiters(
    rule: &Rule,
    subject: &mut SubjectCounters,
    counter: u64,
    v: Verdict,
    now: Nanos,
) -> Verdict {
    let Rule::Concurrency(Concurrency { retry_after, .. }) = rule else {
        return v;
    };
    if !v.admitted || subject.live_waiters(counter) == 0 {
        return v;
    }
    let at = now + retry_after;
    Verdict {
        admitted: false,
        used: v.used - 1,
        remaining: 0,
        reset_at: at,
        retry_at: at,
        ..v
    }
}

/// A refused decision: nothing counted. Refused by one queued concurrency
/// limit only, with room in its queue, the request waits instead.
fn refused(
    guards: &mut [MutexGuard<'_, SubjectCounters>],
    slots: &CounterSlots,
    checks: &[LimitCheck<'_>],
    now: Nanos,
    mut verdicts: Verdicts,
) -> Attempt {
    for (v, c) in verdicts.iter_mut().zip(checks) {
        *v = v.uncounted(c.units);
    }
    let refusing: SmallVec<[usize; 4]> = (0..checks.len())
        .filter(|&i| !verdicts[i].admitted && !checks[i].shadow)
        .collect();
    let refused = Decision {
        now,
        admitted: false,
        verdicts,
        lease: Lease::default(),
        written: 0,
    };
    let [i] = refusing[..] else {
        return Attempt::Done(refused);
    };
    let Some(q) = checks[i].queue else {
        return Attempt::Done(refused);
    };
    let (g, s) = slots[i];
    let subject = &mut guards[g];
    if subject.live_waiters(checks[i].counter) >= q.max_len {
        return Attempt::Done(refused);
    }
    let (tx, rx) = oneshot::channel();
    subject.queue(checks[i].counter).push_back(tx);
    subject.list[s].expires_at = Nanos::MAX;
    Attempt::Queued {
        refused,
        rx,
        check: i,
    }
}

/// The verdict of a concurrency limit whose slot this request already holds.
fn held_verdict(rule: &Rule, state: &CounterState, now: Nanos) -> Verdict {
    let used = match state {
        CounterState::Concurrency { in_flight } => *in_flight,
        _ => 0,
    };
    let limit = rule.shown_limit();
    Verdict {
        admitted: true,
        limit,
        used,
        remaining: limit.saturating_sub(used),
        reset_at: now,
        retry_at: now,
    }
}

impl MemoryStore {
    /// An empty store reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Arc::new(Inner {
                map: DashMap::with_hasher(foldhash::fast::RandomState::default()),
                clock,
                live: AtomicUsize::new(0),
                max_counters: AtomicUsize::new(usize::MAX),
                evicting: AtomicBool::new(false),
                evicted: AtomicU64::new(0),
                jobs_expired: AtomicU64::new(0),
                job_index: jobs::JobIndex::default(),
                journal: JournalSlot::new(),
            }),
        }
    }

    /// Writes every balance change and job start and end to `journal`
    /// from now on (set once, at start).
    pub fn set_journal(&self, journal: Arc<dyn Journal>) {
        let _ = self.inner.journal.set(journal);
    }

    /// "Now" as this store's clock tells it.
    pub fn now(&self) -> Nanos {
        self.inner.clock.now()
    }

    /// The clock it counts by.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.inner.clock.clone()
    }

    /// Number of counters held.
    pub fn live_counters(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// Number of subjects with counters.
    pub fn subjects(&self) -> usize {
        self.inner.map.len()
    }

    /// Concurrency slots taken, summed over every counter (for tests and metrics).
    pub fn slots_in_flight(&self) -> u64 {
        let mut total = 0;
        for entry in self.inner.map.iter() {
            for c in &lock(entry.value()).list {
                if let CounterState::Concurrency { in_flight } = c.state {
                    total += in_flight as u64;
                }
            }
        }
        total
    }

    /// Requests waiting in concurrency queues (for tests and metrics).
    pub fn queued(&self) -> usize {
        let mut total = 0;
        for entry in self.inner.map.iter() {
            total += lock(entry.value()).all_live_waiters();
        }
        total
    }

    /// Decides at an explicit time, without queueing (a queued limit refuses).
    pub fn decide_at(&self, checks: &[LimitCheck<'_>], now: Nanos) -> Decision {
        let attempt = self.inner.attempt(checks, now, None, None);
        self.inner.enforce_cap();
        match attempt {
            Attempt::Done(d) => d,
            Attempt::Queued { refused, .. } => refused,
        }
    }

    /// The current state of one counter, if held.
    pub fn peek(&self, subject: &Subject, counter: u64) -> Option<CounterState> {
        let handle = self.inner.map.get(subject)?.clone();
        let g = lock(&handle);
        g.list
            .iter()
            .find(|c| c.id == counter)
            .map(|c| c.state.clone())
    }

    /// Forgets the window counters of `checks` (quota back to full);
    /// concurrency slots are kept. Returns how many counters were reset.
    pub fn reset_counters(&self, checks: &[LimitCheck<'_>]) -> usize {
        let mut dropped = 0;
        for c in checks.iter().filter(|c| c.rule.is_quota()) {
            let Some(handle) = self.inner.map.get(&c.subject).map(|h| h.clone()) else {
                continue;
            };
            let mut g = lock(&handle);
            let before = g.list.len();
            g.list.retain(|x| x.id != c.counter);
            dropped += before - g.list.len();
        }
        self.inner.live.fetch_sub(dropped, Ordering::Relaxed);
        dropped
    }

    /// The figures of `checks` as they stand, counting nothing.
    pub fn usage(&self, checks: &[LimitCheck<'_>]) -> Vec<Verdict> {
        let now = self.now();
        checks
            .iter()
            .map(|c| {
                let mut state = self
                    .peek(&c.subject, c.counter)
                    .unwrap_or_else(|| c.rule.new_state());
                c.rule.evaluate(&mut state, now, c.units).uncounted(c.units)
            })
            .collect()
    }
}

impl Store for MemoryStore {
    async fn decide(
        &self,
        checks: &[LimitCheck<'_>],
        origin: Option<&Arc<Origin>>,
    ) -> Result<Decision, StoreError> {
        if !self.inner.room_for(checks) {
            return Err(StoreError::Full);
        }
        let mut reserved: Option<Slot> = None;
        let mut deadline = None;
        loop {
            let now = self.inner.clock.now();
            let attempt = self.inner.attempt(checks, now, Some(&mut reserved), origin);
            self.inner.enforce_cap();
            let (refused, rx, check) = match attempt {
                Attempt::Done(d) => return Ok(d),
                Attempt::Queued { refused, rx, check } => (refused, rx, check),
            };
            // A slot handed over earlier but not usable (another limit refused) goes on.
            drop(reserved.take());
            let max_wait = checks[check].queue.map(|q| q.max_wait).unwrap_or_default();
            let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_wait);
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(slot)) => reserved = Some(slot),
                // Timed out (the receiver is dropped, so a slot sent meanwhile is given back).
                _ => return Ok(refused),
            }
        }
    }

    async fn refund(
        &self,
        checks: &[LimitCheck<'_>],
        at: Nanos,
        origin: Option<&Arc<Origin>>,
    ) -> Result<(), StoreError> {
        self.refund_at(checks, at, origin);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
