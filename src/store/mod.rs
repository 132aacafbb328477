//! Counter storage behind one trait whose unit of work is "decide every limit
//! of this request": admit only if all admit, count only then, atomically.
//! Two backends: `memory` (one process: counters in a sharded map, eviction
//! under `max_counters`, the snapshot file) and `redis` (every replica:
//! one Lua script per decision, the connection and its breaker, what an
//! outage decided locally reconciled afterwards).
//!
//! May import: [`crate::limits`] (the maths the stores run), [`crate::clock`].

pub mod journal;
mod memory;
mod redis;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use self::redis::RedisStore;
pub use memory::MemoryStore;
pub use memory::SnapshotError;

use crate::clock::Nanos;
pub use crate::limits::QueueSpec;
use crate::limits::{Job, Per, Rule, Verdict};
pub use journal::{How, Journal, Origin};

/// An API key's SHA-256 digest: how the stores name a caller's counters
/// (the key itself is never kept; the keys layer makes it).
pub type KeyDigest = [u8; 32];

/// Who a counter counts for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Subject {
    /// One API key, by the first 16 bytes of its SHA-256 (also a key that is
    /// its own account).
    Key([u8; 16]),
    /// A named account from the keys file.
    Account(Arc<str>),
}

impl Subject {
    /// The subject of one key.
    pub fn key(digest: &KeyDigest) -> Self {
        let mut short = [0u8; 16];
        short.copy_from_slice(&digest[..16]);
        Subject::Key(short)
    }

    /// Whom a limit counted `per` key or account counts, for the key with
    /// `digest` in `account` (a key without an account is its own).
    pub fn counted(per: Per, digest: &KeyDigest, account: Option<&Arc<str>>) -> Self {
        match (per, account) {
            (Per::Account, Some(account)) => Subject::Account(account.clone()),
            _ => Subject::key(digest),
        }
    }

    /// The subject as the ledger writes it: `a:<account>` or `k:<digest
    /// in hex>` (read back by a rebuild).
    pub fn text(&self) -> String {
        match self {
            Subject::Account(a) => format!("a:{a}"),
            Subject::Key(d) => format!("k:{}", hex::encode(d)),
        }
    }

    /// How the admin API names it: `key:<fingerprint>` or `account:<name>`.
    pub fn label(&self) -> String {
        match self {
            Subject::Key(d) => format!("key:{}", hex::encode(&d[..4])),
            Subject::Account(a) => format!("account:{a}"),
        }
    }

    /// The group every counter of one request belongs to: the account, or
    /// the key when it has none.
    pub fn group(digest: &KeyDigest, account: Option<&Arc<str>>) -> Self {
        Self::counted(Per::Account, digest, account)
    }
}

impl std::hash::Hash for Subject {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            // Already uniformly random: 8 bytes of it are a fine hash input.
            Subject::Key(d) => state.write_u64(u64::from_le_bytes([
                d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
            ])),
            Subject::Account(a) => a.hash(state),
        }
    }
}

/// One limit to check for a request.
#[derive(Debug, Clone)]
pub struct LimitCheck<'a> {
    /// Whose counter.
    pub subject: Subject,
    /// The caller's account (or key, when it has none): every counter of one
    /// request belongs to one group, so a networked store can keep them together.
    pub group: Subject,
    /// Which counter of that subject (stable id from the config).
    pub counter: u64,
    /// The rule and its numbers.
    pub rule: &'a Rule,
    /// Concurrency limits only: wait for a slot instead of refusing at once.
    pub queue: Option<QueueSpec>,
    /// The subject is in the keys file: under memory pressure its counters
    /// are evicted last.
    pub pinned: bool,
    /// What the request counts against this limit: 1, or its cost for a
    /// credits balance and a `count = "cost"` limit.
    pub units: u32,
    /// `shadow = true`: counted and reported, but its refusal does not
    /// refuse the request.
    pub shadow: bool,
}

/// `[store]` settings of the Redis backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://host:port/db` (with `cluster`, any node of the cluster).
    pub url: String,
    /// Whether `url` is a Redis Cluster node.
    pub cluster: bool,
    /// Prefix of every key turnstile writes.
    pub prefix: String,
    /// Longest wait for one decision before `on_error` applies.
    pub timeout: Duration,
    /// What to do while Redis cannot decide.
    pub on_error: OnError,
    /// Lifetime of a concurrency slot not renewed by its instance.
    pub lease: Duration,
}

