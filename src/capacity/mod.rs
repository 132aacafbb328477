//! Shared capacity (`[[capacity]]`, docs/capacity.md): pools of slots
//! across every caller of the routes they cover, handed out in weighted
//! fair order while requests wait for them. A request takes a pool slot
//! once its own limits admitted it; on a job route the slot is held until
//! the job ends (status poll, cancel, `POST /v1/jobs/end`, `max_duration`),
//! elsewhere until the exchange ends.
//!
//! Two backends behind [`Pools`]: `memory` (one process) and `redis` (one
//! pool and one order for every instance: `lua/capacity.lua`).
//!
//! May import: [`crate::store`] (subjects, job claims, the Redis store it
//! shares a connection with), [`crate::observe`], [`crate::clock`].

pub mod fair;
mod memory;
mod redis;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::{Clock, Nanos};
use crate::observe::metrics::Metrics;
use crate::store::{CounterStore, JobClaim, StoreError, Subject};

/// Among whom slots are shared round-robin within one plan (`fair_per`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FairPer {
    /// Each API key.
    Key,
    /// Each account (a key without one is its own).
    Account,
}

/// A validated `[[capacity]]` pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    /// `name`.
    pub name: Arc<str>,
    /// Slots at once across every caller.
    pub max: u32,
    /// Longest wait for a slot (zero: refuse at once).
    pub max_wait: Duration,
    /// Waiting requests at most.
    pub max_queue: u32,
    /// Share of freed slots by plan name (absent: 1).
    pub weights: Vec<(Arc<str>, u32)>,
    /// Slots only this plan may take, by plan name.
    pub reserve: Vec<(Arc<str>, u32)>,
    /// Round-robin within a plan among keys or accounts.
    pub fair_per: FairPer,
    /// What a refusal's `Retry-After` says.
    pub retry_after: Duration,
    /// A job's slot frees itself this long after submission.
    pub max_duration: Duration,
    /// Indices of the routes it covers.
    pub routes: Vec<usize>,
    /// Every plan's name (a plan without a weight counts 1).
    pub plans: Vec<Arc<str>>,
}

impl PoolSpec {
    /// The weight of `plan`.
    pub fn weight(&self, plan: &str) -> u32 {
        self.weights
            .iter()
            .find(|(p, _)| &**p == plan)
            .map_or(1, |(_, w)| *w)
    }

    /// The slots reserved for `plan`.
    pub fn reserved(&self, plan: &str) -> u32 {
        self.reserve
            .iter()
            .find(|(p, _)| &**p == plan)
            .map_or(0, |(_, r)| *r)
    }

    /// Whether a request of `plan` may take a slot with `in_use` taken and
    /// `held(p)` held by each plan `p`: a free slot that is not kept for
    /// another plan's unused reserve.
    pub fn may_take(&self, plan: &str, in_use: u32, held: impl Fn(&str) -> u32) -> bool {
        let kept: u32 = self
            .reserve
            .iter()
            .filter(|(p, _)| &**p != plan)
            .map(|(p, r)| r.saturating_sub(held(p)))
            .sum();
        in_use.saturating_add(kept) < self.max
    }
}

/// Who asks for a slot.
#[derive(Debug, Clone)]
pub struct Asker {
    /// The caller's plan.
    pub plan: Arc<str>,
    /// The subject slots are shared among within the plan (`fair_per`).
    pub fair: Subject,
    /// The caller's group (account, or key): the only caller whose status
    /// poll may end the job its slot becomes.
    pub owner: Subject,
}

/// No slot within `max_wait`, or the queue full: the 503 `over_capacity`.
#[derive(Debug, Clone)]
pub struct Busy {
    /// The pool.
    pub name: Arc<str>,
    /// Its `max`.
    pub max: u32,
    /// Requests waiting when refused.
    pub waiting: u64,
    /// Seconds for `Retry-After`.
    pub retry_after: u64,
}

/// What acquiring ended with.
#[derive(Debug)]
pub enum Refused {
    /// No slot (503 `over_capacity`).
    Busy(Busy),
    /// Redis could not decide.
    Store(StoreError),
}

/// One pool's figures (admin API, dashboard, metrics).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolUsage {
    /// The pool.
    pub name: Arc<str>,
    /// Its `max`.
    pub max: u32,
    /// Slots taken (jobs included).
    pub in_use: u64,
    /// Of which held by jobs.
    pub jobs: u64,
    /// Requests waiting, by plan.
    pub waiting: Vec<(Arc<str>, u64)>,
}

/// A slot held by one request; dropping it gives the slot back unless it
/// became a job's ([`Slot::into_claim`]).
pub struct Slot(SlotKind);

enum SlotKind {
    Memory(memory::Held),
    Redis(redis::Held),
}

