//! Counters in Redis, shared by every turnstile instance (docs/operations.md, "Distributed mode").
//!
//! Each request is one round trip: `decide.lua` (EVALSHA, reloaded on
//! NOSCRIPT) evaluates every limit on the Redis server's clock and counts only
//! if all admit. Each limit kind's Redis side is one fragment in
//! `lua/kinds/`, assembled into the scripts at build time. Keys carry expiries tied to their windows, and the keys of
//! one account share a hash tag so the script runs on Redis Cluster too.
//! Concurrency slots are leases: entries with an expiry that this instance
//! renews while the exchange lives, so a killed instance's slots free
//! themselves. A circuit breaker keeps a dead or slow Redis from adding its
//! timeout to every request: while open, `on_error` applies at once and one
//! probe at a time checks whether Redis is back.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use std::time::{Duration, Instant};

use redis::{FromRedisValue, Script};
use sha2::{Digest, Sha256};

use super::journal::{stream_position, How, JournalSlot, Origin};
use super::{
    BalanceChange, Decision, Lease, LimitCheck, MemoryStore, OwnedCheck, Store, StoreError,
    Subject, Verdicts,
};
use super::{OnError, RedisSettings};
use crate::clock::{Clock, Nanos};
use crate::limits::{Job, Rule, Verdict};

mod client;
mod guard;
mod jobs;
mod keys;
mod ledger;
mod outage;

use client::{Breaker, Conn};
use functions::Args;

/// A server-side script: the shared prelude, then one fragment per limit
/// kind (each registers its functions under its kind number, the
/// `REDIS_KIND` of its Rust module), then the script's own body. Adding a
/// kind: its fragment in `lua/kinds/` and one line here.
macro_rules! with_kinds {
    ($body:literal) => {
        concat!(
            include_str!("lua/prelude.lua"),
            include_str!("lua/kinds/fixed.lua"),
            include_str!("lua/kinds/rolling.lua"),
            include_str!("lua/kinds/bucket.lua"),
            include_str!("lua/kinds/concurrency.lua"),
            include_str!("lua/kinds/jobs.lua"),
            include_str!("lua/kinds/credits.lua"),
            include_str!($body),
        )
    };
}

mod functions;

/// How often waiting requests of a queued concurrency limit retry.
const QUEUE_POLL: Duration = Duration::from_millis(20);

struct Inner {
    settings: RedisSettings,
    conn: ArcSwapOption<Conn>,
    connecting: tokio::sync::Mutex<()>,
    breaker: Breaker,
    decide: Script,
    refund: Script,
    settle: Script,
    balance: Script,
    renew: Script,
    job: Script,
    job_index: Script,
    instance: String,
    seq: AtomicU64,
    /// What this instance renews, by handle: a lease's member (its id, or
    /// `<id>:j` for a pending job submission) and the keys holding it.
    held: DashMap<u64, (String, Vec<String>)>,
    /// Jobs this instance saw start minus those it saw end or expire.
    jobs_gauge: AtomicI64,
    /// Jobs found expired by this instance's decisions.
    jobs_expired: AtomicU64,
    /// Per-instance counters for `on_error = "local"`.
    fallback: MemoryStore,
    /// What the fallback admitted, by counter key, not yet added to Redis.
    unsynced: std::sync::Mutex<std::collections::HashMap<String, Unsynced>>,
    /// Settlements, refunds and job endings Redis could not take, in order.
    replays: std::sync::Mutex<Vec<outage::Replay>>,
    /// Set while `unsynced` has entries (read on every decision).
    has_unsynced: AtomicBool,
    reconciling: AtomicBool,
    reconcile: Script,
    clock: Arc<dyn Clock>,
    /// The epoch of `<prefix>marker` this instance knows (see `guard.rs`).
    epoch: std::sync::Mutex<Option<String>>,
    /// Redis lost turnstile's data and no one acknowledged it yet.
    lost: AtomicBool,
    /// Redis's clock minus this instance's monotonic one (us), from the
    /// last decision (`i64::MIN`: none yet); see [`Inner::deadline_us`].
    skew_us: AtomicI64,
    /// The decision as a Redis Function, when Redis has them.
    library: functions::Library,
    /// The ledger, when one is kept (see `ledger.rs`).
    journal: JournalSlot,
    ledger: ledger::Scripts,
}

