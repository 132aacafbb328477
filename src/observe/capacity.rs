//! The metrics of shared capacity pools (`[[capacity]]`): slots in use,
//! requests waiting and how long they waited, by plan, and refusals.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::label::Name;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PoolLabels {
    name: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PoolPlanLabels {
    name: Name,
    plan: Name,
}

/// The capacity families, registered with the others.
pub struct CapacityMetrics {
    in_use: Family<PoolLabels, Gauge>,
    waiting: Family<PoolPlanLabels, Gauge>,
    wait: Family<PoolPlanLabels, Histogram>,
    refused: Family<PoolPlanLabels, Counter>,
    /// Sum of waits and count by pool and plan, for the dashboard's mean.
    waits: std::sync::Mutex<std::collections::HashMap<PoolPlanLabels, (f64, u64)>>,
}

impl CapacityMetrics {
    pub(super) fn new(reg: &mut Registry) -> Self {
        let in_use = Family::<PoolLabels, Gauge>::default();
        reg.register(
            "capacity_in_use",
            "Slots of a capacity pool taken (jobs included), by pool; every instance reports the pool",
            in_use.clone(),
        );
        let waiting = Family::<PoolPlanLabels, Gauge>::default();
        reg.register(
            "capacity_waiting",
            "Requests waiting for a slot of a capacity pool, by pool and plan",
            waiting.clone(),
        );
        let wait = Family::<PoolPlanLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        reg.register(
            "capacity_wait_seconds",
            "Time from asking a capacity pool to getting a slot, by pool and plan",
            wait.clone(),
        );
        let refused = Family::<PoolPlanLabels, Counter>::default();
        reg.register(
            "capacity_refused",
            "Requests refused with 503 over_capacity, by pool and plan",
            refused.clone(),
        );
        Self {
            in_use,
            waiting,
            wait,
            refused,
            waits: Default::default(),
        }
    }
}

fn labels(name: &Arc<str>, plan: &Arc<str>) -> PoolPlanLabels {
    PoolPlanLabels {
        name: Name(name.clone()),
        plan: Name(plan.clone()),
    }
}

impl CapacityMetrics {
    /// Starts a pool's series at 0 for `plans`.
    pub fn series<'a>(&self, name: &Arc<str>, plans: impl Iterator<Item = &'a Arc<str>>) {
        let c = self;
        let _ = c.in_use.get_or_create(&PoolLabels {
            name: Name(name.clone()),
        });
        for plan in plans {
            let _ = c.waiting.get_or_create(&labels(name, plan));
            let _ = c.refused.get_or_create(&labels(name, plan));
        }
    }

    /// A request of `plan` got a slot of pool `name` after `waited`.
    pub fn waited(&self, name: &Arc<str>, plan: &Arc<str>, waited: Duration) {
        let labels = labels(name, plan);
        let secs = waited.as_secs_f64();
        self.wait.get_or_create(&labels).observe(secs);
        let mut waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        let (sum, count) = waits.entry(labels).or_default();
        *sum += secs;
        *count += 1;
    }

    /// A request of `plan` was refused by pool `name`.
    pub fn refusal(&self, name: &Arc<str>, plan: &Arc<str>) {
        self.refused.get_or_create(&labels(name, plan)).inc();
    }

    /// The mean wait for a slot of pool `name` by `plan` so far, in
    /// seconds, and how many waited (the dashboard).
    pub fn mean_wait(&self, name: &Arc<str>, plan: &Arc<str>) -> (f64, u64) {
        let waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        match waits.get(&labels(name, plan)) {
            Some((sum, count)) if *count > 0 => (sum / *count as f64, *count),
            _ => (0.0, 0),
        }
    }

    /// Sets pool `name`'s gauges.
    pub fn gauges(&self, name: &Arc<str>, in_use: u64, waiting: &[(Arc<str>, u64)]) {
        let c = self;
        c.in_use
            .get_or_create(&PoolLabels {
                name: Name(name.clone()),
            })
            .set(in_use as i64);
        for (plan, n) in waiting {
            c.waiting.get_or_create(&labels(name, plan)).set(*n as i64);
        }
    }
}
