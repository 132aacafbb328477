//! `kind = "credits"`: a balance per subject (docs/configuration.md,
//! "Credits"). A subject starts with `grant`; each admitted request takes
//! its cost; a request costing more than the balance is refused; at each
//! `refill` boundary the balance is set back to `grant`.
//!
//! The state holds what was *spent* in the current refill period rather
//! than the balance, so a counter that does not exist is a full grant and a
//! refund or settlement for a period that has ended changes nothing.

use super::{CounterState, LimitKind, Verdict, Window};
use crate::clock::{Nanos, SECOND};

/// When a balance is set back to its grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refill {
    /// Never: only the admin API tops it up.
    Never,
    /// At each boundary of this window (a span aligned to the Unix epoch,
    /// or the calendar month, UTC).
    Every(Window),
}

/// Seconds of the single "period" a never-refilled balance lives in, in
/// the Redis script (about 31,700 years: the period starts at 0 and does
/// not end before the counters do).
const NEVER_SECS: u64 = 1_000_000_000_000;

impl Refill {
    /// Start and end of the refill period containing `now` (`(0, MAX)` without refill).
    pub fn bounds(self, now: Nanos) -> (Nanos, Nanos) {
        match self {
            Refill::Never => (0, Nanos::MAX),
            Refill::Every(w) => w.bounds(now),
        }
    }

    /// The period containing `now` as the state keeps it (its start in seconds).
    fn period(self, now: Nanos) -> u32 {
        u32::try_from(self.bounds(now).0 / SECOND).unwrap_or(u32::MAX)
    }

    /// The next refill after `now`, if there is one.
    pub fn next_after(self, now: Nanos) -> Option<Nanos> {
        match self {
            Refill::Never => None,
            Refill::Every(w) => Some(w.bounds(now).1),
        }
    }
}

/// A credits balance's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    /// The balance a subject starts each refill period with (may be 0:
    /// only top-ups fund it).
    pub grant: u32,
    /// When the balance is set back to `grant`.
    pub refill: Refill,
}

impl Credits {
    /// What was spent in the period containing `now`.
    fn spent_at(&self, state: &CounterState, now: Nanos) -> i64 {
        match *state {
            CounterState::Credits { period, spent } if period == self.refill.period(now) => spent,
            _ => 0,
        }
    }

    /// The balance at `now` (grant minus spent; negative after a settled
    /// cost above the balance).
    pub fn balance(&self, state: &CounterState, now: Nanos) -> i64 {
        i64::from(self.grant) - self.spent_at(state, now)
    }

    /// Sets the balance at `now` to `balance` (admin `set`).
    pub fn set_balance(&self, state: &mut CounterState, now: Nanos, balance: i64) {
        *state = CounterState::Credits {
            period: self.refill.period(now),
            spent: i64::from(self.grant).saturating_sub(balance),
        };
    }

    /// Adds `amount` (may be negative) to the balance at `now` (admin `add`).
    pub fn add(&self, state: &mut CounterState, now: Nanos, amount: i64) {
        let balance = self.balance(state, now).saturating_add(amount);
        self.set_balance(state, now, balance);
    }

    /// The balance of the period the state holds (whichever it is): what
    /// a change to that period's spending moves.
    pub fn held_balance(&self, state: &CounterState) -> i64 {
        match *state {
            CounterState::Credits { spent, .. } => i64::from(self.grant) - spent,
            _ => i64::from(self.grant),
        }
    }

    /// The balance a refill boundary passed since `state` was last changed
    /// left behind (its period's balance, not the grant), when it did: the
    /// next change starts from the grant again.
    pub fn refill_due(&self, state: &CounterState, now: Nanos) -> Option<i64> {
        match *state {
            CounterState::Credits { period, spent }
                if spent != 0 && period != self.refill.period(now) =>
            {
                Some(i64::from(self.grant) - spent)
            }
            _ => None,
        }
    }

    /// The state as the ledger's last entry left it: `balance` against
    /// `grant`, in the refill period containing `at` (a crash's rebuild).
    pub fn restored(&self, balance: i64, grant: i64, at: Nanos) -> CounterState {
        CounterState::Credits {
            period: self.refill.period(at),
            spent: grant.saturating_sub(balance),
        }
    }

    /// The refill period containing `at`, as the ledger numbers it (its
    /// start in seconds; 0 without refill).
    pub fn period_of(&self, at: Nanos) -> u32 {
        self.refill.period(at)
    }

    /// The spending of the period containing `at`, while it is the one held.
    fn spent_of<'a>(&self, state: &'a mut CounterState, at: Nanos) -> Option<&'a mut i64> {
        match state {
            CounterState::Credits { period, spent } if *period == self.refill.period(at) => {
                Some(spent)
            }
            _ => None,
        }
    }
}

