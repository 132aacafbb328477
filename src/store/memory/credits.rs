//! Changes of a credits balance after admission — a refund, a settled
//! cost, an admin change — each under its subject's lock, with its ledger
//! entry when a ledger is configured; and the entries of an admission.

use std::sync::Arc;

use smallvec::SmallVec;

use super::journal::{self, held, Noted};
use super::MemoryStore;
use crate::clock::Nanos;
use crate::limits::{CounterState, Rule};
use crate::store::journal::{Change, Journal, Origin};
use crate::store::{BalanceChange, LimitCheck, OwnedCheck};

impl MemoryStore {
    /// Takes back one request admitted at `at` (see [`Store::refund`]).
    pub fn refund_at(&self, checks: &[LimitCheck<'_>], at: Nanos, origin: Option<&Arc<Origin>>) {
        let now = self.now();
        let journal = self.inner.journal();
        self.inner.with_locked(checks, |guards, owner| {
            for (c, &g) in checks.iter().zip(owner) {
                if let Some(counter) = guards[g].list.iter_mut().find(|x| x.id == c.counter) {
                    let before = held(c.rule, &counter.state);
                    c.rule.unrecord(&mut counter.state, at, c.units);
                    if let (Some(j), Some(before)) = (journal, before) {
                        let after = held(c.rule, &counter.state).unwrap_or(before);
                        Noted::of(c, now, origin).moved(j, Change::Refunded, before, after);
                    }
                }
            }
        });
    }

    /// Charges (`delta` > 0) or gives back (`delta` < 0) units on `checks`
    /// for a request admitted at `at` (see [`CounterStore::settle`](super::CounterStore::settle)).
    pub fn settle(&self, checks: &[OwnedCheck], at: Nanos, delta: i64, origin: Option<&Origin>) {
        let units = u32::try_from(delta.unsigned_abs()).unwrap_or(u32::MAX);
        let checks: SmallVec<[LimitCheck<'_>; 4]> = checks.iter().map(OwnedCheck::check).collect();
        let now = self.now();
        let journal = self.inner.journal();
        self.inner.with_locked(&checks, |guards, owner| {
            for (c, &g) in checks.iter().zip(owner) {
                if let Some(counter) = guards[g].list.iter_mut().find(|x| x.id == c.counter) {
                    let before = held(c.rule, &counter.state);
                    if delta > 0 {
                        c.rule.charge(&mut counter.state, at, units);
                    } else {
                        c.rule.unrecord(&mut counter.state, at, units);
                    }
                    counter.expires_at = c.rule.expires_at(&counter.state);
                    if let (Some(j), Some(before)) = (journal, before) {
                        let after = held(c.rule, &counter.state).unwrap_or(before);
                        let mut noted = Noted::of(c, now, None);
                        noted.origin = origin;
                        noted.moved(j, Change::Settled, before, after);
                    }
                }
            }
        });
    }

    /// Applies `change` to a credits balance under its subject's lock; the
    /// balance after it (0 for a check that is not a credits limit).
    pub fn balance(&self, check: &OwnedCheck, change: BalanceChange) -> i64 {
        let Rule::Credits(credits) = check.rule else {
            return 0;
        };
        let now = self.now();
        let c = check.check();
        self.inner
            .with_locked(std::slice::from_ref(&c), |guards, _| {
                let g = &mut guards[0];
                let i = g.slot(c.counter, c.rule, &self.inner.live);
                let counter = &mut g.list[i];
                if !c.rule.fits(&counter.state) {
                    counter.state = c.rule.new_state();
                }
                let journal = self
                    .inner
                    .journal()
                    .filter(|_| change != BalanceChange::Read);
                let noted = Noted::of(&c, now, None);
                if let Some(j) = journal {
                    noted.refilled(j, credits.refill_due(&counter.state, now), credits.grant);
                }
                let before = credits.balance(&counter.state, now);
                match change {
                    BalanceChange::Add(n) => credits.add(&mut counter.state, now, n),
                    BalanceChange::Set(n) => credits.set_balance(&mut counter.state, now, n),
                    BalanceChange::Read => {}
                }
                counter.expires_at = c.rule.expires_at(&counter.state);
                let after = credits.balance(&counter.state, now);
                if let Some(j) = journal {
                    let kind = match change {
                        BalanceChange::Set(_) => Change::Set,
                        _ => Change::Added,
                    };
                    // A set is written even when it changes nothing: it is
                    // where the sums start again.
                    noted.write(j, kind, after - before, Some(after), None);
                }
                after
            })
    }
}

/// Counts one admitted check with its ledger entries (a refill noticed on
/// the way, the charge); the last entry's position.
pub(super) fn record_noted(
    j: &dyn Journal,
    c: &LimitCheck<'_>,
    state: &mut CounterState,
    now: Nanos,
    origin: Option<&Arc<Origin>>,
) -> u64 {
    let noted = Noted::of(c, now, origin);
    let due = journal::refill_due(c.rule, state, now);
    let refilled = noted.refilled(j, due, c.rule.shown_limit());
    let before = journal::held(c.rule, state).map(|b| match due {
        None => b,
        // Refilled on the way: the charge starts from the grant.
        Some(_) => i64::from(c.rule.shown_limit()),
    });
    c.rule.record(state, now, c.units);
    let charged = match (before, journal::held(c.rule, state)) {
        (Some(before), Some(after)) => noted.moved(j, Change::Charged, before, after),
        _ => 0,
    };
    refilled.max(charged)
}