/// Local admissions of one counter while Redis was unreachable.
#[derive(Debug, Clone)]
struct Unsynced {
    rule: Rule,
    subject: Subject,
    counter: u64,
    count: u64,
    /// The last one, microseconds.
    at_us: u64,
}

/// Counters in Redis. Clones share the connection and the breaker.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.settings.url)
            .finish_non_exhaustive()
    }
}

/// A concurrency lease held in Redis; dropping it releases the slots.
struct RedisLease {
    store: Arc<Inner>,
    handle: u64,
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        self.store.release(self.handle);
    }
}

/// A pending job submission held in Redis (see `lua/kinds/jobs.lua`).
pub(super) struct RedisClaim {
    store: Arc<Inner>,
    handle: u64,
    key: String,
    member: String,
    max_duration_ms: u64,
    /// Whose counter, for the job index (`Subject::label`).
    subject: String,
    /// Whose counter, as the ledger writes it (`Subject::text`).
    subject_text: String,
    counter: u64,
    origin: Option<Arc<Origin>>,
}

impl RedisClaim {
    /// Replaces the pending member with job `id`, expiring on Redis's clock.
    pub(super) async fn bind(self, id: &str) -> Result<(), StoreError> {
        let store = self.store.clone();
        // No longer renewed or released: the script replaces it.
        store.held.remove(&self.handle);
        let mut inv = store.job.prepare_invoke();
        inv.key(&self.key)
            .arg("bind")
            .arg(id)
            .arg(&self.member)
            .arg(self.max_duration_ms);
        store.job_ledger_args(
            &mut inv,
            &self.subject_text,
            self.counter,
            self.origin.as_deref(),
        );
        store.call::<i64>(inv).await?;
        store.jobs_gauge.fetch_add(1, Ordering::Relaxed);
        let holder = format!("{}\t{}", self.subject, self.subject_text);
        let indexed = store
            .index_job(id, &self.key, &holder, self.max_duration_ms)
            .await;
        if let Err(e) = indexed {
            tracing::warn!(error = %e, "a job was not indexed by id: POST /v1/jobs/end will not find it");
        }
        Ok(())
    }
}

impl Drop for RedisClaim {
    fn drop(&mut self) {
        self.store.release(self.handle);
    }
}

impl Inner {
    /// Releases what `handle` holds (if it still does), in the background;
    /// if Redis is unreachable the lease expires on its own.
    fn release(self: &Arc<Self>, handle: u64) {
        let Some((_, (id, keys))) = self.held.remove(&handle) else {
            return;
        };
        let store = self.clone();
        // Released in the background; if Redis is unreachable the lease expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Some(mut conn) = store.conn.load_full().map(|c| (*c).clone()) {
                    for key in keys {
                        let cmd = redis::cmd("ZREM").arg(&key).arg(&id).to_owned();
                        let release = async {
                            match &mut conn {
                                Conn::Single(c) => cmd.query_async::<i64>(c).await,
                                Conn::Cluster(c) => cmd.query_async::<i64>(c).await,
                            }
                        };
                        let _ = tokio::time::timeout(store.settings.timeout * 4, release).await;
                    }
                }
            });
        }
    }
}

impl Inner {
    /// `prefix{tag}:subject:counter`; `tag` groups the keys of one account.
    fn key(&self, check: &LimitCheck<'_>) -> String {
        keys::counter_key(
            &self.settings.prefix,
            &check.group,
            &check.subject,
            check.counter,
        )
    }
}

impl RedisStore {
    /// The prefix of every key turnstile writes.
    pub fn prefix(&self) -> &str {
        &self.inner.settings.prefix
    }

    /// The `[store]` settings it runs with.
    pub fn settings(&self) -> &RedisSettings {
        &self.inner.settings
    }