impl Slot {
    /// The slot as a pending job claim: the submission's answer binds it to
    /// the job, or it is given back.
    pub fn into_claim(self) -> JobClaim {
        match self.0 {
            SlotKind::Memory(h) => JobClaim::other(Box::new(h)),
            SlotKind::Redis(h) => JobClaim::other(Box::new(h)),
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("capacity::Slot")
    }
}

/// Every pool, kept across reloads by name.
pub struct Pools {
    backend: Backend,
    metrics: Arc<Metrics>,
}

enum Backend {
    Memory(memory::MemoryPools),
    Redis(redis::RedisPools),
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pools")
    }
}

impl Pools {
    /// Pools in the backend of `store` (Redis: one pool for every instance).
    pub fn new(store: &CounterStore, clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Self {
        let backend = match store {
            CounterStore::Memory(_) => Backend::Memory(memory::MemoryPools::new(clock)),
            CounterStore::Redis(r) => Backend::Redis(redis::RedisPools::new(r.clone(), clock)),
        };
        Self { backend, metrics }
    }

    /// Puts `specs` in force: pools are kept by name with what they hold;
    /// a pool no longer configured keeps its slots until they end.
    pub fn configure(&self, specs: &[Arc<PoolSpec>]) {
        for spec in specs {
            self.metrics
                .capacity()
                .series(&spec.name, spec.plans.iter());
        }
        match &self.backend {
            Backend::Memory(m) => m.configure(specs),
            Backend::Redis(r) => r.configure(specs),
        }
    }

    /// A slot of `spec` for `asker`, waiting up to `max_wait` in fair order.
    /// Dropping the future leaves the queue.
    pub async fn acquire(&self, spec: &Arc<PoolSpec>, asker: &Asker) -> Result<Slot, Refused> {
        let started = Instant::now();
        let got = match &self.backend {
            Backend::Memory(m) => m.acquire(spec, asker).await.map(SlotKind::Memory),
            Backend::Redis(r) => r.acquire(spec, asker).await.map(SlotKind::Redis),
        };
        match &got {
            Ok(_) => self
                .metrics
                .capacity()
                .waited(&spec.name, &asker.plan, started.elapsed()),
            Err(Refused::Busy(_)) => self.metrics.capacity().refusal(&spec.name, &asker.plan),
            Err(Refused::Store(_)) => {}
        }
        got.map(Slot)
    }

    /// Ends job `id` in every pool holding it (`owner`: only when held for
    /// that caller; `None`: whoever holds it); the pools it freed a slot in.
    pub async fn end_job(
        &self,
        id: &str,
        owner: Option<&Subject>,
    ) -> Result<Vec<Arc<str>>, StoreError> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.end_job(id, owner)),
            Backend::Redis(r) => r.end_job(id, owner).await,
        }
    }

    /// Every configured pool's figures.
    pub async fn usage(&self) -> Result<Vec<PoolUsage>, StoreError> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.usage()),
            Backend::Redis(r) => r.usage().await,
        }
    }

    /// Frees the slots of jobs past `max_duration` (and, in Redis, of
    /// instances gone), hands them to waiters, and refreshes the gauges.
    /// Called every second.
    pub async fn tick(&self) {
        let usage = match &self.backend {
            Backend::Memory(m) => {
                m.sweep();
                m.usage()
            }
            Backend::Redis(r) => match r.tick().await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "capacity pools not refreshed");
                    return;
                }
            },
        };
        for pool in &usage {
            self.metrics
                .capacity()
                .gauges(&pool.name, pool.in_use, &pool.waiting);
        }
    }

    /// Renews this instance's Redis slot leases; call every third of the lease.
    pub async fn renew(&self) {
        if let Backend::Redis(r) = &self.backend {
            r.renew().await;
        }
    }

    /// The lease of a slot not renewed (Redis), for the renewal interval.
    pub fn lease(&self) -> Option<Duration> {
        match &self.backend {
            Backend::Memory(_) => None,
            Backend::Redis(r) => Some(r.lease()),
        }
    }
}

/// Whole seconds of `d`, at least 1.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// Nanoseconds of `d` on the store clock's scale.
fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The refusal of `spec` with `waiting` requests queued.
fn busy(spec: &PoolSpec, waiting: u64) -> Refused {
    Refused::Busy(Busy {
        name: spec.name.clone(),
        max: spec.max,
        waiting,
        retry_after: whole_seconds(spec.retry_after),
    })
}

/// A subject as bytes, for the fair queue's round-robin and Redis members.
fn subject_bytes(s: &Subject) -> Vec<u8> {
    match s {
        Subject::Key(d) => {
            let mut v = vec![b'k'];
            v.extend_from_slice(&hex::encode(d).into_bytes());
            v
        }
        Subject::Account(a) => {
            let mut v = vec![b'a'];
            v.extend_from_slice(a.as_bytes());
            v
        }
    }
}
