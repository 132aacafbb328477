//! While Redis is unreachable with `on_error = "local"`: decisions made by the
//! per-instance memory store, remembered, and added to Redis once it answers.
//! And whatever the mode: a settlement, a refund or a job ending Redis could
//! not take is kept, in order, and applied once it answers — the upstream's
//! figure, not the estimate, is what Redis ends up with.

use std::sync::atomic::Ordering;

use crate::clock::Nanos;
use crate::limits::Rule;
use crate::store::journal::{How, Origin};
use crate::store::{
    BindJob, Decision, JobClaim, Lease, LimitCheck, OnError, OwnedCheck, Store, StoreError,
    Verdicts,
};

/// Most changes kept for a Redis that does not answer (then dropped, logged).
const MAX_REPLAYS: usize = 100_000;

/// A change Redis could not take, to apply when it answers again.
pub(super) enum Replay {
    /// `CounterStore::settle`.
    Settle {
        checks: Vec<OwnedCheck>,
        at: Nanos,
        delta: i64,
        origin: Option<Origin>,
    },
    /// `Store::refund`.
    Refund {
        checks: Vec<OwnedCheck>,
        at: Nanos,
        origin: Option<Origin>,
    },
    /// `CounterStore::end_job`.
    EndJob {
        counters: Vec<OwnedCheck>,
        id: String,
        how: How,
        origin: Option<Origin>,
    },
    /// A job the local fallback started: held in Redis for what is left of
    /// its `max_duration`.
    StartJob {
        key: String,
        /// (`Subject::label`, `Subject::text`, counter id).
        subject: (String, String, u64),
        id: String,
        max_duration_ms: u64,
        started: std::time::Instant,
    },
}

/// A job submission the local fallback admitted: bound locally, and
/// started in Redis too once it answers (so its slot counts there).
struct LocalJob {
    claim: JobClaim,
    store: RedisStore,
    key: String,
    subject: (String, String, u64),
    max_duration_ms: u64,
}

