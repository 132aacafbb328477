//! The most refused keys and accounts, for the dashboard: a bounded
//! heavy-hitters count (Space-Saving, Metwally et al. 2005) per kind, so a
//! flood of distinct keys costs a fixed amount of memory.
//!
//! Every item refused more than `1 / CAPACITY` of all refusals is listed;
//! a count may overstate by at most its `error`, the count of the item it
//! displaced.

use std::collections::HashMap;
use std::sync::Mutex;

/// Items kept per kind.
pub const CAPACITY: usize = 64;

/// Refusals by key fingerprint and by account.
#[derive(Debug, Default)]
pub struct TopRefused {
    keys: Mutex<SpaceSaving>,
    accounts: Mutex<SpaceSaving>,
}

/// One listed item: its count and how much of it may belong to others.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Heavy {
    /// A key fingerprint or an account name.
    pub name: String,
    /// Refusals counted (an upper bound).
    pub count: u64,
    /// How much of `count` may have been other items'.
    pub error: u64,
}

impl TopRefused {
    /// Counts one refusal of `key` (a fingerprint) and of its `account`.
    pub fn refused(&self, key: Option<&str>, account: Option<&str>) {
        if let Some(key) = key {
            lock(&self.keys).add(key);
        }
        if let Some(account) = account {
            lock(&self.accounts).add(account);
        }
    }

    /// The `n` most refused keys, most first.
    pub fn keys(&self, n: usize) -> Vec<Heavy> {
        lock(&self.keys).top(n)
    }

    /// The `n` most refused accounts, most first.
    pub fn accounts(&self, n: usize) -> Vec<Heavy> {
        lock(&self.accounts).top(n)
    }
}

fn lock(m: &Mutex<SpaceSaving>) -> std::sync::MutexGuard<'_, SpaceSaving> {
    // A panic while counting leaves counts that are still counts.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Default)]
struct SpaceSaving {
    /// foldhash, seeded per process: the names come from requests, and this
    /// is on the refusal path (SipHash cost 190 instructions per refusal).
    items: HashMap<Box<str>, (u64, u64), foldhash::fast::RandomState>,
}

impl SpaceSaving {
    fn add(&mut self, name: &str) {
        if let Some((count, _)) = self.items.get_mut(name) {
            *count += 1;
            return;
        }
        if self.items.len() < CAPACITY {
            self.items.insert(name.into(), (1, 0));
            return;
        }
        // Displace the least counted; the newcomer inherits its count.
        let least = self
            .items
            .iter()
            .min_by_key(|(_, (count, _))| *count)
            .map(|(name, (count, _))| (name.clone(), *count));
        if let Some((gone, min)) = least {
            self.items.remove(&gone);
            self.items.insert(name.into(), (min + 1, min));
        }
    }

    fn top(&self, n: usize) -> Vec<Heavy> {
        let mut out: Vec<Heavy> = self
            .items
            .iter()
            .map(|(name, &(count, error))| Heavy {
                name: name.to_string(),
                count,
                error,
            })
            .collect();
        out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
        out.truncate(n);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heavy_hitter_stands_out_of_a_flood_of_distinct_keys() {
        let top = TopRefused::default();
        for i in 0..10_000 {
            top.refused(Some(&format!("k{i}")), None);
            if i % 10 == 0 {
                top.refused(Some("heavy"), Some("acme"));
            }
        }
        let keys = top.keys(5);
        assert_eq!(keys[0].name, "heavy");
        // Counted at least as often as it was refused, at most by the error more.
        assert!(keys[0].count - keys[0].error <= 1_000 && keys[0].count >= 1_000);
        assert_eq!(lock(&top.keys).items.len(), CAPACITY);
        assert_eq!(
            top.accounts(5),
            vec![Heavy {
                name: "acme".into(),
                count: 1_000,
                error: 0
            }]
        );
    }

    #[test]
    fn exact_while_there_is_room() {
        let top = TopRefused::default();
        for (name, n) in [("a", 3), ("b", 5), ("c", 1)] {
            for _ in 0..n {
                top.refused(Some(name), None);
            }
        }
        let names: Vec<(String, u64)> =
            top.keys(2).into_iter().map(|h| (h.name, h.count)).collect();
        assert_eq!(names, vec![("b".into(), 5), ("a".into(), 3)]);
    }
}
