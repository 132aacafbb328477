//! Ending a job by its id alone (`POST /v1/jobs/end`): an index from job
//! id to the counters holding it (`lua/job_index.lua`), written when a
//! submission's slot becomes the job's. It has a key of its own (not the
//! account's hash tag: the id alone names it), so it is written by a second
//! call after the job's; if that call fails, the job still ends by its
//! status poll, the admin API by key, or `max_duration`.

use sha2::{Digest, Sha256};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Inner, RedisClaim, RedisLease, RedisStore};
use crate::limits::Rule;
use crate::store::journal::How;
use crate::store::journal::Origin;
use crate::store::StoreError;
use crate::store::{ClaimKind, JobClaim, Lease, LimitCheck};

impl Inner {
    fn index_key(&self, id: &str) -> String {
        let digest = hex::encode(&Sha256::digest(id.as_bytes())[..12]);
        format!("{}job:{digest}", self.settings.prefix)
    }

    /// Records that counter `key` of `subject` holds job `id`.
    pub(super) async fn index_job(
        &self,
        id: &str,
        key: &str,
        subject: &str,
        max_duration_ms: u64,
    ) -> Result<(), StoreError> {
        let mut inv = self.job_index.prepare_invoke();
        inv.key(self.index_key(id))
            .arg("add")
            .arg(format!("{key}\t{subject}"))
            .arg(max_duration_ms);
        self.call::<i64>(inv).await.map(|_| ())
    }
}

impl RedisStore {
    /// Holds job `id` on counter `key` for `left_ms` (a job the local
    /// fallback started while Redis was unreachable).
    pub(super) async fn start_job_now(
        &self,
        key: &str,
        subject: &(String, String, u64),
        id: &str,
        left_ms: u64,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let (label, text, counter) = subject;
        let mut inv = inner.job.prepare_invoke();
        inv.key(key).arg("bind").arg(id).arg("").arg(left_ms);
        inner.job_ledger_args(&mut inv, text, *counter, None);
        inner.call::<i64>(inv).await?;
        inner
            .jobs_gauge
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let holder = format!("{label}\t{text}");
        inner.index_job(id, key, &holder, left_ms).await
    }

    /// Ends job `id` in every counter holding it: (subject label, counter id) of each.
    pub async fn end_job_by_id(
        &self,
        id: &str,
        how: How,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let inner = &self.inner;
        let mut inv = inner.job_index.prepare_invoke();
        inv.key(inner.index_key(id)).arg("take");
        let holders: Vec<String> = inner.call(inv).await?;
        let mut ended = Vec::new();
        for holder in holders {
            // `<key>\t<label>[\t<subject as the ledger writes it>]`
            let mut parts = holder.split('\t');
            let (Some(key), Some(subject)) = (parts.next(), parts.next()) else {
                continue;
            };
            let text = parts.next().unwrap_or_default();
            let counter = key
                .rsplit(':')
                .next()
                .and_then(|c| u64::from_str_radix(c, 16).ok())
                .unwrap_or(0);
            let mut inv = inner.job.prepare_invoke();
            inv.key(key).arg("end").arg(id).arg(how.as_str()).arg("");
            inner.job_ledger_args(&mut inv, text, counter, None);
            if inner.call::<i64>(inv).await? > 0 {
                inner
                    .jobs_gauge
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                ended.push((subject.to_owned(), counter));
            }
        }
        Ok(ended)
    }
}

impl Inner {
    /// What an admitted request holds: the leases of its concurrency
    /// slots, and a claim per jobs limit (bound to the job's id later).
    pub(super) fn held_for(
        self: &Arc<Self>,
        checks: &[LimitCheck<'_>],
        keys: Vec<String>,
        lease_id: &str,
        origin: Option<&Arc<Origin>>,
    ) -> Lease {
        let inner = self;
        let mut lease = Lease::default();
        let slots: Vec<String> = checks
            .iter()
            .zip(&keys)
            .filter(|(c, _)| c.rule.holds_slot() && !matches!(c.rule, Rule::Jobs(_)))
            .map(|(_, k)| k.clone())
            .collect();
        if !slots.is_empty() {
            let handle = inner.seq.fetch_add(1, Ordering::Relaxed);
            inner.held.insert(handle, (lease_id.to_owned(), slots));
            lease = Lease::new(vec![Box::new(RedisLease {
                store: inner.clone(),
                handle,
            })]);
        }
        let mut jobs = Vec::new();
        for (c, key) in checks.iter().zip(keys) {
            let Rule::Jobs(rule) = c.rule else { continue };
            let handle = inner.seq.fetch_add(1, Ordering::Relaxed);
            let member = format!("{lease_id}:j");
            inner
                .held
                .insert(handle, (member.clone(), vec![key.clone()]));
            jobs.push(JobClaim(ClaimKind::Redis(RedisClaim {
                store: inner.clone(),
                handle,
                key,
                member,
                max_duration_ms: rule.max_duration / 1_000_000,
                subject: c.subject.label(),
                subject_text: c.subject.text(),
                counter: c.counter,
                origin: origin.cloned(),
            })));
        }
        lease.with_jobs(jobs)
    }
}
