//! OpenTelemetry traces against a real OTLP/gRPC receiver (the official
//! protobuf messages, served by tonic): one span per exchange with its
//! attributes, children for the decision and the upstream exchange, the
//! client's trace continued and passed to the upstream in `traceparent`;
//! and the Prometheus metrics pushed over OTLP with the same names.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Metric, NumberDataPoint,
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::*;

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, format!("http://{addr}"))
    }

    /// The spans received once `n` have arrived (10 s at most).
    async fn spans(&self, n: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.0.lock().unwrap().clone();
            if spans.len() >= n || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn config(endpoint: &str, ratio: f64) -> String {
    format!(
        r#"
[upstream]
url = "{{upstream}}"

[identity]
keys_file = "keys.toml"

[telemetry]
otlp_endpoint = "{endpoint}"
sample_ratio = {ratio}
export_interval = "100ms"

[[routes]]
name = "gen"
path = "/gen"

[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 1
window = "1m"
"#
    )
}

const KEYS: (&str, &str) = (
    "keys.toml",
    "[[keys]]\nkey = \"sk-secret-key\"\naccount = \"acme\"\nplan = \"free\"\n",
);

fn attr(span: &Span, key: &str) -> Option<String> {
    let kv = span.attributes.iter().find(|kv| kv.key == key)?;
    Some(match kv.value.as_ref()?.value.as_ref()? {
        Any::StringValue(s) => s.clone(),
        Any::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_is_a_span_whose_trace_reaches_the_upstream() {
    let (receiver, endpoint) = Receiver::start().await;
    let up = Upstream::start().await;
    let p = Proxy::start_with(&config(&endpoint, 1.0), &up, &[KEYS]).await;
    let client_trace = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    let got = send(
        req("GET", &p.url("/gen"))
            .header("authorization", "Bearer sk-secret-key")
            .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
            .header("x-request-id", "trace-me")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    // The upstream continues the client's trace, under turnstile's span.
    let sent = up.last().headers;
    let upstream_parent = sent["traceparent"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = upstream_parent.split('-').collect();
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", client_trace, "01"),
        "{upstream_parent}"
    );
    assert_ne!(
        parts[2], client_span,
        "the upstream's parent is turnstile's span"
    );

    let spans = receiver.spans(3).await;
    let exchange = named(&spans, "turnstile.exchange");
    let decide = named(&spans, "turnstile.decide");
    let upstream = named(&spans, "turnstile.upstream");
    assert_eq!(
        (exchange.len(), decide.len(), upstream.len()),
        (1, 1, 1),
        "{spans:?}"
    );
    let (exchange, decide, upstream) = (exchange[0], decide[0], upstream[0]);
    assert_eq!(hex(&exchange.trace_id), client_trace);
    assert_eq!(hex(&exchange.parent_span_id), client_span);
    assert_eq!(exchange.kind, SpanKind::Server as i32);
    assert_eq!(decide.parent_span_id, exchange.span_id);
    assert_eq!(upstream.parent_span_id, exchange.span_id);
    assert_eq!(upstream.kind, SpanKind::Client as i32);
    assert_eq!(
        hex(&upstream.span_id),
        parts[2],
        "the upstream got the upstream span's id"
    );
    for (key, want) in [
        ("turnstile.route", "gen"),
        ("turnstile.plan", "free"),
        ("turnstile.account", "acme"),
        ("turnstile.decision", "forwarded"),
        ("turnstile.request_id", "trace-me"),
        ("turnstile.cost", "1"),
        ("http.response.status_code", "200"),
        ("http.request.method", "GET"),
    ] {
        assert_eq!(
            attr(exchange, key).as_deref(),
            Some(want),
            "{key}: {exchange:?}"
        );
    }
    assert_eq!(attr(exchange, "turnstile.key_fp").map(|f| f.len()), Some(8));
    assert_eq!(
        attr(upstream, "http.response.status_code").as_deref(),
        Some("200")
    );
    // Never the key itself, anywhere.
    assert!(!format!("{spans:?}").contains("sk-secret-key"));

    // A refusal: its span names the limit; there is no upstream span.
    let refused = call("GET", &p.url("/gen"), Some("sk-secret-key")).await;
    assert_eq!(refused.status, 429);
    let spans = receiver.spans(5).await;
    let refused: Vec<&Span> = named(&spans, "turnstile.exchange")
        .into_iter()
        .filter(|s| attr(s, "turnstile.decision").as_deref() == Some("rate_limited"))
        .collect();
    assert_eq!(refused.len(), 1, "{spans:?}");
    assert_eq!(
        attr(refused[0], "turnstile.limit").as_deref(),
        Some("minute")
    );
    assert_eq!(
        attr(refused[0], "http.response.status_code").as_deref(),
        Some("429")
    );
    assert_eq!(named(&spans, "turnstile.upstream").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampling_ratio_and_the_clients_flag_decide_what_is_recorded() {
    let (receiver, endpoint) = Receiver::start().await;
    let up = Upstream::start().await;
    let p = Proxy::start_with(&config(&endpoint, 0.0), &up, &[KEYS]).await;
    // Ratio 0: a new trace is not recorded, but the upstream still gets a
    // trace context (not sampled) ...
    assert_eq!(
        call("GET", &p.url("/gen"), Some("sk-secret-key"))
            .await
            .status,
        200
    );
    let sent = up.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(sent.ends_with("-00"), "{sent}");
    // ... while a client's sampled trace is followed.
    let got = send(
        req("GET", &p.url("/gen"))
            .header("authorization", "Bearer sk-secret-key")
            .header(
                "traceparent",
                "00-11111111111111111111111111111111-2222222222222222-01",
            )
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 429);
    let spans = receiver.spans(2).await;
    assert_eq!(
        spans.len(),
        2,
        "decide and exchange of the sampled one only: {spans:?}"
    );
    assert!(spans
        .iter()
        .all(|s| hex(&s.trace_id) == "11111111111111111111111111111111"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_changes_no_answer() {
    let closed = free_port();
    let up = Upstream::start().await;
    let p = Proxy::start_with(
        &config(&format!("http://127.0.0.1:{closed}"), 1.0),
        &up,
        &[KEYS],
    )
    .await;
    assert_eq!(
        call("GET", &p.url("/gen"), Some("sk-secret-key"))
            .await
            .status,
        200
    );
    assert_eq!(
        call("GET", &p.url("/gen"), Some("sk-secret-key"))
            .await
            .status,
        429
    );
    assert_eq!(up.hits(), 1);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A receiver of OTLP metrics.
#[derive(Clone, Default)]
struct MetricsReceiver(Arc<Mutex<Vec<ExportMetricsServiceRequest>>>);

#[tonic::async_trait]
impl MetricsService for MetricsReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// The metrics of the latest push, by name.
fn latest(pushes: &[ExportMetricsServiceRequest]) -> Vec<Metric> {
    pushes
        .last()
        .map(|r| {
            r.resource_metrics
                .iter()
                .flat_map(|rm| &rm.scope_metrics)
                .flat_map(|sm| sm.metrics.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn number(p: &NumberDataPoint) -> f64 {
    match p.value {
        Some(number_data_point::Value::AsDouble(v)) => v,
        Some(number_data_point::Value::AsInt(v)) => v as f64,
        None => f64::NAN,
    }
}

fn labels(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = attributes
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Any::StringValue(s)) => s.clone(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_metrics_are_pushed_over_otlp_with_the_same_names() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = MetricsReceiver::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let up = Upstream::start().await;
    let config = config(&format!("http://{addr}"), 0.0).replace(
        "export_interval = \"100ms\"",
        "export_interval = \"100ms\"\nmetrics = true",
    );
    let p = Proxy::start_with(&config, &up, &[KEYS]).await;
    assert_eq!(
        call("GET", &p.url("/gen"), Some("sk-secret-key"))
            .await
            .status,
        200
    );
    assert_eq!(
        call("GET", &p.url("/gen"), Some("sk-secret-key"))
            .await
            .status,
        429
    );
    // Wait for a push that saw both requests.
    let deadline = Instant::now() + Duration::from_secs(10);
    let wanted = |metrics: &[Metric]| {
        metrics.iter().any(|m| {
            m.name == "turnstile_rate_limited"
                && matches!(&m.data, Some(metric::Data::Sum(s)) if s.data_points.iter().any(|p| number(p) == 1.0))
        })
    };
    let metrics = loop {
        let metrics = latest(&receiver.0.lock().unwrap());
        if wanted(&metrics) || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let by_name = |name: &str| {
        metrics.iter().find(|m| m.name == name).unwrap_or_else(|| {
            panic!(
                "no {name} in {:?}",
                metrics.iter().map(|m| &m.name).collect::<Vec<_>>()
            )
        })
    };
    // Counters: cumulative monotonic sums with the Prometheus labels.
    let Some(metric::Data::Sum(requests)) = &by_name("turnstile_requests").data else {
        panic!("turnstile_requests is not a sum");
    };
    assert!(requests.is_monotonic);
    assert_eq!(
        requests.aggregation_temporality,
        AggregationTemporality::Cumulative as i32
    );
    let forwarded = requests
        .data_points
        .iter()
        .find(|p| {
            labels(&p.attributes)
                == [
                    ("decision".to_owned(), "forwarded".to_owned()),
                    ("route".to_owned(), "gen".to_owned()),
                ]
        })
        .expect("route gen, forwarded");
    assert_eq!(number(forwarded), 1.0);
    // The histogram: each bucket's own count, bounds without +Inf.
    let Some(metric::Data::Histogram(latency)) =
        &by_name("turnstile_upstream_latency_seconds").data
    else {
        panic!("the latency is not a histogram");
    };
    let point = latency
        .data_points
        .iter()
        .find(|p| labels(&p.attributes) == [("route".to_owned(), "gen".to_owned())])
        .expect("route gen");
    assert_eq!(point.count, 1);
    assert_eq!(point.bucket_counts.len(), point.explicit_bounds.len() + 1);
    assert_eq!(point.bucket_counts.iter().sum::<u64>(), 1);
    // Gauges too, every name a Prometheus family's.
    assert!(matches!(
        by_name("turnstile_in_flight_exchanges").data,
        Some(metric::Data::Gauge(_))
    ));
    assert!(metrics
        .iter()
        .all(|m| m.name.starts_with("turnstile_") && !m.name.ends_with("_total")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submission_span_names_the_job_its_answer_started() {
    let (receiver, endpoint) = Receiver::start().await;
    let up = Upstream::start().await;
    let config = config(&endpoint, 1.0)
        .replace(
            "[[routes]]\nname = \"gen\"",
            "[[routes]]\nname = \"submit\"\nmethod = \"POST\"\npath = \"/gen\"\njob = { id = \"json:/id\" }\n\n[[routes]]\nname = \"gen\"",
        )
        .replace(
            "requests = 1\nwindow = \"1m\"\n",
            "requests = 1\nwindow = \"1m\"\n\n[[plans.free.limits]]\nname = \"jobs\"\nkind = \"jobs\"\nroutes = [\"submit\"]\nmax = 2\n",
        );
    let p = Proxy::start_with(&config, &up, &[KEYS]).await;
    let got = call("POST", &p.url("/gen"), Some("sk-secret-key")).await;
    assert_eq!(got.status, 200);
    let job = got.json()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let span = loop {
        let spans = receiver.spans(1).await;
        let found = named(&spans, "turnstile.exchange")
            .into_iter()
            .find(|s| attr(s, "turnstile.route").as_deref() == Some("submit"))
            .cloned();
        if found.is_some() || Instant::now() > deadline {
            break found.expect("the submission's span");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(attr(&span, "turnstile.job_id"), Some(job), "{span:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_for_another_gateway_is_a_span_of_the_clients_trace() {
    let (receiver, endpoint) = Receiver::start().await;
    let up = Upstream::start().await;
    let config = config(&endpoint, 1.0).replace(
        "[telemetry]",
        "[decision]\nlisten = \"127.0.0.1:0\"\n\n[telemetry]",
    );
    let p = Proxy::start_with(&config, &up, &[KEYS]).await;
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let decide = || {
        req("GET", &format!("http://{}/", p.decision.unwrap()))
            .header("x-forwarded-method", "GET")
            .header("x-forwarded-uri", "/gen")
            .header("x-api-key", "sk-secret-key")
            .header(
                "traceparent",
                format!("00-{client_trace}-00f067aa0ba902b7-01"),
            )
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(send(decide()).await.status, 200);
    assert_eq!(send(decide()).await.status, 429);
    let spans = receiver.spans(4).await;
    let exchanges = named(&spans, "turnstile.exchange");
    assert_eq!(exchanges.len(), 2, "{spans:?}");
    for span in &exchanges {
        assert_eq!(hex(&span.trace_id), client_trace);
        assert_eq!(attr(span, "turnstile.route").as_deref(), Some("gen"));
        assert_eq!(attr(span, "turnstile.account").as_deref(), Some("acme"));
    }
    let decisions: Vec<_> = exchanges
        .iter()
        .map(|s| attr(s, "turnstile.decision"))
        .collect();
    assert!(
        decisions.contains(&Some("rate_limited".into())),
        "{decisions:?}"
    );
    assert_eq!(named(&spans, "turnstile.decide").len(), 2);
    assert!(
        named(&spans, "turnstile.upstream").is_empty(),
        "nothing is forwarded"
    );
    assert_eq!(up.hits(), 0);
}
