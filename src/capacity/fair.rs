//! The order in which waiting requests get freed slots: weighted fair
//! queueing across plans, fair queueing across subjects (keys or accounts)
//! within a plan, first come first served within one subject.
//!
//! Plans: each backlogged plan has a virtual finish tag; the plan with the
//! smallest tag is served, and its tag then moves on by `1 / weight`. A
//! plan that starts waiting joins at the current virtual time, so a plan
//! that was idle cannot claim the slots it "missed" (start-time fair
//! queueing, as in deficit round robin and Kubernetes API Priority and
//! Fairness). Over any run in which plans keep waiters, each plan gets
//! slots in proportion to its weight.
//!
//! Subjects within a plan: a waiter's tag is one past the later of the
//! plan's virtual time and its subject's last tag, so a subject that queued
//! twenty has tags 1..20 and one arriving afterwards gets the next tag
//! after the plan's current one: served within a round, not after the twenty.
//!
//! The same algorithm runs in Redis (`lua/capacity.lua`) so every instance
//! shares one order.

use std::collections::{BTreeMap, HashMap};

/// Where one waiter sits, to take it out again (a request that gave up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    plan: usize,
    tag: u64,
    seq: u64,
}

/// One plan's waiters.
#[derive(Debug)]
struct PlanQueue<W> {
    weight: f64,
    /// The plan's next finish tag, while it has waiters.
    finish: f64,
    /// The finish tag it was last served at.
    last: f64,
    /// The tag of the waiter last served (the plan's virtual time).
    served: u64,
    /// Each subject's last tag.
    subjects: HashMap<Box<[u8]>, u64>,
    waiting: BTreeMap<(u64, u64), W>,
}

/// Waiters of type `W` in weighted fair order.
#[derive(Debug)]
pub struct FairQueue<W> {
    plans: Vec<PlanQueue<W>>,
    /// Virtual time across plans: the finish tag last served.
    now: f64,
    seq: u64,
    len: usize,
}

impl<W> Default for FairQueue<W> {
    fn default() -> Self {
        Self {
            plans: Vec::new(),
            now: 0.0,
            seq: 0,
            len: 0,
        }
    }
}

impl<W> FairQueue<W> {
    /// Waiters in the queue.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no one waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Waiters of plan `plan`.
    pub fn waiting(&self, plan: usize) -> usize {
        self.plans.get(plan).map_or(0, |p| p.waiting.len())
    }

    /// Sets plan `plan`'s weight (at least 1).
    pub fn set_weight(&mut self, plan: usize, weight: u32) {
        self.ensure(plan);
        self.plans[plan].weight = f64::from(weight.max(1));
    }

    /// Makes room for plan `plan` (weight 1 until set).
    fn ensure(&mut self, plan: usize) {
        while self.plans.len() <= plan {
            self.plans.push(PlanQueue {
                weight: 1.0,
                finish: 0.0,
                last: 0.0,
                served: 0,
                subjects: HashMap::new(),
                waiting: BTreeMap::new(),
            });
        }
    }

    /// Queues `w` of `subject` under `plan` (whose weight was set).
    pub fn push(&mut self, plan: usize, subject: &[u8], w: W) -> Ticket {
        self.ensure(plan);
        let now = self.now;
        let p = &mut self.plans[plan];
        if p.waiting.is_empty() {
            p.finish = now.max(p.last) + 1.0 / p.weight;
        }
        let last = p.subjects.get(subject).copied().unwrap_or(0);
        let tag = last.max(p.served) + 1;
        p.subjects.insert(subject.into(), tag);
        self.seq += 1;
        p.waiting.insert((tag, self.seq), w);
        self.len += 1;
        Ticket {
            plan,
            tag,
            seq: self.seq,
        }
    }

    /// Takes a waiter out (it gave up); `None` if it was already served.
    pub fn remove(&mut self, t: Ticket) -> Option<W> {
        let w = self
            .plans
            .get_mut(t.plan)?
            .waiting
            .remove(&(t.tag, t.seq))?;
        self.len -= 1;
        Some(w)
    }

