//! The memory store's entries for the ledger ([`crate::store::journal`]):
//! built only when a ledger is configured, always under the subject's lock.

use std::sync::Arc;

use crate::clock::Nanos;
use crate::limits::{CounterState, Job, Rule, Verdict};
use crate::store::journal::{Change, Entry, Journal, Origin};
use crate::store::{LimitCheck, Subject};

/// One counter's change, for [`Noted::write`].
pub(super) struct Noted<'a> {
    pub(super) subject: &'a Subject,
    pub(super) counter: u64,
    pub(super) grant: u32,
    pub(super) at: Nanos,
    pub(super) origin: Option<&'a Origin>,
}

impl<'a> Noted<'a> {
    pub(super) fn of(c: &'a LimitCheck<'_>, at: Nanos, origin: Option<&'a Arc<Origin>>) -> Self {
        Self {
            subject: &c.subject,
            counter: c.counter,
            grant: match c.rule {
                Rule::Credits(k) => k.grant,
                _ => 0,
            },
            at,
            origin: origin.map(|o| &**o),
        }
    }

    /// Writes one entry; its position.
    pub(super) fn write(
        &self,
        j: &dyn Journal,
        change: Change,
        amount: i64,
        balance: Option<i64>,
        job_id: Option<&str>,
    ) -> u64 {
        j.write(Entry {
            change,
            subject: self.subject,
            counter: self.counter,
            grant: self.grant,
            amount,
            balance,
            job_id,
            at: self.at,
            origin: self.origin,
        })
    }

    /// A credits balance moved from `before` to `after` (its held period's
    /// balances): one entry when it did.
    pub(super) fn moved(&self, j: &dyn Journal, change: Change, before: i64, after: i64) -> u64 {
        if before == after {
            return 0;
        }
        self.write(j, change, after - before, Some(after), None)
    }

    /// The refill a boundary passed since the balance last changed (its
    /// old balance), written before the change that notices it.
    pub(super) fn refilled(&self, j: &dyn Journal, old: Option<i64>, grant: u32) -> u64 {
        let Some(old) = old else {
            return 0;
        };
        let grant = i64::from(grant);
        self.write(j, Change::Refilled, grant - old, Some(grant), None)
    }
}

/// The balance the refill of `state` (a credits counter) left behind, when
/// a boundary passed since it last changed.
pub(super) fn refill_due(rule: &Rule, state: &CounterState, now: Nanos) -> Option<i64> {
    match rule {
        Rule::Credits(k) => k.refill_due(state, now),
        _ => None,
    }
}

/// The balance of the period a credits counter holds (`None` for others).
pub(super) fn held(rule: &Rule, state: &CounterState) -> Option<i64> {
    match rule {
        Rule::Credits(k) => Some(k.held_balance(state)),
        _ => None,
    }
}

/// Entries of a request refused by `verdicts`: each fixed or rolling
/// limit that refused it (the ledger keeps one per subject and window).
pub(super) fn exhausted(
    j: &dyn Journal,
    checks: &[LimitCheck<'_>],
    verdicts: &[Verdict],
    now: Nanos,
    origin: Option<&Arc<Origin>>,
) {
    for (c, v) in checks.iter().zip(verdicts) {
        if v.admitted || c.shadow || !matches!(c.rule, Rule::Fixed(_) | Rule::Rolling(_)) {
            continue;
        }
        let change = Change::QuotaExhausted { until: v.retry_at };
        Noted::of(c, now, origin).write(j, change, 0, None, None);
    }
}

/// Entries of the jobs `expire` dropped from a jobs counter.
pub(super) fn expired(j: &dyn Journal, noted: &Noted<'_>, gone: &[Job]) {
    for job in gone {
        noted.write(
            j,
            Change::JobEnded(crate::store::How::Expired),
            0,
            None,
            Some(&job.id),
        );
    }
}

#[cfg(test)]
mod tests;