use std::sync::Arc;

/// One `alerts` threshold of a credits balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// As written (`"20%"`, `"0"`), shown in `credits.low` events.
    pub text: Arc<str>,
    /// The threshold.
    pub level: Level,
}

/// A threshold: a share of the grant, or credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Hundredths of a percent of the grant.
    Percent(u32),
    /// Credits.
    Units(i64),
}

impl Alert {
    /// The balance at or below which this alert fires, for `grant`.
    pub fn balance(&self, grant: u32) -> i64 {
        match self.level {
            Level::Percent(bp) => i64::from(grant) * i64::from(bp) / 10_000,
            Level::Units(n) => n,
        }
    }
}

/// A balance as a header figure: never below 0, at most `u32::MAX`.
fn shown(n: i64) -> u32 {
    n.clamp(0, i64::from(u32::MAX)) as u32
}

impl LimitKind for Credits {
    const NAME: &'static str = "credits";
    const REDIS_KIND: u8 = 6;
    const QUOTA: bool = false;

    fn new_state(&self) -> CounterState {
        CounterState::Credits {
            period: 0,
            spent: 0,
        }
    }

    fn fits(state: &CounterState) -> bool {
        matches!(state, CounterState::Credits { .. })
    }

    /// `limit`: the grant; `used`: spent (after this request when
    /// admitted); `remaining`: the balance (after, when admitted);
    /// `reset_at`: the next refill (0 without one).
    fn evaluate(&self, state: &mut CounterState, now: Nanos, units: u32) -> Verdict {
        let spent = self.spent_at(state, now);
        let balance = i64::from(self.grant) - spent;
        let admitted = i64::from(units) <= balance;
        let reset_at = self.refill.next_after(now).unwrap_or(0);
        let (spent, balance) = if admitted {
            (spent + i64::from(units), balance - i64::from(units))
        } else {
            (spent, balance)
        };
        Verdict {
            admitted,
            limit: self.grant,
            used: shown(spent),
            remaining: shown(balance),
            reset_at,
            retry_at: if admitted {
                now
            } else {
                self.refill.next_after(now).unwrap_or(Nanos::MAX)
            },
        }
    }

    fn record(&self, state: &mut CounterState, now: Nanos, units: u32) {
        let current = self.refill.period(now);
        if let CounterState::Credits { period, spent } = state {
            if *period != current {
                *period = current;
                *spent = 0;
            }
            *spent = spent.saturating_add(i64::from(units));
        }
    }

    fn unrecord(&self, state: &mut CounterState, at: Nanos, units: u32) {
        if let Some(spent) = self.spent_of(state, at) {
            *spent = spent.saturating_sub(i64::from(units));
        }
    }

    fn charge(&self, state: &mut CounterState, at: Nanos, units: u32) {
        if let Some(spent) = self.spent_of(state, at) {
            *spent = spent.saturating_add(i64::from(units));
        }
    }

    /// A balance other than the grant lasts until the next refill (for
    /// ever without one); a full one can go at once.
    fn expires_at(&self, state: &CounterState) -> Nanos {
        match *state {
            CounterState::Credits { period, spent } if spent != 0 => match self.refill {
                Refill::Never => Nanos::MAX,
                Refill::Every(w) => w.bounds(u64::from(period) * SECOND).1,
            },
            _ => 0,
        }
    }

    fn shown_limit(&self) -> u32 {
        self.grant
    }

    fn summary(&self, name: &str, window_text: &str) -> String {
        match self.refill {
            Refill::Never => format!("{name} balance {}", self.grant),
            Refill::Every(_) => format!("{name} balance {} refill {window_text}", self.grant),
        }
    }