impl BindJob for LocalJob {
    fn bind(
        self: Box<Self>,
        id: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + '_>>
    {
        Box::pin(async move {
            let LocalJob {
                claim,
                store,
                key,
                subject,
                max_duration_ms,
            } = *self;
            claim.bind(id).await?;
            store.replay_later(Replay::StartJob {
                key,
                subject,
                id: id.to_owned(),
                max_duration_ms,
                started: std::time::Instant::now(),
            });
            Ok(())
        })
    }
}

use super::{RedisStore, Unsynced};

impl RedisStore {
    pub(super) async fn fall_back(
        &self,
        checks: &[LimitCheck<'_>],
        error: StoreError,
    ) -> Result<Decision, StoreError> {
        match self.inner.settings.on_error {
            OnError::Local => {
                let mut decision = self.inner.fallback.decide(checks, None).await?;
                if decision.admitted {
                    self.remember_unsynced(checks, decision.now);
                    self.start_jobs_later(checks, &mut decision.lease);
                }
                Ok(decision)
            }
            OnError::Allow => Ok(Decision {
                now: self.inner.clock.now(),
                admitted: true,
                verdicts: Verdicts::new(),
                lease: Lease::default(),
                written: 0,
            }),
            OnError::Deny => Err(error),
        }
    }

    /// Wraps the job claims of a local admission so that the jobs they
    /// become are started in Redis too, later.
    fn start_jobs_later(&self, checks: &[LimitCheck<'_>], lease: &mut Lease) {
        let claims = lease.take_jobs();
        if claims.is_empty() {
            return;
        }
        let jobs = checks.iter().filter_map(|c| match c.rule {
            Rule::Jobs(j) => Some((
                self.inner.key(c),
                (c.subject.label(), c.subject.text(), c.counter),
                j.max_duration / 1_000_000,
            )),
            _ => None,
        });
        let wrapped: Vec<JobClaim> = claims
            .into_iter()
            .zip(jobs)
            .map(|(claim, (key, subject, max_duration_ms))| {
                JobClaim::other(Box::new(LocalJob {
                    claim,
                    store: self.clone(),
                    key,
                    subject,
                    max_duration_ms,
                }))
            })
            .collect();
        *lease = std::mem::take(lease).with_jobs(wrapped);
    }

    /// Keeps a change Redis could not take, for the next reconciliation.
    pub(super) fn replay_later(&self, replay: Replay) {
        let inner = &self.inner;
        let mut replays = inner.replays.lock().unwrap_or_else(|p| p.into_inner());
        if replays.len() >= MAX_REPLAYS {
            tracing::error!("redis has been unreachable for {MAX_REPLAYS} settlements, refunds and job endings: this one is dropped");
            return;
        }
        replays.push(replay);
        inner.has_unsynced.store(true, Ordering::Release);
    }

    /// Applies the kept changes in order; those that fail again are kept.
    async fn replay_kept(&self) -> usize {
        let inner = &self.inner;
        let kept: Vec<Replay> =
            std::mem::take(&mut *inner.replays.lock().unwrap_or_else(|p| p.into_inner()));
        let mut applied = 0;
        let mut failed = Vec::new();
        for r in kept {
            let done = match &r {
                Replay::Settle {
                    checks,
                    at,
                    delta,
                    origin,
                } => self.settle_now(checks, *at, *delta, origin.as_ref()).await,
                Replay::Refund { checks, at, origin } => {
                    let checks: Vec<LimitCheck<'_>> =
                        checks.iter().map(OwnedCheck::check).collect();
                    self.refund_now(&checks, *at, origin.as_ref()).await
                }
                Replay::EndJob {
                    counters,
                    id,
                    how,
                    origin,
                } => self
                    .end_job_now(counters, id, *how, origin.as_ref())
                    .await
                    .map(|_| ()),
                Replay::StartJob {
                    key,
                    subject,
                    id,
                    max_duration_ms,
                    started,
                } => {
                    let gone = started.elapsed().as_millis() as u64;
                    let left = max_duration_ms.saturating_sub(gone);
                    if left == 0 {
                        Ok(())
                    } else {
                        self.start_job_now(key, subject, id, left).await
                    }
                }
            };
            match done {
                Ok(()) => applied += 1,
                Err(_) => failed.push(r),
            }
        }
        if !failed.is_empty() {
            let mut replays = inner.replays.lock().unwrap_or_else(|p| p.into_inner());
            failed.append(&mut replays);
            *replays = failed;
            inner.has_unsynced.store(true, Ordering::Release);
        }
        applied
    }

    /// Notes a request the local fallback admitted, to add to Redis later.
    pub(super) fn remember_unsynced(&self, checks: &[LimitCheck<'_>], now: Nanos) {
        let inner = &self.inner;
        let mut unsynced = inner
            .unsynced
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for c in checks
            .iter()
            .filter(|c| !c.rule.holds_slot() && c.units > 0)
        {
            let entry = unsynced.entry(inner.key(c)).or_insert_with(|| Unsynced {
                rule: *c.rule,
                subject: c.subject.clone(),
                counter: c.counter,
                count: 0,
                at_us: 0,
            });
            entry.count += u64::from(c.units);
            entry.at_us = entry.at_us.max(now / 1_000);
        }
        inner.has_unsynced.store(true, Ordering::Release);
    }

    /// Once Redis answers again, adds what the fallback admitted meanwhile
    /// (in the background; one reconciliation at a time). Entries that could
    /// not be sent are kept for the next try.
    pub(super) fn reconcile_soon(&self) {
        let inner = &self.inner;
        if !inner.has_unsynced.load(Ordering::Acquire)
            || inner.reconciling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            let inner = &store.inner;
            let pending: Vec<(String, Unsynced)> = {
                let mut unsynced = inner
                    .unsynced
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                inner.has_unsynced.store(false, Ordering::Release);
                unsynced.drain().collect()
            };
            let mut added = 0;
            let mut failed = Vec::new();
            let now_us = inner.clock.now() / 1_000;
            for (key, u) in pending {
                let mut inv = inner.reconcile.prepare_invoke();
                let (kind, a, b) = u.rule.redis_args();
                inv.key(&key)
                    .arg(kind)
                    .arg(a)
                    .arg(b)
                    .arg(u.count)
                    .arg(now_us.saturating_sub(u.at_us));
                let check = (&u.subject, u.counter, &u.rule);
                inner.ledger_args(&mut inv, None, std::iter::once(check));
                match inner.call::<i64>(inv).await {
                    Ok(_) => added += u.count,
                    Err(_) => failed.push((key, u)),
                }
            }
            if !failed.is_empty() {
                let mut unsynced = inner
                    .unsynced
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                for (key, u) in failed {
                    let e = unsynced.entry(key).or_insert_with(|| Unsynced {
                        count: 0,
                        ..u.clone()
                    });
                    e.count += u.count;
                    e.at_us = e.at_us.max(u.at_us);
                }
                inner.has_unsynced.store(true, Ordering::Release);
            }
            let replayed = store.replay_kept().await;
            tracing::info!(
                added,
                replayed,
                "redis is back: counts taken by the local fallback added to redis, settlements, refunds and job endings it missed applied"
            );
            inner.reconciling.store(false, Ordering::Release);
        });
    }
}
