//! Prometheus metrics (`GET /metrics` on the admin listener), all named
//! `turnstile_*`, through the `prometheus-client` crate.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub use super::label::Name;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: Name,
    decision: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabels {
    route: Name,
    limit: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefundLabels {
    route: Name,
    reason: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ShadowLabels {
    limit: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HowLabels {
    how: &'static str,
}

/// Registers `metric` under `name` and returns it (metrics are shared handles).
fn register<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Every metric turnstile exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    refusals: Family<LimitLabels, Counter>,
    upstream_latency: Family<RouteLabels, Histogram>,
    in_flight: Gauge,
    store: StoreMetrics,
    jobs_ended: Family<HowLabels, Counter>,
    credits_spent: Family<RouteLabels, Counter>,
    jobs_unreadable: Family<RouteLabels, Counter>,
    refunds: Family<RefundLabels, Counter>,
    shadow_refusals: Family<ShadowLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
    access_log_dropped: Counter,
    capacity: super::capacity::CapacityMetrics,
    ledger: super::ledger::LedgerMetrics,
    /// Route totals sampled once a second, for the dashboard's rates.
    samples: std::sync::Mutex<std::collections::VecDeque<Sample>>,
    /// The last 15 minutes, for the dashboard's charts.
    history: super::history::History,
}

/// What the counter store reports: set from [`StoreFigures`] at scrape time,
/// or counted as the store answers.
struct StoreMetrics {
    counters: Gauge,
    evicted: Counter,
    queued: Gauge,
    slots: Gauge,
    jobs_in_progress: Gauge,
    snapshots: Family<OutcomeLabels, Counter>,
    store_errors: Counter,
    store_up: Gauge,
}

impl StoreMetrics {
    fn new(reg: &mut Registry) -> Self {
        Self {
            counters: register(reg, "tracked_counters", "Limit counters held in memory", Gauge::default()),
            evicted: register(
                reg,
                "counters_evicted",
                "Counters evicted to stay under [store] max_counters",
                Counter::default(),
            ),
            queued: register(reg, "queued_requests", "Requests waiting for a concurrency slot", Gauge::default()),
            slots: register(reg, "concurrency_slots_in_use", "Concurrency slots taken", Gauge::default()),
            jobs_in_progress: register(
                reg,
                "jobs_in_progress",
                "Jobs in progress (redis: started minus ended as seen by this instance; sum over instances)",
                Gauge::default(),
            ),
            snapshots: register(
                reg,
                "snapshots",
                "Counter snapshots written by outcome (ok, error)",
                Family::default(),
            ),
            store_errors: register(reg, "store_errors", "Decisions the counter store could not make", Counter::default()),
            store_up: register(
                reg,
                "store_up",
                "1 while the counter store answers (redis: circuit closed), else 0",
                Gauge::default(),
            ),
        }
    }
}

/// Route totals as they stood at one moment.
#[derive(Debug, Clone)]
struct Sample {
    at: tokio::time::Instant,
    totals: Vec<RouteTotals>,
}

/// Samples kept: rates are over the last five seconds or so.
const SAMPLES: usize = 6;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Live figures read from the store at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreFigures {
    /// Counters held.
    pub counters: u64,
    /// Requests waiting in concurrency queues.
    pub queued: u64,
    /// Concurrency slots taken.
    pub slots: u64,
    /// Whether the counter store answers.
    pub store_up: bool,
    /// Counters evicted to stay under `[store] max_counters`, since start.
    pub evicted: u64,
    /// Jobs in progress (see `CounterStore::jobs_in_progress`).
    pub jobs_in_progress: i64,
    /// Jobs expired since start.
    pub jobs_expired: u64,
    /// Access log lines dropped (the writer was behind), since start.
    pub access_log_dropped: u64,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("turnstile");
        let reg = &mut r;
        let requests = register(
            reg,
            "requests",
            "Requests by route and decision (forwarded, or the refusal's error code)",
            Family::<RequestLabels, Counter>::default(),
        );
        let refusals = register(
            reg,
            "rate_limited",
            "429 refusals by route and refusing limit",
            Family::<LimitLabels, Counter>::default(),
        );
        let upstream_latency = register(
            reg,
            "upstream_latency_seconds",
            "Time from forwarding a request to the upstream's response headers",
            Family::<RouteLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
        );
        Self {
            requests,
            refusals,
            upstream_latency,
            store: StoreMetrics::new(reg),
            in_flight: register(
                reg,
                "in_flight_exchanges",
                "Exchanges being handled (until the response body is sent)",
                Gauge::default(),
            ),
            jobs_ended: register(
                reg,
                "jobs_ended",
                "Jobs ended, by how (done, cancelled, expired, admin)",
                Family::<HowLabels, Counter>::default(),
            ),
            jobs_unreadable: register(
                reg,
                "jobs_unreadable",
                "Job submissions whose answer could not be read (or did not come in time): each holds its slot as a job without a known id",
                Family::<RouteLabels, Counter>::default(),
            ),
            credits_spent: register(
                reg,
                "credits_spent",
                "Credits taken from balances, by route (settled figures where the answer gives one; refunds excluded)",
                Family::<RouteLabels, Counter>::default(),
            ),
            refunds: register(
                reg,
                "refunds",
                "Exchanges refunded by refund_on, by route and reason (5xx, connect, timeout, or the status)",
                Family::<RefundLabels, Counter>::default(),
            ),
            shadow_refusals: register(
                reg,
                "shadow_refusals",
                "Requests a shadow limit would have refused (they were not refused), by limit",
                Family::<ShadowLabels, Counter>::default(),
            ),
            reloads: register(reg, "reloads", "Config reloads by outcome (ok, error)", Family::default()),
            access_log_dropped: register(
                reg,
                "access_log_dropped",
                "Access log lines dropped because the log writer was behind (requests never wait for it)",
                Counter::default(),
            ),
            capacity: super::capacity::CapacityMetrics::new(reg),
            ledger: super::ledger::LedgerMetrics::new(reg),
            registry: r,
            samples: Default::default(),
            history: Default::default(),
        }
        .with_known_outcomes()
    }

    /// Outcomes known in advance are exported at 0 from the start, so a
    /// dashboard shows 0 rather than no data until the first one.
    fn with_known_outcomes(self) -> Self {
        for outcome in ["ok", "error"] {
            let _ = self.reloads.get_or_create(&OutcomeLabels { outcome });
            let _ = self
                .store
                .snapshots
                .get_or_create(&OutcomeLabels { outcome });
        }
        self
    }

    /// Counts one job ended, by how (`done`, `cancelled`, `admin`; expiries
    /// are read from the store at scrape time).
    pub fn job_ended(&self, how: &'static str) {
        self.jobs_ended.get_or_create(&HowLabels { how }).inc();
    }

    /// Counts one job submission on `route` whose answer could not be read.
    pub fn job_unreadable(&self, route: &Arc<str>) {
        self.jobs_unreadable
            .get_or_create(&RouteLabels {
                route: Name(route.clone()),
            })
            .inc();
    }

    /// Counts `n` credits taken from balances on `route`.
    pub fn credits_spent(&self, route: &Arc<str>, n: u64) {
        self.credits_spent
            .get_or_create(&RouteLabels {
                route: Name(route.clone()),
            })
            .inc_by(n);
    }

    /// Counts one request the shadow limit `limit` would have refused.
    pub fn shadow_refused(&self, limit: &Arc<str>) {
        self.shadow_refusals
            .get_or_create(&ShadowLabels {
                limit: Name(limit.clone()),
            })
            .inc();
    }

    /// Counts one exchange refunded on `route` for `reason`.
    pub fn refunded(&self, route: &Arc<str>, reason: &str) {
        self.refunds
            .get_or_create(&RefundLabels {
                route: Name(route.clone()),
                reason: Name(reason.into()),
            })
            .inc();
    }

    /// Counts one request's outcome: `"forwarded"` or a refusal code.
    pub fn request(&self, route: &Arc<str>, decision: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                route: Name(route.clone()),
                decision,
            })
            .inc();
    }

    /// Counts one 429 by its refusing limit.
    pub fn rate_limited(&self, route: &Arc<str>, limit: &Arc<str>) {
        self.refusals
            .get_or_create(&LimitLabels {
                route: Name(route.clone()),
                limit: Name(limit.clone()),
            })
            .inc();
    }

    /// Records the upstream's time to answer.
    pub fn upstream_latency(&self, route: &Arc<str>, took: Duration) {
        self.upstream_latency
            .get_or_create(&RouteLabels {
                route: Name(route.clone()),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a reload.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&OutcomeLabels {
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Makes `turnstile_jobs_unreadable_total{route}` exist (at 0) for a
    /// job route.
    pub fn job_unreadable_series(&self, route: &Arc<str>) {
        let _ = self.jobs_unreadable.get_or_create(&RouteLabels {
            route: Name(route.clone()),
        });
    }

    /// Counts a snapshot write.
    pub fn snapshot(&self, ok: bool) {
        self.store
            .snapshots
            .get_or_create(&OutcomeLabels {
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Counts a store failure.
    pub fn store_error(&self) {
        self.store.store_errors.inc();
    }

    /// The ledger's series.
    pub fn ledger(&self) -> &super::ledger::LedgerMetrics {
        &self.ledger
    }

    /// The capacity pools' series.
    pub fn capacity(&self) -> &super::capacity::CapacityMetrics {
        &self.capacity
    }

    /// A guard counting one exchange in flight until dropped.
    pub fn exchange(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(self.clone())
    }

    /// The Prometheus text exposition, with store figures read now.
    pub fn render(&self, figures: StoreFigures) -> String {
        self.refresh(figures);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
        out
    }

    /// Every metric family as Prometheus protobuf (for OTLP), with store
    /// figures read now.
    pub fn families(&self, figures: StoreFigures) -> Vec<super::otlp_metrics::Family> {
        self.refresh(figures);
        prometheus_client::encoding::prometheus_protobuf::encode(&self.registry).unwrap_or_default()
    }

    /// Sets the figures read from the store at export time.
    fn refresh(&self, figures: StoreFigures) {
        self.store.counters.set(figures.counters as i64);
        self.store
            .evicted
            .inc_by(figures.evicted.saturating_sub(self.store.evicted.get()));
        self.store.queued.set(figures.queued as i64);
        self.store.slots.set(figures.slots as i64);
        self.store.store_up.set(i64::from(figures.store_up));
        self.store.jobs_in_progress.set(figures.jobs_in_progress);
        let expired = self.jobs_ended.get_or_create(&HowLabels { how: "expired" });
        expired.inc_by(figures.jobs_expired.saturating_sub(expired.get()));
        drop(expired);
        self.access_log_dropped.inc_by(
            figures
                .access_log_dropped
                .saturating_sub(self.access_log_dropped.get()),
        );
    }
}

/// The route label of requests no route matched.
pub const UNMATCHED: &str = "(unmatched)";

pub use super::history::RouteTotals;

impl Metrics {
    /// The totals of each of `routes` (and of unmatched requests), read
    /// from the exported series.
    pub fn route_totals<'a>(
        &self,
        routes: impl IntoIterator<Item = &'a Arc<str>>,
    ) -> Vec<RouteTotals> {
        let decisions =
            || std::iter::once("forwarded").chain(crate::respond::Refusal::CODES.iter().copied());
        let unmatched: Arc<str> = Arc::from(UNMATCHED);
        let mut out = Vec::new();
        let routes = routes
            .into_iter()
            .cloned()
            .chain(std::iter::once(unmatched.clone()));
        for route in routes {
            let route = &route;
            let mut totals = RouteTotals {
                route: route.to_string(),
                ..Default::default()
            };
            for decision in decisions() {
                let labels = RequestLabels {
                    route: Name(route.clone()),
                    decision,
                };
                if let Some(n) = self.requests.get(&labels).map(|c| c.get()) {
                    totals.decisions.insert(decision, n);
                }
            }
            let labels = RouteLabels {
                route: Name(route.clone()),
            };
            totals.credits_spent = self.credits_spent.get(&labels).map_or(0, |c| c.get());
            if !totals.decisions.is_empty() || route != &unmatched {
                out.push(totals);
            }
        }
        out
    }
}

/// One route's requests per second over the last few seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RouteRate {
    /// Forwarded requests per second.
    pub forwarded: f64,
    /// Refused requests (any refusal) per second.
    pub refused: f64,
}

impl Metrics {
    /// Notes the totals of `routes` now (called once a second), for the
    /// rates and, every [`super::history::STEP`] seconds, the charts;
    /// `at` is unix seconds, `jobs` the jobs in progress.
    pub fn sample_routes<'a>(
        &self,
        routes: impl IntoIterator<Item = &'a Arc<str>>,
        at: u64,
        jobs: i64,
    ) {
        let sample = Sample {
            at: tokio::time::Instant::now(),
            totals: self.route_totals(routes),
        };
        self.history.offer(at, jobs, || sample.totals.clone());
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The last 15 minutes, for the dashboard's charts.
    pub fn history(&self) -> &super::history::History {
        &self.history
    }

    /// Each of `now`'s routes' rates since the oldest sample kept (none
    /// before the first sample).
    pub fn route_rates(&self, now: &[RouteTotals]) -> Vec<Option<RouteRate>> {
        let oldest = {
            let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            samples.front().cloned()
        };
        let Some(oldest) = oldest else {
            return vec![None; now.len()];
        };
        let seconds = oldest.at.elapsed().as_secs_f64();
        now.iter()
            .map(|route| {
                let (f1, r1) = route.split();
                let (f0, r0) = oldest
                    .totals
                    .iter()
                    .find(|t| t.route == route.route)
                    .map_or((0, 0), RouteTotals::split);
                (seconds >= 0.5).then(|| RouteRate {
                    forwarded: f1.saturating_sub(f0) as f64 / seconds,
                    refused: r1.saturating_sub(r0) as f64 / seconds,
                })
            })
            .collect()
    }
}

/// The hot per-route series, looked up once per config instead of per request.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    forwarded: Counter,
    rate_limited: Counter,
    latency: Histogram,
    /// The route's per-limit 429 series by limit name (every limit that can
    /// refuse on it), each looked up in the family on its first refusal (a
    /// series appears once it counts, as before) and then held.
    by_limit: Arc<[(Arc<str>, OnceLock<Counter>)]>,
}

impl RouteMetrics {
    /// Counts a forwarded request.
    pub fn forwarded(&self) {
        self.forwarded.inc();
    }

    /// Counts a 429 of `route` refused by `limit`: the route's total and
    /// the same per-limit series as [`Metrics::rate_limited`], without a
    /// family lookup after the first.
    pub fn rate_limited_by(&self, metrics: &Metrics, route: &Arc<str>, limit: &Arc<str>) {
        self.rate_limited.inc();
        let Some((_, held)) = self.by_limit.iter().find(|(name, _)| name == limit) else {
            metrics.rate_limited(route, limit);
            return;
        };
        held.get_or_init(|| {
            metrics
                .refusals
                .get_or_create(&LimitLabels {
                    route: Name(route.clone()),
                    limit: Name(limit.clone()),
                })
                .clone()
        })
        .inc();
    }

    /// Records the upstream's time to answer.
    pub fn upstream_latency(&self, took: Duration) {
        self.latency.observe(took.as_secs_f64());
    }
}

impl Metrics {
    /// The series of one route, whose 429s can name the limits `limits`.
    pub fn route(&self, route: &Arc<str>, limits: &[Arc<str>]) -> RouteMetrics {
        // One statement per lookup: a family's read guard must be gone before
        // the next get_or_create may need its write lock.
        let name = Name(route.clone());
        let forwarded = self
            .requests
            .get_or_create(&RequestLabels {
                route: name.clone(),
                decision: "forwarded",
            })
            .clone();
        let rate_limited = self
            .requests
            .get_or_create(&RequestLabels {
                route: name.clone(),
                decision: "rate_limited",
            })
            .clone();
        let latency = self
            .upstream_latency
            .get_or_create(&RouteLabels { route: name })
            .clone();
        RouteMetrics {
            forwarded,
            rate_limited,
            latency,
            by_limit: limits
                .iter()
                .map(|name| (name.clone(), OnceLock::new()))
                .collect(),
        }
    }
}

/// One exchange in flight; the gauge goes down when this is dropped.
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_limit_series_count_as_the_family_does() {
        let m = Metrics::new();
        let gen: Arc<str> = Arc::from("gen");
        let daily: Arc<str> = Arc::from("daily");
        let other: Arc<str> = Arc::from("other");
        let hot = m.route(&gen, std::slice::from_ref(&daily));
        // No series before the first refusal, as with the family alone.
        assert!(!m
            .render(StoreFigures::default())
            .contains("limit=\"daily\""));
        hot.rate_limited_by(&m, &gen, &Arc::from("daily"));
        hot.rate_limited_by(&m, &gen, &daily);
        // A name the route did not list goes through the family.
        hot.rate_limited_by(&m, &gen, &other);
        m.rate_limited(&gen, &daily);
        let text = m.render(StoreFigures::default());
        assert!(
            text.contains("turnstile_rate_limited_total{route=\"gen\",limit=\"daily\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("turnstile_rate_limited_total{route=\"gen\",limit=\"other\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("turnstile_requests_total{route=\"gen\",decision=\"rate_limited\"} 3"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn route_totals_and_rates_read_the_exported_series() {
        let m = Metrics::new();
        let gen: Arc<str> = Arc::from("gen");
        let hot = m.route(&gen, &[]);
        hot.forwarded();
        m.request(&gen, "unauthorized");
        let routes = [gen.clone()];
        m.sample_routes(&routes, 0, 0);
        for _ in 0..20 {
            hot.forwarded();
            hot.rate_limited_by(&m, &gen, &gen);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let now = m.route_totals(&routes);
        assert_eq!(now[0].decisions["forwarded"], 21);
        assert_eq!(now[0].decisions["rate_limited"], 20);
        assert_eq!(now[0].decisions["unauthorized"], 1);
        // No unmatched requests: no row for them.
        assert_eq!(now.len(), 1);
        let rates = m.route_rates(&now);
        assert_eq!(
            rates,
            vec![Some(RouteRate {
                forwarded: 10.0,
                refused: 10.0
            })]
        );
    }
}