    /// The next waiter in fair order among the plans `eligible` accepts,
    /// with its plan.
    pub fn pop(&mut self, eligible: impl Fn(usize) -> bool) -> Option<(usize, W)> {
        let (index, _) = self
            .plans
            .iter()
            .enumerate()
            .filter(|(i, p)| !p.waiting.is_empty() && eligible(*i))
            .min_by(|a, b| a.1.finish.total_cmp(&b.1.finish))?;
        let p = &mut self.plans[index];
        let ((tag, _), w) = p.waiting.pop_first()?;
        self.len -= 1;
        p.served = tag;
        self.now = p.finish;
        p.last = p.finish;
        if p.waiting.is_empty() {
            // Idle subjects no longer matter: a fresh tag starts from `served`.
            p.subjects.clear();
        } else {
            p.finish += 1.0 / p.weight;
            if p.subjects.len() > 2 * p.waiting.len() + 64 {
                let served = p.served;
                p.subjects.retain(|_, last| *last > served);
            }
        }
        Some((index, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shares(weights: &[u32], rounds: usize) -> Vec<usize> {
        let mut q = FairQueue::default();
        for (plan, w) in weights.iter().enumerate() {
            q.set_weight(plan, *w);
            for i in 0..rounds {
                q.push(plan, &[i as u8 % 7], ());
            }
        }
        let mut served = vec![0; weights.len()];
        for _ in 0..rounds {
            let (plan, ()) = q.pop(|_| true).unwrap();
            served[plan] += 1;
        }
        served
    }

    #[test]
    fn plans_share_by_weight() {
        assert_eq!(shares(&[4, 2, 1], 700), vec![400, 200, 100]);
        assert_eq!(shares(&[1, 1], 10), vec![5, 5]);
    }

    #[test]
    fn a_late_subject_is_served_within_a_round() {
        let mut q = FairQueue::default();
        q.set_weight(0, 1);
        for i in 0..20 {
            q.push(0, b"a", ("a", i));
        }
        q.push(0, b"b", ("b", 0));
        q.push(0, b"b", ("b", 1));
        let order: Vec<_> = std::iter::from_fn(|| q.pop(|_| true).map(|(_, w)| w)).collect();
        let at = |w| order.iter().position(|x| *x == w).unwrap();
        assert!(at(("b", 0)) <= 1 && at(("b", 1)) <= 3, "{order:?}");
        // FIFO within one subject.
        let a: Vec<_> = order.iter().filter(|w| w.0 == "a").map(|w| w.1).collect();
        assert_eq!(a, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn an_idle_plan_joins_at_the_current_time() {
        let mut q = FairQueue::default();
        q.set_weight(0, 1);
        q.set_weight(1, 1);
        for _ in 0..50 {
            q.push(0, b"a", 0);
        }
        for _ in 0..40 {
            q.pop(|_| true);
        }
        // Plan 1 arrives late: it alternates with plan 0, no burst of 40.
        for _ in 0..10 {
            q.push(1, b"b", 1);
        }
        let next: Vec<_> = (0..6).map(|_| q.pop(|_| true).unwrap().0).collect();
        assert_eq!(next.iter().filter(|p| **p == 1).count(), 3, "{next:?}");
    }

    #[test]
    fn ineligible_plans_are_skipped_and_removed_waiters_never_served() {
        let mut q = FairQueue::default();
        q.set_weight(0, 8);
        q.set_weight(1, 1);
        let t = q.push(0, b"a", "gone");
        q.push(0, b"a", "a");
        q.push(1, b"b", "b");
        assert_eq!(q.remove(t), Some("gone"));
        assert_eq!(q.remove(t), None);
        assert_eq!(q.pop(|p| p == 1), Some((1, "b")));
        assert_eq!(q.pop(|p| p == 1), None);
        assert_eq!(q.pop(|_| true), Some((0, "a")));
        assert!(q.is_empty());
    }

    proptest! {
        /// Every waiter pushed is popped exactly once, whatever the mix.
        #[test]
        fn nothing_lost(ops in proptest::collection::vec((0usize..3, 0u8..5, any::<bool>()), 1..200)) {
            let mut q = FairQueue::default();
            for p in 0..3 { q.set_weight(p, p as u32 + 1); }
            let mut expected = 0;
            let mut seen = std::collections::HashSet::new();
            for (i, (plan, subject, pop)) in ops.iter().enumerate() {
                q.push(*plan, &[*subject], i);
                expected += 1;
                if *pop {
                    let (_, w) = q.pop(|_| true).unwrap();
                    prop_assert!(seen.insert(w));
                }
            }
            while let Some((_, w)) = q.pop(|_| true) {
                prop_assert!(seen.insert(w));
            }
            prop_assert_eq!(seen.len(), expected);
            prop_assert_eq!(q.len(), 0);
        }
    }
}
