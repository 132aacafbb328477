//! The memory store's ledger entries: one per balance change, each with
//! the balance it left, the refill noticed before the change that notices
//! it, and under random traffic the entries always add up to the balance.

use std::sync::{Arc, Mutex};

use super::super::MemoryStore;
use super::super::*;
use crate::clock::{ManualClock, SECOND};
use crate::limits::credits::{Credits, Refill};
use crate::limits::Window;
use crate::store::journal::Entry;
use crate::store::{BalanceChange, OwnedCheck};

/// Keeps (change, amount, balance) of every entry.
#[derive(Default)]
struct Recorder(Mutex<Vec<(Change, i64, Option<i64>)>>);

impl Journal for Recorder {
    fn write(&self, e: Entry<'_>) -> u64 {
        let mut v = self.0.lock().unwrap();
        v.push((e.change, e.amount, e.balance));
        v.len() as u64
    }
}

const HOUR: u64 = 3600 * SECOND;

fn setup() -> (ManualClock, MemoryStore, Arc<Recorder>, Rule) {
    let clock = ManualClock::at_secs(1_800_000_000);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    let rec = Arc::new(Recorder::default());
    store.set_journal(rec.clone());
    let rule = Rule::Credits(Credits {
        grant: 100,
        refill: Refill::Every(Window::Span(HOUR)),
    });
    (clock, store, rec, rule)
}

fn check(rule: &Rule, units: u32) -> LimitCheck<'_> {
    LimitCheck {
        group: Subject::Account("acme".into()),
        subject: Subject::Account("acme".into()),
        counter: 9,
        rule,
        queue: None,
        pinned: false,
        shadow: false,
        units,
    }
}

fn balance(store: &MemoryStore, rule: &Rule) -> i64 {
    store.balance(&OwnedCheck::of(&check(rule, 1)), BalanceChange::Read)
}

#[test]
fn each_change_is_one_entry_with_its_balance() {
    let (clock, store, rec, rule) = setup();
    let d = store.decide_at(&[check(&rule, 10)], clock.now());
    assert!(d.admitted && d.written > 0);
    store.settle(&[OwnedCheck::of(&check(&rule, 10))], d.now, 5, None);
    store.refund_at(&[check(&rule, 10)], d.now, None);
    store.balance(&OwnedCheck::of(&check(&rule, 1)), BalanceChange::Add(7));
    store.balance(&OwnedCheck::of(&check(&rule, 1)), BalanceChange::Set(50));
    assert_eq!(balance(&store, &rule), 50);
    let got = rec.0.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            (Change::Charged, -10, Some(90)),
            (Change::Settled, -5, Some(85)),
            (Change::Refunded, 10, Some(95)),
            (Change::Added, 7, Some(102)),
            (Change::Set, -52, Some(50)),
        ]
    );
}

#[test]
fn a_refill_is_written_before_the_change_that_notices_it() {
    let (clock, store, rec, rule) = setup();
    let first = store.decide_at(&[check(&rule, 30)], clock.now());
    clock.advance(HOUR);
    assert!(store.decide_at(&[check(&rule, 10)], clock.now()).admitted);
    // A settlement of the request of the last period changes nothing now.
    store.settle(&[OwnedCheck::of(&check(&rule, 30))], first.now, 20, None);
    store.refund_at(&[check(&rule, 30)], first.now, None);
    let got = rec.0.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            (Change::Charged, -30, Some(70)),
            (Change::Refilled, 30, Some(100)),
            (Change::Charged, -10, Some(90)),
        ]
    );
    assert_eq!(balance(&store, &rule), 90);
}

#[test]
fn under_random_traffic_the_entries_add_up_to_the_balance() {
    let (clock, store, rec, rule) = setup();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut admitted: Vec<(u64, u32)> = Vec::new();
    for _ in 0..5000 {
        match next(10) {
            0..=4 => {
                let units = next(12) as u32;
                let d = store.decide_at(&[check(&rule, units)], clock.now());
                if d.admitted {
                    admitted.push((d.now, units));
                }
            }
            5 => {
                if let Some((at, units)) = admitted.pop() {
                    store.refund_at(&[check(&rule, units)], at, None);
                }
            }
            6 => {
                if let Some(&(at, units)) = admitted.last() {
                    let delta = next(9) as i64 - 4;
                    store.settle(&[OwnedCheck::of(&check(&rule, units))], at, delta, None);
                }
            }
            7 => {
                let n = next(20) as i64 - 5;
                store.balance(&OwnedCheck::of(&check(&rule, 1)), BalanceChange::Add(n));
            }
            8 => clock.advance(next(HOUR / SECOND / 4) * SECOND),
            _ => {
                let n = next(150) as i64;
                store.balance(&OwnedCheck::of(&check(&rule, 1)), BalanceChange::Set(n));
            }
        }
        // From the last set or refill (or the grant), the amounts add up.
        let got = rec.0.lock().unwrap();
        let start = got
            .iter()
            .rposition(|(c, _, _)| matches!(c, Change::Set | Change::Refilled));
        let (base, rest) = match start {
            Some(i) => (got[i].2.unwrap(), &got[i + 1..]),
            None => (100, &got[..]),
        };
        let sum: i64 = rest.iter().map(|(_, a, _)| a).sum();
        let last = got.last().and_then(|(_, _, b)| *b).unwrap_or(100);
        assert_eq!(base + sum, last, "the chain breaks");
        drop(got);
        // The last entry's balance is the balance (unless a refill is due
        // and not yet noticed: then the next change writes it).
        let due = matches!(rule, Rule::Credits(k) if store.peek(&Subject::Account("acme".into()), 9)
            .is_some_and(|s| k.refill_due(&s, clock.now()).is_some()));
        if !due {
            assert_eq!(last, balance(&store, &rule));
        }
    }
}
