//! Pools in Redis: one pool and one order for every instance
//! (`lua/capacity.lua`, docs/capacity.md "Across instances"). Each call is
//! one script on the pool's keys: taking a slot, queueing, claiming a slot
//! granted to a waiter, leaving, releasing, binding a slot to a job,
//! ending one. A freed slot is granted by the script that freed it, to the
//! next waiter in fair order whichever instance it waits on, and announced
//! on the pool's channel: the waiting instance wakes at once and claims it
//! (a poll every [`POLL`] covers a lost message). In-flight and granted
//! slots are leases this instance renews, so an instance that dies frees
//! its slots within the lease; a waiter's entry lasts its `max_wait`.
//!
//! While Redis cannot decide, `on_error = "local"` takes slots from a pool
//! of this instance ([`MemoryPools`]), `"allow"` admits without a slot,
//! `"deny"` refuses.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use redis::Script;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::memory::MemoryPools;
use super::{busy, subject_bytes, Asker, PoolSpec, PoolUsage, Refused};
use crate::clock::Clock;
use crate::store::{BindJob, OnError, RedisStore, StoreError, Subject};

/// How often a waiter asks whether it was granted a slot, in case the
/// announcement was lost.
const POLL: Duration = Duration::from_millis(100);

struct Inner {
    store: RedisStore,
    script: Script,
    /// The configured pools by name, as their script calls see them.
    pools: Mutex<HashMap<Arc<str>, Arc<Pool>>>,
    /// In-flight slots this instance renews: handle -> (pool key, member).
    held: DashMap<u64, (String, String)>,
    seq: AtomicU64,
    /// Waiters of this instance by id, woken by the pool's channel.
    wakers: DashMap<String, Arc<Notify>>,
    listening: OnceLock<()>,
    fallback: MemoryPools,
}

/// A pool as its script calls see it, made once per config: its key and
/// the arguments every call repeats (max, lease, each plan's weight and
/// reserve).
struct Pool {
    spec: Arc<PoolSpec>,
    key: String,
    head: Vec<String>,
}

impl Pool {
    fn new(spec: &Arc<PoolSpec>, prefix: &str, lease: Duration) -> Self {
        let digest = hex::encode(&Sha256::digest(spec.name.as_bytes())[..8]);
        let mut head = vec![
            spec.max.to_string(),
            lease.as_millis().to_string(),
            spec.plans.len().to_string(),
        ];
        for plan in &spec.plans {
            head.push(plan.to_string());
            head.push(spec.weight(plan).to_string());
            head.push(spec.reserved(plan).to_string());
        }
        Self {
            spec: spec.clone(),
            key: format!("{prefix}{{cap:{digest}}}"),
            head,
        }
    }
}

/// Pools shared through Redis.
pub(super) struct RedisPools {
    inner: Arc<Inner>,
}

