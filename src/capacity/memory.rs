//! Pools in this process: a count of slots taken, the jobs holding slots,
//! and the waiters in fair order ([`super::fair`]). A freed slot goes
//! straight to the next waiter through its channel; a waiter that gave up
//! (timed out, client gone) leaves the queue, and a slot sent to it just
//! as it left comes back.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::fair::{FairQueue, Ticket};
use super::{busy, nanos, subject_bytes, Asker, PoolSpec, PoolUsage, Refused};
use crate::clock::{Clock, Nanos};
use crate::store::{BindJob, StoreError, Subject};

/// A job holding a slot.
struct HeldJob {
    plan: Arc<str>,
    owner: Subject,
    expires: Nanos,
}

/// One pool's state.
struct State {
    spec: Arc<PoolSpec>,
    in_use: u32,
    /// Slots held, by plan (for `reserve`).
    held: HashMap<Arc<str>, u32>,
    /// Plan names by their index in `queue`.
    plans: Vec<Arc<str>>,
    queue: FairQueue<oneshot::Sender<Held>>,
    jobs: HashMap<Box<str>, HeldJob>,
    /// The earliest expiry among `jobs` (`Nanos::MAX`: none).
    next_expiry: Nanos,
}

impl State {
    fn plan_index(&mut self, plan: &Arc<str>) -> usize {
        if let Some(i) = self.plans.iter().position(|p| p == plan) {
            return i;
        }
        self.plans.push(plan.clone());
        let i = self.plans.len() - 1;
        self.queue.set_weight(i, self.spec.weight(plan));
        i
    }

    fn may_take(&self, plan: &str) -> bool {
        self.spec.may_take(plan, self.in_use, |p| {
            self.held.get(p).copied().unwrap_or(0)
        })
    }

    fn take(&mut self, plan: &Arc<str>) {
        self.in_use += 1;
        *self.held.entry(plan.clone()).or_default() += 1;
    }

    fn give_back(&mut self, plan: &str) {
        self.in_use = self.in_use.saturating_sub(1);
        if let Some(n) = self.held.get_mut(plan) {
            *n = n.saturating_sub(1);
        }
    }
}

/// One pool, shared by its slots.
pub(super) struct Pool {
    state: Mutex<State>,
    clock: Arc<dyn Clock>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding it left counts that are still whole numbers.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// Hands free slots to waiters in fair order. Slots sent to a waiter
    /// that just left come back: they are returned to be dropped once the
    /// lock is released (their drop gives them back and dispatches again).
    fn dispatch(self: &Arc<Self>, s: &mut State) -> Vec<Held> {
        let mut returned = Vec::new();
        while !s.queue.is_empty() {
            let eligible: Vec<bool> = s.plans.iter().map(|p| s.may_take(p)).collect();
            let Some((i, tx)) = s.queue.pop(|i| eligible.get(i).copied().unwrap_or(false)) else {
                break;
            };
            let plan = s.plans[i].clone();
            s.take(&plan);
            let held = Held {
                pool: Some(self.clone()),
                plan,
                owner: None,
            };
            if let Err(held) = tx.send(held) {
                returned.push(held);
            }
        }
        returned
    }

    /// Frees the slots of expired jobs.
    fn expire(&self, s: &mut State) {
        let now = self.clock.now();
        if now < s.next_expiry {
            return;
        }
        let gone: Vec<Box<str>> = s
            .jobs
            .iter()
            .filter(|(_, j)| j.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(j) = s.jobs.remove(&id) {
                s.give_back(&j.plan);
            }
        }
        s.next_expiry = s
            .jobs
            .values()
            .map(|j| j.expires)
            .min()
            .unwrap_or(Nanos::MAX);
    }

    fn release(self: &Arc<Self>, plan: &str) {
        let returned = {
            let mut s = lock(&self.state);
            s.give_back(plan);
            self.dispatch(&mut s)
        };
        drop(returned);
    }
}

/// A slot taken in a memory pool.
pub(super) struct Held {
    /// `None` once bound to a job (the job holds it).
    pool: Option<Arc<Pool>>,
    plan: Arc<str>,
    /// The caller whose poll may end the job.
    owner: Option<Subject>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.release(&self.plan);
        }
    }
}

impl BindJob for Held {
    fn bind(
        mut self: Box<Self>,
        id: &str,
    ) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + '_>> {
        if let Some(pool) = self.pool.take() {
            let owner = self.owner.take().unwrap_or(Subject::Account("".into()));
            let replaced = {
                let mut s = lock(&pool.state);
                let expires = pool.clock.now().saturating_add(nanos(s.spec.max_duration));
                s.next_expiry = s.next_expiry.min(expires);
                let old = s.jobs.insert(
                    id.into(),
                    HeldJob {
                        plan: self.plan.clone(),
                        owner,
                        expires,
                    },
                );
                // The same id twice holds one slot, not two.
                old.map(|old| {
                    s.give_back(&old.plan);
                    pool.dispatch(&mut s)
                })
            };
            drop(replaced);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Every pool of this process.
pub(super) struct MemoryPools {
    pools: Mutex<HashMap<Arc<str>, Arc<Pool>>>,
    clock: Arc<dyn Clock>,
}

impl MemoryPools {
    pub(super) fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            pools: Mutex::new(HashMap::new()),
            clock,
        }
    }