/// `[store] on_error`: behaviour while Redis is unreachable or too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Enforce the limits per instance, in memory.
    Local,
    /// Forward without limits.
    Allow,
    /// Refuse with 503 `store_unavailable`.
    Deny,
}

/// The slots an admitted request holds: concurrency slots, and the pending
/// submissions of jobs limits. Dropping the lease gives them back, however
/// the exchange ends (completion, error, client gone, panic unwinding), so
/// a slot can never leak; a job claim taken out of it ([`Lease::take_jobs`])
/// gives its slot back the same way unless it is bound to a job.
#[derive(Default)]
pub struct Lease {
    slots: Vec<Box<dyn Send + Sync>>,
    /// `None` rather than empty: most requests hold no job claim.
    jobs: Option<Vec<JobClaim>>,
}

impl Lease {
    /// A lease over slots whose own `Drop` releases them.
    pub fn new(slots: Vec<Box<dyn Send + Sync>>) -> Self {
        Self { slots, jobs: None }
    }

    /// The same lease with pending job submissions.
    pub fn with_jobs(mut self, jobs: Vec<JobClaim>) -> Self {
        self.jobs = (!jobs.is_empty()).then_some(jobs);
        self
    }

    /// Holds one more slot, released like the others.
    pub fn hold(&mut self, slot: Box<dyn Send + Sync>) {
        self.slots.push(slot);
    }

    /// Holds one more pending job submission.
    pub fn push_job(&mut self, claim: JobClaim) {
        self.jobs.get_or_insert_with(Vec::new).push(claim);
    }

    /// The pending job submissions, for the exchange to bind or drop.
    pub fn take_jobs(&mut self) -> Vec<JobClaim> {
        self.jobs.take().unwrap_or_default()
    }

    /// Number of slots held.
    pub fn len(&self) -> usize {
        self.slots.len() + self.jobs.as_ref().map_or(0, Vec::len)
    }

    /// Whether no slot is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.jobs.is_none()
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let jobs = self.jobs.as_ref().map_or(0, Vec::len);
        write!(f, "Lease({} slots, {jobs} jobs)", self.slots.len())
    }
}

/// One pending job submission (docs/configuration.md, "Jobs"): the jobs slot a submission took
/// at admission. [`JobClaim::bind`] makes it the slot of the job the
/// upstream named; dropping it unbound gives the slot back.
pub struct JobClaim(ClaimKind);

enum ClaimKind {
    Memory(memory::Slot),
    Redis(redis::RedisClaim),
    Other(Box<dyn BindJob>),
}

/// A pending job slot kept outside the counters (a capacity pool's):
/// bound to the job the answer names, or given back when dropped unbound.
pub trait BindJob: Send + Sync {
    /// The slot now belongs to job `id`.
    fn bind(
        self: Box<Self>,
        id: &str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + '_>>;
}

impl JobClaim {
    fn memory(slot: memory::Slot) -> Self {
        Self(ClaimKind::Memory(slot))
    }

    /// A claim on a slot kept elsewhere.
    pub fn other(slot: Box<dyn BindJob>) -> Self {
        Self(ClaimKind::Other(slot))
    }

    /// The slot now belongs to job `id`, until it ends or expires.
    pub async fn bind(self, id: &str) -> Result<(), StoreError> {
        match self.0 {
            ClaimKind::Memory(slot) => {
                slot.bind_job(id);
                Ok(())
            }
            ClaimKind::Redis(claim) => claim.bind(id).await,
            ClaimKind::Other(slot) => slot.bind(id).await,
        }
    }
}

impl std::fmt::Debug for JobClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobClaim")
    }
}

/// One counter of one subject, owned: for work that outlives the request
/// that found it (ending a job when its status poll answers, settling a
/// cost when the answer says it, the admin API).
#[derive(Debug, Clone)]
pub struct OwnedCheck {
    /// Whose counter.
    pub subject: Subject,
    /// The caller's group (see [`LimitCheck::group`]).
    pub group: Subject,
    /// Which counter of that subject.
    pub counter: u64,
    /// Its rule.
    pub rule: Rule,
    /// Units the request counted against it (see [`LimitCheck::units`]).
    pub units: u32,
}

impl OwnedCheck {
    /// The counter as a check (for the stores' key and lock helpers).
    pub fn check(&self) -> LimitCheck<'_> {
        LimitCheck {
            subject: self.subject.clone(),
            group: self.group.clone(),
            counter: self.counter,
            rule: &self.rule,
            queue: None,
            pinned: false,
            shadow: false,
            units: self.units,
        }
    }

    /// An owned copy of `check`.
    pub fn of(check: &LimitCheck<'_>) -> Self {
        Self {
            subject: check.subject.clone(),
            group: check.group.clone(),
            counter: check.counter,
            rule: *check.rule,
            units: check.units,
        }
    }

    /// `max_duration` of its rule.
    pub fn max_duration(&self) -> Nanos {
        match self.rule {
            Rule::Jobs(j) => j.max_duration,
            _ => 0,
        }
    }
}

