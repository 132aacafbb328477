//! OpenTelemetry traces (`[telemetry] otlp_endpoint`): one span per
//! exchange, a child for the limit decision and one for the upstream
//! exchange; the W3C trace context (`traceparent`, `tracestate`) taken from
//! the client when it sends one and passed to the upstream. Spans are
//! exported over OTLP/gRPC in batches by the SDK's own thread: a request
//! never waits on the collector, and one that is down costs only dropped
//! spans.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

/// `[telemetry]` as validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub otlp_endpoint: String,
    /// Share of new traces recorded (0 to 1); a client's sampled flag is followed.
    pub sample_ratio: f64,
    /// `service.name` of the spans.
    pub service_name: String,
    /// How often batches are sent (spans, and metrics with `metrics`).
    pub export_interval: Duration,
    /// The Prometheus metrics pushed over OTLP too.
    pub metrics: bool,
}

/// The tracer of a running turnstile.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Tracing {
    /// Sets up the exporter (its connection is made on the first batch).
    pub fn start(s: &TelemetrySettings) -> Result<Self, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(s.otlp_endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("OTLP exporter: {e}"))?;
        let batches = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(s.export_interval)
                    .with_max_queue_size(8192)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batches)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                s.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(s.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("turnstile");
        Ok(Self {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// The exchange's span, continuing the client's trace when its headers
    /// carry one.
    pub fn exchange(&self, headers: &HeaderMap) -> Context {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder("turnstile.exchange")
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// A child span of `parent`.
    pub fn child(&self, parent: &Context, name: &'static str, kind: SpanKind) -> Context {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }

    /// Writes `cx` as `traceparent` (and `tracestate`) into `headers`,
    /// replacing what the client sent.
    pub fn inject(&self, cx: &Context, headers: &mut HeaderMap) {
        headers.remove("traceparent");
        headers.remove("tracestate");
        self.propagator.inject_context(cx, &mut HeadersMut(headers));
    }

    /// Sends what is buffered and stops the exporter (blocks: call it off
    /// the runtime's workers).
    pub fn shutdown(&self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }
}

/// Sets attributes on the span of `cx` (nothing when it is not recorded).
pub fn annotate(cx: &Context, attributes: impl IntoIterator<Item = KeyValue>) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attributes(attributes);
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // Two traceparent headers are no trace context at all.
        let mut values = self.0.get_all(key).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
