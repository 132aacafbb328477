//! The Prometheus metrics also pushed over OTLP/gRPC (`[telemetry]
//! metrics = true`), with the same names and labels: every
//! `export_interval` the registry is encoded once and sent as cumulative
//! sums, gauges and explicit-bucket histograms. A background task does it;
//! a collector that is down costs a failed call, never a request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as pm;

/// One metric family as the registry encodes it.
pub type Family = pm::MetricFamily;

/// Where and how often.
#[derive(Debug, Clone)]
pub struct Target {
    /// The collector's OTLP/gRPC endpoint.
    pub endpoint: String,
    /// `service.name`.
    pub service_name: String,
    /// Time between pushes.
    pub every: Duration,
}

/// Pushes `collect()` to the collector every `target.every`, forever.
pub async fn push_forever(target: Target, collect: impl Fn() -> Vec<Family> + Send + 'static) {
    let started = unix_nanos();
    let channel = match tonic::transport::Endpoint::from_shared(target.endpoint.clone()) {
        Ok(e) => e.timeout(Duration::from_secs(5)).connect_lazy(),
        Err(e) => {
            tracing::error!(error = %e, "OTLP metrics: bad endpoint");
            return;
        }
    };
    let mut client = MetricsServiceClient::new(channel);
    let mut tick = tokio::time::interval(target.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let request = request(&target.service_name, collect(), started, unix_nanos());
        match client.export(request).await {
            Ok(_) => {
                if failing {
                    tracing::info!("OTLP metrics: the collector answers again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "OTLP metrics: push failed (retried every export_interval)");
                }
                failing = true;
            }
        }
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The OTLP request for `families`, cumulative since `start`.
pub fn request(
    service_name: &str,
    families: Vec<Family>,
    start: u64,
    now: u64,
) -> ExportMetricsServiceRequest {
    let metrics = families
        .into_iter()
        .filter_map(|f| convert(f, start, now))
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![text("service.name", service_name)],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "turnstile".into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn attributes(m: &pm::Metric) -> Vec<KeyValue> {
    m.label.iter().map(|l| text(&l.name, &l.value)).collect()
}

/// One family: counters as monotonic cumulative sums, gauges as gauges,
/// histograms with their bucket bounds (other kinds are not exported).
fn convert(f: Family, start: u64, now: u64) -> Option<Metric> {
    let point = |m: &pm::Metric, v: f64| NumberDataPoint {
        attributes: attributes(m),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsDouble(v)),
        ..Default::default()
    };
    let data = match pm::MetricType::try_from(f.r#type).ok()? {
        pm::MetricType::Counter => metric::Data::Sum(Sum {
            data_points: f
                .metric
                .iter()
                .map(|m| point(m, m.counter.as_ref().map_or(0.0, |c| c.value)))
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
        pm::MetricType::Gauge => metric::Data::Gauge(Gauge {
            data_points: f
                .metric
                .iter()
                .map(|m| point(m, m.gauge.as_ref().map_or(0.0, |g| g.value)))
                .collect(),
        }),
        pm::MetricType::Histogram => metric::Data::Histogram(Histogram {
            data_points: f
                .metric
                .iter()
                .filter_map(|m| histogram(m, start, now))
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        }),
        _ => return None,
    };
    Some(Metric {
        name: f.name.trim_end_matches("_total").to_owned(),
        description: f.help,
        data: Some(data),
        ..Default::default()
    })
}

/// Prometheus buckets are cumulative with inclusive upper bounds; OTLP
/// wants each bucket's own count, and the bounds without `+Inf`.
fn histogram(m: &pm::Metric, start: u64, now: u64) -> Option<HistogramDataPoint> {
    let h = m.histogram.as_ref()?;
    let mut bounds = Vec::new();
    let mut counts = Vec::new();
    let mut below = 0u64;
    for b in &h.bucket {
        if b.upper_bound.is_finite() {
            bounds.push(b.upper_bound);
            counts.push(b.cumulative_count.saturating_sub(below));
            below = b.cumulative_count;
        }
    }
    counts.push(h.sample_count.saturating_sub(below));
    Some(HistogramDataPoint {
        attributes: attributes(m),
        start_time_unix_nano: start,
        time_unix_nano: now,
        count: h.sample_count,
        sum: Some(h.sample_sum),
        bucket_counts: counts,
        explicit_bounds: bounds,
        ..Default::default()
    })
}