    /// This instance's id (a fresh one each start), for lease members.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// Runs `script` with `keys` and `args` (the runtime key store's calls,
    /// the runtime keys' Redis store), bounded by the timeout and the breaker
    /// like every decision.
    pub async fn run_script<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, StoreError> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        self.inner.call(inv).await
    }

    /// Runs a prepared script invocation, bounded by the timeout and the
    /// breaker like every decision (the capacity pools' calls).
    pub async fn invoke<T: FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.inner.call(inv).await
    }

    /// A store for `settings`; connects on first use, so turnstile starts
    /// (and follows `on_error`) even while Redis is down.
    pub fn new(settings: RedisSettings, clock: Arc<dyn Clock>) -> Self {
        let instance = {
            let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
            keys::hex16(&Sha256::digest(seed.as_bytes()))
        };
        let settings_cluster = settings.cluster;
        let inner = Arc::new(Inner {
            settings,
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            breaker: Breaker {
                started: Instant::now(),
                open_until_ms: AtomicU64::new(0),
                probing: AtomicBool::new(false),
            },
            decide: Script::new(concat!(with_kinds!("lua/decide.lua"), "return decide()\n")),
            refund: Script::new(with_kinds!("lua/refund.lua")),
            settle: Script::new(with_kinds!("lua/settle.lua")),
            balance: Script::new(with_kinds!("lua/balance.lua")),
            renew: Script::new(include_str!("lua/renew.lua")),
            job: Script::new(include_str!("lua/job.lua")),
            job_index: Script::new(include_str!("lua/job_index.lua")),
            instance,
            seq: AtomicU64::new(0),
            held: DashMap::new(),
            jobs_gauge: AtomicI64::new(0),
            jobs_expired: AtomicU64::new(0),
            fallback: MemoryStore::new(clock.clone()),
            unsynced: std::sync::Mutex::new(std::collections::HashMap::new()),
            replays: std::sync::Mutex::new(Vec::new()),
            has_unsynced: AtomicBool::new(false),
            reconciling: AtomicBool::new(false),
            reconcile: Script::new(with_kinds!("lua/reconcile.lua")),
            clock,
            epoch: std::sync::Mutex::new(None),
            lost: AtomicBool::new(false),
            skew_us: AtomicI64::new(i64::MIN),
            library: functions::Library::new(!settings_cluster),
            journal: JournalSlot::new(),
            ledger: ledger::Scripts::new(),
        });
        Self { inner }
    }

    /// Renews this instance's leases every third of the lease time, until
    /// the returned task is aborted.
    pub fn spawn_renewal(&self) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let every = inner.settings.lease / 3;
            let lease_ms = inner.settings.lease.as_millis() as u64;
            loop {
                tokio::time::sleep(every).await;
                let held: Vec<(String, Vec<String>)> =
                    inner.held.iter().map(|e| e.value().clone()).collect();
                for (id, keys) in held {
                    for key in keys {
                        let mut inv = inner.renew.prepare_invoke();
                        inv.key(&key).arg(&id).arg(lease_ms);
                        let _ = inner.call::<i64>(inv).await;
                    }
                }
            }
        })
    }

    /// Whether Redis answered the last call (the breaker is closed).
    pub fn is_up(&self) -> bool {
        !self.inner.breaker.is_open() && !self.lost()
    }

    /// What happens while Redis is down.
    pub fn on_error(&self) -> OnError {
        self.inner.settings.on_error
    }

    /// The per-instance store used by `on_error = "local"`.
    pub fn fallback(&self) -> &MemoryStore {
        &self.inner.fallback
    }

    async fn decide_once(
        &self,
        checks: &[LimitCheck<'_>],
        dry_run: bool,
        origin: Option<&Arc<Origin>>,
    ) -> Result<Decision, StoreError> {
        let inner = &self.inner;
        let lease_id = format!(
            "{}:{}",
            inner.instance,
            inner.seq.fetch_add(1, Ordering::Relaxed)
        );
        let keys: Vec<String> = checks.iter().map(|c| inner.key(c)).collect();
        let mut inv = functions::Call::default();
        for key in &keys {
            inv.key(key);
        }
        inv.arg(if dry_run { 1 } else { 0 })
            .arg(&lease_id)
            .arg(inner.settings.lease.as_millis() as u64)
            .arg(checks.len())
            .arg(inner.deadline_us());
        for c in checks {
            let (kind, a, b) = c.rule.redis_args();
            inv.arg(kind)
                .arg(a)
                .arg(b)
                .arg(c.units)
                .arg(u8::from(c.shadow));
        }
        inner.ledger_args(
            &mut inv,
            origin.map(|o| &**o),
            checks.iter().map(|c| (&c.subject, c.counter, c.rule)),
        );
        let out = inner.decide_call(&inv).await?;
        let (admitted, now, expired, written, verdicts) = parse_decision(&out, checks.len())?;
        inner.skew_us.store(
            (now / 1_000) as i64 - inner.breaker.now_us(),
            Ordering::Relaxed,
        );
        if expired > 0 {
            inner.jobs_expired.fetch_add(expired, Ordering::Relaxed);
            inner
                .jobs_gauge
                .fetch_sub(expired as i64, Ordering::Relaxed);
        }
        let lease = match admitted && !dry_run {
            true => inner.held_for(checks, keys, &lease_id, origin),
            false => Lease::default(),
        };
        Ok(Decision {
            now,
            admitted,
            verdicts,
            lease,
            written,
        })
    }

    /// The limits' figures without counting anything (admin usage).
    pub async fn usage(&self, checks: &[LimitCheck<'_>]) -> Result<Vec<Verdict>, StoreError> {
        let d = self.decide_once(checks, true, None).await?;
        Ok(d.verdicts
            .into_iter()
            .zip(checks)
            .map(|(v, c)| v.uncounted(c.units))
            .collect())
    }

    /// Deletes the window counters of `checks` (slots in use are kept).
    pub async fn reset(&self, checks: &[LimitCheck<'_>]) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let mut deleted = 0;
        for c in checks.iter().filter(|c| c.rule.is_quota()) {
            let Some(mut conn) = inner.connection().await else {
                return Err(StoreError::Unavailable("cannot connect to redis".into()));
            };
            let cmd = redis::cmd("DEL").arg(inner.key(c)).to_owned();
            let n: redis::RedisResult<i64> = match &mut conn {
                Conn::Single(x) => cmd.query_async(x).await,
                Conn::Cluster(x) => cmd.query_async(x).await,
            };
            deleted += n.map_err(|e| StoreError::Unavailable(e.to_string()))? as usize;
        }
        Ok(deleted)
    }
}

impl Inner {
    /// When a decision sent now must have run by, on Redis's clock: half
    /// the timeout later. A call that times out falls back to `on_error`;
    /// without a deadline the script could still run when Redis resumes
    /// (a pause, a long fork) and count the request a second time.
    fn deadline_us(&self) -> i64 {
        match self.skew_us.load(Ordering::Relaxed) {
            i64::MIN => 0,
            skew => {
                let half = (self.settings.timeout.as_micros() / 2) as i64;
                self.breaker.now_us() + skew + half
            }
        }
    }
}

impl RedisStore {
    /// Ends job `id` in whichever of `counters` holds it; true if one did.
    pub async fn end_job(
        &self,
        counters: &[OwnedCheck],
        id: &str,
        how: How,
        origin: Option<&Origin>,
    ) -> Result<bool, StoreError> {
        let ended = self.end_job_now(counters, id, how, origin).await;
        if let Err(StoreError::NotSent(_)) = &ended {
            self.replay_later(outage::Replay::EndJob {
                counters: counters.to_vec(),
                id: id.to_owned(),
                how,
                origin: origin.cloned(),
            });
        }
        ended
    }

    pub(super) async fn end_job_now(
        &self,
        counters: &[OwnedCheck],
        id: &str,
        how: How,
        origin: Option<&Origin>,
    ) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let mut ended = false;
        for c in counters {
            let mut inv = inner.job.prepare_invoke();
            inv.key(inner.key(&c.check()))
                .arg("end")
                .arg(id)
                .arg(how.as_str())
                .arg("");
            inner.job_ledger_args(&mut inv, &c.subject.text(), c.counter, origin);
            if inner.call::<i64>(inv).await? > 0 {
                inner.jobs_gauge.fetch_sub(1, Ordering::Relaxed);
                ended = true;
            }
        }
        Ok(ended)
    }

    /// The jobs in progress on one counter, oldest first.
    pub async fn jobs(&self, counter: &OwnedCheck) -> Result<Vec<Job>, StoreError> {
        let inner = &self.inner;
        let Some(mut conn) = inner.connection().await else {
            return Err(StoreError::Unavailable("cannot connect to redis".into()));
        };
        let cmd = redis::cmd("ZRANGE")
            .arg(inner.key(&counter.check()))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .to_owned();
        let query = async {
            match &mut conn {
                Conn::Single(x) => cmd.query_async::<Vec<(String, f64)>>(x).await,
                Conn::Cluster(x) => cmd.query_async::<Vec<(String, f64)>>(x).await,
            }
        };
        let members = tokio::time::timeout(inner.settings.timeout, query)
            .await
            .map_err(|_| StoreError::Unavailable("redis timed out".into()))?
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let now = inner.clock.now();
        let duration = counter.max_duration();
        Ok(members
            .into_iter()
            .filter_map(|(member, score)| {
                let id = member.strip_prefix("j:")?;
                let expires = (score.max(0.0) as u64).saturating_mul(1_000_000);
                (expires > now).then(|| Job {
                    id: id.into(),
                    started: expires.saturating_sub(duration),
                    expires,
                })
            })
            .collect())
    }

    /// Settles a request admitted at `at` (see [`CounterStore::settle`](super::CounterStore::settle)),
    /// one script for every check.
    pub async fn settle(
        &self,
        checks: &[OwnedCheck],
        at: Nanos,
        delta: i64,
        origin: Option<&Origin>,
    ) -> Result<(), StoreError> {
        match self.settle_now(checks, at, delta, origin).await {
            Err(StoreError::NotSent(_)) => {
                self.replay_later(outage::Replay::Settle {
                    checks: checks.to_vec(),
                    at,
                    delta,
                    origin: origin.cloned(),
                });
                Ok(())
            }
            done => done,
        }
    }

    pub(super) async fn settle_now(
        &self,
        checks: &[OwnedCheck],
        at: Nanos,
        delta: i64,
        origin: Option<&Origin>,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut inv = inner.settle.prepare_invoke();
        for c in checks {
            inv.key(inner.key(&c.check()));
        }
        inv.arg(at / 1_000)
            .arg(delta.signum())
            .arg(delta.unsigned_abs())
            .arg(checks.len());
        for c in checks {
            let (kind, a, b) = c.rule.redis_args();
            inv.arg(kind).arg(a).arg(b);
        }
        inner.ledger_args(
            &mut inv,
            origin,
            checks.iter().map(|c| (&c.subject, c.counter, &c.rule)),
        );
        inner.call::<i64>(inv).await.map(|_| ())
    }

    /// Applies `change` to the shared balance of `check` in one script; the balance after it.
    pub async fn balance(
        &self,
        check: &OwnedCheck,
        change: BalanceChange,
    ) -> Result<i64, StoreError> {
        let inner = &self.inner;
        let (op, n) = match change {
            BalanceChange::Read => ("read", 0),
            BalanceChange::Add(n) => ("add", n),
            BalanceChange::Set(n) => ("set", n),
        };
        let (_, a, b) = check.rule.redis_args();
        let mut inv = inner.balance.prepare_invoke();
        inv.key(inner.key(&check.check()))
            .arg(op)
            .arg(n)
            .arg(a)
            .arg(b);
        if change != BalanceChange::Read {
            let check = (&check.subject, check.counter, &check.rule);
            inner.ledger_args(&mut inv, None, std::iter::once(check));
        }
        inner.call::<i64>(inv).await
    }

    /// Jobs this instance saw start minus those it saw end or expire.
    pub fn jobs_in_progress(&self) -> i64 {
        self.inner.jobs_gauge.load(Ordering::Relaxed)
    }

    /// Jobs this instance's decisions found expired, since start.
    pub fn jobs_expired(&self) -> u64 {
        self.inner.jobs_expired.load(Ordering::Relaxed)
    }
}

/// `(admitted, now, jobs expired, ledger position, verdicts)` from the
/// decide script's reply.
type Decided = (bool, Nanos, u64, u64, Verdicts);

fn parse_decision(out: &[i64], n: usize) -> Result<Decided, StoreError> {
    if out == [-1] {
        return Err(StoreError::Unavailable(
            "redis ran the decision after its deadline: nothing counted".into(),
        ));
    }
    if out.len() != 5 + 6 * n {
        return Err(StoreError::Unavailable(format!(
            "unexpected reply from the decide script ({} values)",
            out.len()
        )));
    }
    let us = |v: i64| (v.max(0) as u64).saturating_mul(1_000);
    // A balance may be negative: figures shown are never below 0.
    let figure = |v: i64| v.clamp(0, i64::from(u32::MAX)) as u32;
    let verdicts = out[5..]
        .chunks(6)
        .map(|v| Verdict {
            admitted: v[0] == 1,
            limit: figure(v[1]),
            used: figure(v[2]),
            remaining: figure(v[3]),
            reset_at: us(v[4]),
            retry_at: us(v[5]),
        })
        .collect();
    let written = match (out[3].max(0) as u64, out[4].max(0) as u64) {
        (0, _) => 0,
        (ms, seq) => stream_position(ms, seq),
    };
    Ok((
        out[0] == 1,
        us(out[1]),
        out[2].max(0) as u64,
        written,
        verdicts,
    ))
}

impl Store for RedisStore {
    /// With a ledger, the events of the decision are in its stream
    /// (`written`: the last one's position).
    async fn decide(
        &self,
        checks: &[LimitCheck<'_>],
        origin: Option<&Arc<Origin>>,
    ) -> Result<Decision, StoreError> {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let d = match self.decide_once(checks, false, origin).await {
                Ok(d) => d,
                Err(e) => return self.fall_back(checks, e).await,
            };
            self.reconcile_soon();
            if d.admitted {
                return Ok(d);
            }
            // A request refused only by a queued concurrency limit waits,
            // retrying until a slot frees or max_wait passes.
            let refusing: Vec<usize> = (0..checks.len())
                .filter(|&i| !d.verdicts[i].admitted && !checks[i].shadow)
                .collect();
            let queue = match refusing[..] {
                [i] if checks[i].rule.holds_slot() => checks[i].queue,
                _ => None,
            };
            let Some(q) = queue else { return Ok(d) };
            let deadline =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + q.max_wait);
            if tokio::time::Instant::now() + QUEUE_POLL > deadline {
                return Ok(d);
            }
            tokio::time::sleep(QUEUE_POLL).await;
        }
    }

    async fn refund(
        &self,
        checks: &[LimitCheck<'_>],
        at: Nanos,
        origin: Option<&Arc<Origin>>,
    ) -> Result<(), StoreError> {
        let origin = origin.map(|o| &**o);
        match self.refund_now(checks, at, origin).await {
            Err(StoreError::NotSent(_)) => {
                let checks = checks.iter().map(OwnedCheck::of).collect();
                let origin = origin.cloned();
                self.replay_later(outage::Replay::Refund { checks, at, origin });
                Ok(())
            }
            done => done,
        }
    }
}

impl RedisStore {
    pub(super) async fn refund_now(
        &self,
        checks: &[LimitCheck<'_>],
        at: Nanos,
        origin: Option<&Origin>,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut inv = inner.refund.prepare_invoke();
        for c in checks {
            inv.key(inner.key(c));
        }
        inv.arg(at / 1_000).arg(checks.len());
        for c in checks {
            let (kind, a, b) = c.rule.redis_args();
            inv.arg(kind).arg(a).arg(b).arg(c.units);
        }
        inner.ledger_args(
            &mut inv,
            origin,
            checks.iter().map(|c| (&c.subject, c.counter, c.rule)),
        );
        inner.call::<i64>(inv).await.map(|_| ())
    }
}