    /// `(grant, refill seconds)`; 0 seconds: the calendar month;
    /// [`NEVER_SECS`]: no refill.
    fn redis_args(&self) -> (u64, u64) {
        let secs = match self.refill {
            Refill::Never => NEVER_SECS,
            Refill::Every(Window::Span(len)) => len / SECOND,
            Refill::Every(Window::Month) => 0,
        };
        (u64::from(self.grant), secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Rule;
    use proptest::prelude::*;

    const S: Nanos = SECOND;
    const T0: Nanos = 1_777_996_800 * S;

    fn rule(grant: u32, refill: Refill) -> (Credits, Rule) {
        let c = Credits { grant, refill };
        (c, Rule::Credits(c))
    }

    #[test]
    fn a_request_costing_more_than_the_balance_is_refused_and_takes_nothing() {
        let (c, r) = rule(10, Refill::Never);
        let mut st = r.new_state();
        let v = r.evaluate(&mut st, T0, 8);
        assert!(v.admitted);
        assert_eq!((v.limit, v.used, v.remaining), (10, 8, 2));
        r.record(&mut st, T0, 8);
        let v = r.evaluate(&mut st, T0, 3);
        assert!(!v.admitted);
        assert_eq!((v.remaining, v.reset_at, v.retry_at), (2, 0, Nanos::MAX));
        assert_eq!(c.balance(&st, T0), 2);
        assert!(r.evaluate(&mut st, T0, 2).admitted);
        assert!(r.evaluate(&mut st, T0, 0).admitted);
    }

    #[test]
    fn the_balance_is_set_back_to_the_grant_at_each_refill() {
        let (c, r) = rule(5, Refill::Every(Window::Span(60 * S)));
        let mut st = r.new_state();
        r.record(&mut st, T0 + 10 * S, 5);
        let v = r.evaluate(&mut st, T0 + 59 * S, 1);
        assert!(!v.admitted);
        assert_eq!(v.retry_at, T0 + 60 * S);
        assert_eq!(v.reset_at, T0 + 60 * S);
        assert_eq!(c.balance(&st, T0 + 60 * S), 5);
        assert!(r.evaluate(&mut st, T0 + 60 * S, 5).admitted);
        // A refund for the period that ended changes nothing.
        r.record(&mut st, T0 + 61 * S, 1);
        r.unrecord(&mut st, T0 + 10 * S, 5);
        assert_eq!(c.balance(&st, T0 + 61 * S), 4);
        assert_eq!(r.expires_at(&st), T0 + 120 * S);
    }

    #[test]
    fn a_settled_cost_above_the_balance_makes_it_negative_and_refusing() {
        let (c, r) = rule(10, Refill::Never);
        let mut st = r.new_state();
        r.record(&mut st, T0, 8);
        r.charge(&mut st, T0, 7);
        assert_eq!(c.balance(&st, T0), -5);
        let v = r.evaluate(&mut st, T0, 0);
        assert!(
            !v.admitted,
            "a negative balance refuses even a free request"
        );
        assert_eq!(v.remaining, 0);
        c.add(&mut st, T0, 100);
        assert_eq!(c.balance(&st, T0), 95);
        c.set_balance(&mut st, T0, 500);
        assert_eq!(c.balance(&st, T0), 500);
        assert!(st.holds());
    }

    #[test]
    fn a_balance_is_as_small_as_any_other_counter() {
        assert_eq!(std::mem::size_of::<CounterState>(), 16);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(u32),
        Settle(u32),
        Refund,
        TopUp(i64),
        Set(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..40).prop_map(Op::Reserve),
            (0u32..60).prop_map(Op::Settle),
            Just(Op::Refund),
            (-20i64..50).prop_map(Op::TopUp),
            (-10i64..200).prop_map(Op::Set),
        ]
    }

    proptest! {
        /// Reserve, settle, refund and top-up in any order: the balance is
        /// the model's arithmetic, and an admission never takes it below 0.
        #[test]
        fn the_balance_follows_the_arithmetic(grant in 0u32..100, ops in proptest::collection::vec(op(), 1..60)) {
            let (c, r) = rule(grant, Refill::Never);
            let mut st = r.new_state();
            let mut model: i64 = i64::from(grant);
            // The last admitted request: its charged cost, not yet refunded.
            let mut last: Option<u32> = None;
            for op in ops {
                match op {
                    Op::Reserve(cost) => {
                        let v = r.evaluate(&mut st, T0, cost);
                        prop_assert_eq!(v.admitted, i64::from(cost) <= model);
                        if v.admitted {
                            r.record(&mut st, T0, cost);
                            model -= i64::from(cost);
                            prop_assert!(model >= 0, "an admission overspent");
                            last = Some(cost);
                        }
                    }
                    Op::Settle(actual) => {
                        if let Some(est) = last {
                            if actual >= est {
                                r.charge(&mut st, T0, actual - est);
                            } else {
                                r.unrecord(&mut st, T0, est - actual);
                            }
                            model += i64::from(est) - i64::from(actual);
                            last = Some(actual);
                        }
                    }
                    Op::Refund => {
                        if let Some(cost) = last.take() {
                            r.unrecord(&mut st, T0, cost);
                            model += i64::from(cost);
                        }
                    }
                    Op::TopUp(n) => {
                        c.add(&mut st, T0, n);
                        model += n;
                    }
                    Op::Set(n) => {
                        c.set_balance(&mut st, T0, n);
                        model = n;
                    }
                }
                prop_assert_eq!(c.balance(&st, T0), model);
            }
        }
    }
}
