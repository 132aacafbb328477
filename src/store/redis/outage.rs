//! While Redis is unreachable with `on_error = "local"`: decisions made by the
//! per-instance memory store, remembered, and added to Redis once it answers.

use std::sync::atomic::Ordering;

use crate::clock::Nanos;
use crate::store::{Decision, Lease, LimitCheck, OnError, Store, StoreError, Verdicts};

use super::{RedisStore, Unsynced};

impl RedisStore {
    pub(super) async fn fall_back(
        &self,
        checks: &[LimitCheck<'_>],
        error: StoreError,
    ) -> Result<Decision, StoreError> {
        match self.inner.settings.on_error {
            OnError::Local => {
                let decision = self.inner.fallback.decide(checks).await?;
                if decision.admitted {
                    self.remember_unsynced(checks, decision.now);
                }
                Ok(decision)
            }
            OnError::Allow => Ok(Decision {
                now: self.inner.clock.now(),
                admitted: true,
                verdicts: Verdicts::new(),
                lease: Lease::default(),
            }),
            OnError::Deny => Err(error),
        }
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
            let entry = unsynced.entry(inner.key(c)).or_insert(Unsynced {
                rule: c.rule.redis_args(),
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
                inv.key(&key)
                    .arg(u.rule.0)
                    .arg(u.rule.1)
                    .arg(u.rule.2)
                    .arg(u.count)
                    .arg(now_us.saturating_sub(u.at_us));
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
                    let e = unsynced.entry(key).or_insert(Unsynced { count: 0, ..u });
                    e.count += u.count;
                    e.at_us = e.at_us.max(u.at_us);
                }
                inner.has_unsynced.store(true, Ordering::Release);
            }
            tracing::info!(
                added,
                "redis is back: counts taken by the local fallback added to redis"
            );
            inner.reconciling.store(false, Ordering::Release);
        });
    }
}