/// One verdict per check; inline for the usual handful of limits.
pub type Verdicts = smallvec::SmallVec<[Verdict; 4]>;

/// The outcome of one request's limits.
#[derive(Debug)]
pub struct Decision {
    /// The time the decision was made at.
    pub now: Nanos,
    /// True if every limit admitted (and all were counted).
    pub admitted: bool,
    /// One verdict per check, in order.
    pub verdicts: Verdicts,
    /// The concurrency slots taken (empty when refused).
    pub lease: Lease,
    /// The ledger position of the last entry this decision wrote (0: none):
    /// the request waits for it to be on disk when the ledger says so.
    pub written: u64,
}

/// The store could not decide.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// It cannot be reached or did not answer.
    #[error("counter store unavailable: {0}")]
    Unavailable(String),
    /// It could not be asked at all (not connected, circuit open, its data
    /// lost): the change was certainly not made, so it can be made later.
    #[error("counter store unavailable: {0}")]
    NotSent(String),
    /// Counter memory is at `[store] max_counters` and every counter in it
    /// holds something that cannot be given away (jobs in progress, spent
    /// balances, slots): a new subject cannot be counted.
    #[error(
        "counter memory is full ([store] max_counters) and none of it can be freed: retry shortly"
    )]
    Full,
}

/// Decides all limits of one request atomically.
pub trait Store: Send + Sync + 'static {
    /// Admits the request only if every check admits, and only then counts it
    /// against all of them; concurrent calls never over-admit. A request
    /// refused only by a concurrency limit with a queue waits (FIFO) for a
    /// slot up to the queue's `max_wait`; dropping the future leaves the queue.
    /// `origin`: the exchange, for the ledger's entries.
    fn decide(
        &self,
        checks: &[LimitCheck<'_>],
        origin: Option<&Arc<Origin>>,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send;

    /// Takes back a request that [`decide`](Store::decide) admitted at `at`
    /// with the same checks (each its `units`) but that was refused
    /// afterwards or refunded: it consumes nothing.
    fn refund(
        &self,
        checks: &[LimitCheck<'_>],
        at: Nanos,
        origin: Option<&Arc<Origin>>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The configured counter store.
#[derive(Debug, Clone)]
pub enum CounterStore {
    /// In this process.
    Memory(MemoryStore),
    /// In Redis, shared by every instance.
    Redis(RedisStore),
}

/// How the store is doing, for `/readyz` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreHealth {
    /// `"memory"` or `"redis"`.
    pub backend: &'static str,
    /// Whether the store answers (Redis: the breaker is closed).
    pub up: bool,
    /// Whether requests are refused while it is down (`on_error = "deny"`).
    pub refusing_when_down: bool,
}

impl CounterStore {
    /// The in-process counters: the memory backend, or Redis's local fallback.
    pub fn in_process(&self) -> &MemoryStore {
        match self {
            CounterStore::Memory(m) => m,
            CounterStore::Redis(r) => r.fallback(),
        }
    }

    /// Backend and state.
    pub fn health(&self) -> StoreHealth {
        match self {
            CounterStore::Memory(_) => StoreHealth {
                backend: "memory",
                up: true,
                refusing_when_down: false,
            },
            CounterStore::Redis(r) => StoreHealth {
                backend: "redis",
                up: r.is_up(),
                refusing_when_down: r.on_error() == OnError::Deny,
            },
        }
    }

    /// The figures of `checks` without counting (admin usage), uncounted.
    pub async fn usage(&self, checks: &[LimitCheck<'_>]) -> Result<Vec<Verdict>, StoreError> {
        match self {
            CounterStore::Memory(m) => Ok(m.usage(checks)),
            CounterStore::Redis(r) => r.usage(checks).await,
        }
    }

    /// Resets the window counters of `checks`; returns how many existed.
    pub async fn reset(&self, checks: &[LimitCheck<'_>]) -> Result<usize, StoreError> {
        match self {
            CounterStore::Memory(m) => Ok(m.reset_counters(checks)),
            CounterStore::Redis(r) => r.reset(checks).await,
        }
    }
}

/// What an admin change does to a credits balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceChange {
    /// Adds this much (negative: takes it away).
    Add(i64),
    /// Sets the balance to this.
    Set(i64),
    /// Reads it, changing nothing.
    Read,
}

impl CounterStore {
    /// Settles a request admitted at `at` whose cost turned out `delta`
    /// units more (or, negative, fewer) than its estimate: charged or given
    /// back on every check (the cost-counting ones), unchecked. A window or
    /// refill period that has ended since is left alone.
    pub async fn settle(
        &self,
        checks: &[OwnedCheck],
        at: Nanos,
        delta: i64,
        origin: Option<&Origin>,
    ) -> Result<(), StoreError> {
        if delta == 0 || checks.is_empty() {
            return Ok(());
        }
        match self {
            CounterStore::Memory(m) => {
                m.settle(checks, at, delta, origin);
                Ok(())
            }
            CounterStore::Redis(r) => r.settle(checks, at, delta, origin).await,
        }
    }

    /// Applies `change` to the credits balance of `check` (a `Rule::Credits`)
    /// atomically, and returns the balance after it.
    pub async fn balance(
        &self,
        check: &OwnedCheck,
        change: BalanceChange,
    ) -> Result<i64, StoreError> {
        match self {
            CounterStore::Memory(m) => Ok(m.balance(check, change)),
            CounterStore::Redis(r) => r.balance(check, change).await,
        }
    }

    /// Ends job `id` wherever it is held, by its id alone (`POST
    /// /v1/jobs/end`): each holder as (subject label, counter id).
    pub async fn end_job_by_id(
        &self,
        id: &str,
        how: How,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        match self {
            CounterStore::Memory(m) => Ok(m
                .end_job_by_id(id, how)
                .into_iter()
                .map(|(s, c)| (s.label(), c))
                .collect()),
            CounterStore::Redis(r) => {
                let mut ended = r.end_job_by_id(id, how).await?;
                let local = r.fallback().end_job_by_id(id, how);
                ended.extend(local.into_iter().map(|(s, c)| (s.label(), c)));
                Ok(ended)
            }
        }
    }

    /// Forgets what ending jobs by id no longer needs (memory: index
    /// entries of jobs past `max_duration`).
    pub fn prune_job_index(&self) {
        self.in_process().prune_job_index();
    }

    /// Ends job `id` in whichever of `counters` holds it (docs/configuration.md, "Jobs");
    /// true if one did. Ids the subject does not hold change nothing.
    pub async fn end_job(
        &self,
        counters: &[OwnedCheck],
        id: &str,
        how: How,
        origin: Option<&Origin>,
    ) -> Result<bool, StoreError> {
        match self {
            CounterStore::Memory(m) => Ok(m.end_job(counters, id, how, origin)),
            CounterStore::Redis(r) => r.end_job(counters, id, how, origin).await,
        }
    }

    /// The jobs in progress on one counter, oldest first.
    pub async fn jobs(&self, counter: &OwnedCheck) -> Result<Vec<Job>, StoreError> {
        match self {
            CounterStore::Memory(m) => Ok(m.jobs(counter)),
            CounterStore::Redis(r) => r.jobs(counter).await,
        }
    }

    /// Jobs in progress (memory: all of them; Redis: the jobs this instance
    /// saw start minus those it saw end, so the sum over instances is the total).
    pub fn jobs_in_progress(&self) -> i64 {
        match self {
            CounterStore::Memory(m) => m.jobs_in_progress() as i64,
            CounterStore::Redis(r) => r.jobs_in_progress(),
        }
    }

    /// Jobs whose `max_duration` passed before anyone saw them end, since start.
    pub fn jobs_expired(&self) -> u64 {
        match self {
            CounterStore::Memory(m) => m.jobs_expired(),
            CounterStore::Redis(r) => r.jobs_expired() + r.fallback().jobs_expired(),
        }
    }
}

impl Store for CounterStore {
    async fn decide(
        &self,
        checks: &[LimitCheck<'_>],
        origin: Option<&Arc<Origin>>,
    ) -> Result<Decision, StoreError> {
        match self {
            CounterStore::Memory(m) => m.decide(checks, origin).await,
            CounterStore::Redis(r) => r.decide(checks, origin).await,
        }
    }

    async fn refund(
        &self,
        checks: &[LimitCheck<'_>],
        at: Nanos,
        origin: Option<&Arc<Origin>>,
    ) -> Result<(), StoreError> {
        match self {
            CounterStore::Memory(m) => m.refund(checks, at, origin).await,
            CounterStore::Redis(r) => r.refund(checks, at, origin).await,
        }
    }
}
