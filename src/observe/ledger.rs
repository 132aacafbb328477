//! The ledger's metrics: events written by type, commits to disk (each one
//! fsync), and each sink's backlog and deliveries.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::label::Name;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SinkLabels {
    sink: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TypeLabels {
    r#type: &'static str,
}

/// The ledger families, registered with the others.
pub struct LedgerMetrics {
    events: Family<TypeLabels, Counter>,
    commits: Counter,
    write_errors: Counter,
    backlog: Family<SinkLabels, Gauge>,
    delivered: Family<SinkLabels, Counter>,
    failures: Family<SinkLabels, Counter>,
}

impl LedgerMetrics {
    pub(super) fn new(reg: &mut Registry) -> Self {
        let events = Family::<TypeLabels, Counter>::default();
        reg.register(
            "ledger_events",
            "Events written to the ledger, by type",
            events.clone(),
        );
        let commits = Counter::default();
        reg.register(
            "ledger_commits",
            "Ledger commits to disk (one fsync each; many events share one)",
            commits.clone(),
        );
        let write_errors = Counter::default();
        reg.register(
            "ledger_write_errors",
            "Ledger commits that failed (retried; requests waiting for them are refused)",
            write_errors.clone(),
        );
        let backlog = Family::<SinkLabels, Gauge>::default();
        reg.register(
            "ledger_backlog",
            "Events written but not yet acknowledged by a sink, by sink",
            backlog.clone(),
        );
        let delivered = Family::<SinkLabels, Counter>::default();
        reg.register(
            "ledger_delivered",
            "Events a sink acknowledged, by sink",
            delivered.clone(),
        );
        let failures = Family::<SinkLabels, Counter>::default();
        reg.register(
            "ledger_delivery_failures",
            "Deliveries a sink refused or did not answer (retried with backoff), by sink",
            failures.clone(),
        );
        Self {
            events,
            commits,
            write_errors,
            backlog,
            delivered,
            failures,
        }
    }

    /// One event of `kind` written.
    pub fn event(&self, kind: &'static str) {
        self.events
            .get_or_create(&TypeLabels { r#type: kind })
            .inc();
    }

    /// One commit (an fsync) done.
    pub fn commit(&self) {
        self.commits.inc();
    }

    /// Commits done so far.
    pub fn commits(&self) -> u64 {
        self.commits.get()
    }

    /// One commit failed.
    pub fn write_error(&self) {
        self.write_errors.inc();
    }

    /// `sink` is `n` events behind.
    pub fn backlog(&self, sink: &Arc<str>, n: u64) {
        let labels = SinkLabels {
            sink: Name(sink.clone()),
        };
        self.backlog
            .get_or_create(&labels)
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `sink` acknowledged `n` events.
    pub fn delivered(&self, sink: &Arc<str>, n: u64) {
        let labels = SinkLabels {
            sink: Name(sink.clone()),
        };
        self.delivered.get_or_create(&labels).inc_by(n);
    }

    /// A delivery to `sink` failed.
    pub fn failed(&self, sink: &Arc<str>) {
        let labels = SinkLabels {
            sink: Name(sink.clone()),
        };
        self.failures.get_or_create(&labels).inc();
    }
}