    fn all(&self) -> Vec<Arc<Pool>> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.values().cloned().collect()
    }

    pub(super) fn configure(&self, specs: &[Arc<PoolSpec>]) {
        for spec in specs {
            let pool = self.pool(spec);
            let returned = {
                let mut s = lock(&pool.state);
                s.spec = spec.clone();
                for (i, plan) in s.plans.clone().iter().enumerate() {
                    s.queue.set_weight(i, spec.weight(plan));
                }
                // A larger max frees slots for those waiting.
                pool.dispatch(&mut s)
            };
            drop(returned);
        }
    }

    /// The pool named by `spec`, made on first use.
    fn pool(&self, spec: &Arc<PoolSpec>) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let pool = pools.entry(spec.name.clone()).or_insert_with(|| {
            Arc::new(Pool {
                state: Mutex::new(State {
                    spec: spec.clone(),
                    in_use: 0,
                    held: HashMap::new(),
                    plans: Vec::new(),
                    queue: FairQueue::default(),
                    jobs: HashMap::new(),
                    next_expiry: Nanos::MAX,
                }),
                clock: self.clock.clone(),
            })
        });
        pool.clone()
    }

    pub(super) async fn acquire(
        &self,
        spec: &Arc<PoolSpec>,
        asker: &Asker,
    ) -> Result<Held, Refused> {
        let pool = self.pool(spec);
        // Slots of jobs past max_duration go to those already waiting first.
        let returned = {
            let mut s = lock(&pool.state);
            pool.expire(&mut s);
            pool.dispatch(&mut s)
        };
        drop(returned);
        let (rx, ticket) = {
            let mut s = lock(&pool.state);
            if s.may_take(&asker.plan) {
                s.take(&asker.plan);
                return Ok(Held {
                    pool: Some(pool.clone()),
                    plan: asker.plan.clone(),
                    owner: Some(asker.owner.clone()),
                });
            }
            let waiting = s.queue.len() as u64;
            if spec.max_wait.is_zero() || waiting >= u64::from(spec.max_queue) {
                return Err(busy(spec, waiting));
            }
            let (tx, rx) = oneshot::channel();
            let plan = s.plan_index(&asker.plan);
            let ticket = s.queue.push(plan, &subject_bytes(&asker.fair), tx);
            (rx, ticket)
        };
        let mut waiting = Waiting {
            pool: &pool,
            ticket: Some(ticket),
        };
        let got = tokio::time::timeout(spec.max_wait, rx).await;
        let mut held = match got {
            Ok(Ok(held)) => {
                waiting.ticket = None;
                held
            }
            _ => {
                // Out of time. A slot sent just now is in the channel,
                // dropped with it: given back, to the next waiter.
                waiting.leave();
                return Err(busy(spec, lock(&pool.state).queue.len() as u64));
            }
        };
        held.owner = Some(asker.owner.clone());
        Ok(held)
    }

    pub(super) fn end_job(&self, id: &str, owner: Option<&Subject>) -> Vec<Arc<str>> {
        let mut ended = Vec::new();
        for pool in self.all() {
            let returned = {
                let mut s = lock(&pool.state);
                let mine = s
                    .jobs
                    .get(id)
                    .is_some_and(|j| owner.is_none_or(|o| *o == j.owner));
                if !mine {
                    continue;
                }
                let Some(job) = s.jobs.remove(id) else {
                    continue;
                };
                s.give_back(&job.plan);
                ended.push(s.spec.name.clone());
                pool.dispatch(&mut s)
            };
            drop(returned);
        }
        ended
    }

    pub(super) fn sweep(&self) {
        for pool in self.all() {
            let returned = {
                let mut s = lock(&pool.state);
                pool.expire(&mut s);
                pool.dispatch(&mut s)
            };
            drop(returned);
        }
    }

    pub(super) fn usage(&self) -> Vec<PoolUsage> {
        let mut out: Vec<PoolUsage> = self
            .all()
            .iter()
            .map(|pool| {
                let s = lock(&pool.state);
                PoolUsage {
                    name: s.spec.name.clone(),
                    max: s.spec.max,
                    in_use: u64::from(s.in_use),
                    jobs: s.jobs.len() as u64,
                    // Every plan of the config, 0 for those that never waited.
                    waiting: s
                        .spec
                        .plans
                        .iter()
                        .map(|p| {
                            let i = s.plans.iter().position(|x| x == p);
                            (p.clone(), i.map_or(0, |i| s.queue.waiting(i) as u64))
                        })
                        .collect(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// A request in a pool's queue: dropped (the client left, the wait ran
/// out), it leaves the queue.
struct Waiting<'a> {
    pool: &'a Arc<Pool>,
    ticket: Option<Ticket>,
}

impl Waiting<'_> {
    /// Leaves the queue; whether it was still in it.
    fn leave(&mut self) -> bool {
        let Some(ticket) = self.ticket.take() else {
            return false;
        };
        let removed = lock(&self.pool.state).queue.remove(ticket);
        removed.is_some()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests;