/// What a script call asks of one pool.
enum Op<'a> {
    Acquire {
        asker: &'a Asker,
        member: &'a str,
    },
    Claim(&'a str),
    Leave(&'a str),
    Release(&'a str),
    Bind {
        member: &'a str,
        id: &'a str,
        owner: &'a str,
    },
    End {
        id: &'a str,
        owner: &'a str,
    },
    Renew(Vec<String>),
    Usage,
}

/// A subject as the pool's keys and owners name it.
fn subject_text(s: &Subject) -> String {
    String::from_utf8_lossy(&subject_bytes(s)).into_owned()
}

impl Inner {
    fn lease(&self) -> Duration {
        self.store.settings().lease
    }

    /// The pool `spec` configures (made afresh for a spec a reload replaced
    /// while a request still held it).
    fn pool(&self, spec: &PoolSpec) -> Arc<Pool> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        match pools.get(&spec.name) {
            Some(p) if std::ptr::eq(Arc::as_ptr(&p.spec), spec) => p.clone(),
            _ => Arc::new(Pool::new(
                &Arc::new(spec.clone()),
                self.store.prefix(),
                self.lease(),
            )),
        }
    }

    /// Every configured pool.
    fn all(&self) -> Vec<Arc<Pool>> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.values().cloned().collect()
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        spec: &PoolSpec,
        op: Op<'_>,
    ) -> Result<T, StoreError> {
        let pool = self.pool(spec);
        let mut inv = self.script.prepare_invoke();
        inv.key(&pool.key);
        let name = match &op {
            Op::Acquire { .. } => "acquire",
            Op::Claim(_) => "claim",
            Op::Leave(_) => "leave",
            Op::Release(_) => "release",
            Op::Bind { .. } => "bind",
            Op::End { .. } => "end",
            Op::Renew(_) => "renew",
            Op::Usage => "usage",
        };
        inv.arg(name);
        for a in &pool.head {
            inv.arg(a);
        }
        match op {
            Op::Acquire { asker, member } => {
                inv.arg(&*asker.plan)
                    .arg(subject_text(&asker.fair))
                    .arg(member)
                    .arg(spec.max_wait.as_millis() as u64)
                    .arg(spec.max_queue);
            }
            Op::Claim(w) | Op::Leave(w) | Op::Release(w) => {
                inv.arg(w);
            }
            Op::Bind { member, id, owner } => {
                inv.arg(member)
                    .arg(id)
                    .arg(owner)
                    .arg(spec.max_duration.as_millis() as u64);
            }
            Op::End { id, owner } => {
                inv.arg(id).arg(owner);
            }
            Op::Renew(members) => {
                for m in &members {
                    inv.arg(m);
                }
            }
            Op::Usage => {}
        }
        self.store.invoke(inv).await
    }

    /// Slot `member` of `spec`, held for `asker` and renewed from now on.
    fn hold(self: &Arc<Self>, handle: u64, spec: &PoolSpec, member: String, asker: &Asker) -> Held {
        self.held
            .insert(handle, (self.pool(spec).key.clone(), member.clone()));
        Held {
            inner: Some(self.clone()),
            handle,
            pool: spec.name.clone(),
            member,
            owner: subject_text(&asker.owner),
            local: None,
        }
    }

    fn spec(&self, name: &str) -> Option<Arc<PoolSpec>> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.get(name).map(|p| p.spec.clone())
    }

    /// Gives back what `handle` holds, in the background (a lease not
    /// renewed frees itself if Redis cannot be reached).
    fn release(self: &Arc<Self>, handle: u64, pool: &Arc<str>) {
        let Some((_, (_, member))) = self.held.remove(&handle) else {
            return;
        };
        let (Some(spec), Ok(rt)) = (self.spec(pool), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let inner = self.clone();
        rt.spawn(async move {
            if let Err(e) = inner.call::<i64>(&spec, Op::Release(&member)).await {
                tracing::debug!(error = %e, "capacity slot not released: its lease frees it");
            }
        });
    }

    /// Listens to every pool's channel and wakes the waiter named, for as
    /// long as the process runs (reconnecting after an error).
    fn listen(self: &Arc<Self>) {
        if self.listening.set(()).is_err() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = Arc::downgrade(self);
        let url = self.store.settings().url.clone();
        let pattern = format!("{}{{cap:*}}:wake", self.store.prefix());
        rt.spawn(async move {
            use futures_util::StreamExt;
            loop {
                let subscribed = async {
                    let client = redis::Client::open(url.as_str())?;
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.psubscribe(&pattern).await?;
                    Ok::<_, redis::RedisError>(pubsub.into_on_message())
                };
                match subscribed.await {
                    Ok(mut messages) => {
                        while let Some(msg) = messages.next().await {
                            let Some(inner) = inner.upgrade() else { return };
                            if let Ok(w) = msg.get_payload::<String>() {
                                if let Some(n) = inner.wakers.get(&w) {
                                    n.notify_one();
                                }
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "capacity wake-ups not subscribed"),
                }
                if inner.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

impl RedisPools {
    pub(super) fn new(store: RedisStore, clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                script: Script::new(include_str!("lua/capacity.lua")),
                pools: Mutex::new(HashMap::new()),
                held: DashMap::new(),
                seq: AtomicU64::new(0),
                wakers: DashMap::new(),
                listening: OnceLock::new(),
                fallback: MemoryPools::new(clock),
            }),
        }
    }

    pub(super) fn lease(&self) -> Duration {
        self.inner.lease()
    }

    pub(super) fn configure(&self, specs: &[Arc<PoolSpec>]) {
        let inner = &self.inner;
        let mut pools = inner.pools.lock().unwrap_or_else(|e| e.into_inner());
        for spec in specs {
            let pool = Pool::new(spec, inner.store.prefix(), inner.lease());
            pools.insert(spec.name.clone(), Arc::new(pool));
        }
        drop(pools);
        self.inner.fallback.configure(specs);
    }

    pub(super) async fn acquire(
        &self,
        spec: &Arc<PoolSpec>,
        asker: &Asker,
    ) -> Result<Held, Refused> {
        let inner = &self.inner;
        inner.listen();
        let handle = inner.seq.fetch_add(1, Ordering::Relaxed);
        let member = format!("s|{}:{handle}", inner.store.instance());
        // Registered before the call: renewed even if the answer is slow.
        let mut held = inner.hold(handle, spec, member, asker);
        let answer: Vec<redis::Value> = match inner
            .call(
                spec,
                Op::Acquire {
                    asker,
                    member: &held.member,
                },
            )
            .await
        {
            Ok(a) => a,
            Err(e) => {
                inner.held.remove(&handle);
                held.inner = None;
                return self.unreachable(spec, asker, e).await;
            }
        };
        let code: i64 = answer
            .first()
            .and_then(|v| redis::from_redis_value_ref(v).ok())
            .unwrap_or(0);
        match code {
            1 => Ok(held),
            2 => {
                let waiter: String = answer
                    .get(1)
                    .and_then(|v| redis::from_redis_value_ref(v).ok())
                    .unwrap_or_default();
                inner.held.remove(&handle);
                held.inner = None;
                self.wait(spec, asker, waiter).await
            }
            _ => {
                inner.held.remove(&handle);
                held.inner = None;
                let waiting = answer
                    .get(1)
                    .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
                    .unwrap_or(0);
                Err(busy(spec, waiting))
            }
        }
    }

    /// Redis could not decide: what `on_error` says.
    async fn unreachable(
        &self,
        spec: &Arc<PoolSpec>,
        asker: &Asker,
        e: StoreError,
    ) -> Result<Held, Refused> {
        match self.inner.store.on_error() {
            OnError::Local => {
                let local = self.inner.fallback.acquire(spec, asker).await?;
                Ok(Held {
                    inner: None,
                    handle: 0,
                    pool: spec.name.clone(),
                    member: String::new(),
                    owner: subject_text(&asker.owner),
                    local: Some(local),
                })
            }
            OnError::Allow => Ok(Held {
                inner: None,
                handle: 0,
                pool: spec.name.clone(),
                member: String::new(),
                owner: String::new(),
                local: None,
            }),
            OnError::Deny => Err(Refused::Store(e)),
        }
    }

    /// Waits for the slot the pool grants waiter `w`, up to `max_wait`.
    async fn wait(&self, spec: &Arc<PoolSpec>, asker: &Asker, w: String) -> Result<Held, Refused> {
        let inner = &self.inner;
        let notify = Arc::new(Notify::new());
        inner.wakers.insert(w.clone(), notify.clone());
        let mut queued = Queued {
            inner: inner.clone(),
            spec: spec.clone(),
            waiter: Some(w.clone()),
        };
        let deadline = tokio::time::Instant::now() + spec.max_wait;
        let mut out_of_time = false;
        loop {
            let answer: Result<Vec<redis::Value>, StoreError> =
                inner.call(spec, Op::Claim(&w)).await;
            let answer = answer.unwrap_or_default();
            let code: i64 = answer
                .first()
                .and_then(|v| redis::from_redis_value_ref(v).ok())
                .unwrap_or(2);
            if code == 1 {
                let member: String = answer
                    .get(1)
                    .and_then(|v| redis::from_redis_value_ref(v).ok())
                    .unwrap_or_default();
                queued.waiter = None;
                inner.wakers.remove(&w);
                let handle = inner.seq.fetch_add(1, Ordering::Relaxed);
                return Ok(inner.hold(handle, spec, member, asker));
            }
            if code == 0 || out_of_time {
                inner.wakers.remove(&w);
                // Out of the queue now (a slot granted meanwhile goes to
                // the next); if this fails, dropping `queued` tries again.
                if inner.call::<i64>(spec, Op::Leave(&w)).await.is_ok() {
                    queued.waiter = None;
                }
                drop(queued);
                // The refusal shows how many still wait.
                let figures: Result<Vec<u64>, StoreError> = inner.call(spec, Op::Usage).await;
                let waiting = figures.map_or(0, |f| f.iter().skip(2).sum());
                return Err(busy(spec, waiting));
            }
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = tokio::time::sleep_until(deadline) => out_of_time = true,
            }
        }
    }

    pub(super) async fn end_job(
        &self,
        id: &str,
        owner: Option<&Subject>,
    ) -> Result<Vec<Arc<str>>, StoreError> {
        let owner = owner.map(subject_text).unwrap_or_default();
        let mut ended = Vec::new();
        for pool in self.inner.all() {
            let n: i64 = self
                .inner
                .call(&pool.spec, Op::End { id, owner: &owner })
                .await?;
            if n == 1 {
                ended.push(pool.spec.name.clone());
            }
        }
        let local = self.inner.fallback.end_job(id, None);
        ended.extend(
            local
                .into_iter()
                .filter(|p| !ended.contains(p))
                .collect::<Vec<_>>(),
        );
        Ok(ended)
    }

    pub(super) async fn usage(&self) -> Result<Vec<PoolUsage>, StoreError> {
        let mut specs: Vec<Arc<PoolSpec>> = self
            .inner
            .all()
            .into_iter()
            .map(|p| p.spec.clone())
            .collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            let figures: Vec<u64> = self.inner.call(&spec, Op::Usage).await?;
            let waiting = spec
                .plans
                .iter()
                .enumerate()
                .map(|(i, p)| (p.clone(), figures.get(2 + i).copied().unwrap_or(0)))
                .collect();
            out.push(PoolUsage {
                name: spec.name.clone(),
                max: spec.max,
                in_use: figures.first().copied().unwrap_or(0),
                jobs: figures.get(1).copied().unwrap_or(0),
                waiting,
            });
        }
        Ok(out)
    }

    /// Frees what expired and hands it out (every pool's `usage` does).
    pub(super) async fn tick(&self) -> Result<Vec<PoolUsage>, StoreError> {
        self.inner.fallback.sweep();
        self.usage().await
    }

    pub(super) async fn renew(&self) {
        let mut by_pool: HashMap<String, Vec<String>> = HashMap::new();
        for e in self.inner.held.iter() {
            let (key, member) = e.value();
            by_pool.entry(key.clone()).or_default().push(member.clone());
        }
        for pool in self.inner.all() {
            if let Some(members) = by_pool.remove(&pool.key) {
                let _ = self.inner.call::<i64>(&pool.spec, Op::Renew(members)).await;
            }
        }
    }
}

/// A waiter in a Redis pool's queue: dropped before it got its slot (the
/// client left), it leaves the queue — or gives back a slot granted to it
/// meanwhile — in the background.
struct Queued {
    inner: Arc<Inner>,
    spec: Arc<PoolSpec>,
    waiter: Option<String>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let Some(w) = self.waiter.take() else { return };
        self.inner.wakers.remove(&w);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (inner, spec) = (self.inner.clone(), self.spec.clone());
        rt.spawn(async move {
            let _ = inner.call::<i64>(&spec, Op::Leave(&w)).await;
        });
    }
}

/// A slot of a Redis pool (or, while Redis was unreachable, of this
/// instance's fallback pool, or none under `on_error = "allow"`).
pub(super) struct Held {
    inner: Option<Arc<Inner>>,
    handle: u64,
    pool: Arc<str>,
    member: String,
    owner: String,
    local: Option<super::memory::Held>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.release(self.handle, &self.pool);
        }
    }
}

impl BindJob for Held {
    fn bind(
        mut self: Box<Self>,
        id: &str,
    ) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + '_>> {
        Box::pin(async move {
            if let Some(local) = self.local.take() {
                return Box::new(local).bind(id).await;
            }
            let Some(inner) = self.inner.take() else {
                return Ok(());
            };
            // No longer renewed: the job's expiry replaces the lease.
            inner.held.remove(&self.handle);
            let Some(spec) = inner.spec(&self.pool) else {
                return Ok(());
            };
            let op = Op::Bind {
                member: &self.member,
                id,
                owner: &self.owner,
            };
            inner.call::<i64>(&spec, op).await.map(|_| ())
        })
    }
}
