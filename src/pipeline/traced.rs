//! The exchange's spans (`[telemetry]`): its own, a child around the limit
//! decision and one around the upstream exchange, and the attributes an
//! operator filters on. Nothing here runs without `[telemetry]`.

use opentelemetry::trace::{SpanKind, TraceContextExt};
use opentelemetry::{Context, KeyValue, StringValue};

use super::{Exchange, Turnstile};
use crate::observe::trace::annotate;

impl Turnstile {
    /// A child span of the exchange's, when the exchange's trace is
    /// recorded (an unrecorded one gets no children: nothing would keep them).
    pub(super) fn child_span(
        &self,
        cx: &Exchange<'_>,
        name: &'static str,
        kind: SpanKind,
    ) -> Option<Context> {
        let tracing = self.tracing.as_ref()?;
        let parent = cx.trace.as_ref()?;
        if !parent.span().span_context().is_sampled() {
            return None;
        }
        Some(tracing.child(parent, name, kind))
    }

    /// Sends the spans still buffered (at shutdown).
    pub async fn flush_traces(self: &std::sync::Arc<Self>) {
        if self.tracing.is_none() {
            return;
        }
        let app = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(tracing) = &app.tracing {
                tracing.shutdown();
            }
        })
        .await;
    }

    /// Writes the trace context into the upstream request: the upstream
    /// span's, or for a trace not recorded the exchange's, so the upstream
    /// continues the client's trace either way.
    pub(super) fn inject(
        &self,
        cx: &Exchange<'_>,
        span: Option<&Context>,
        headers: &mut http::HeaderMap,
    ) {
        let context = span.or(cx.trace.as_ref());
        if let (Some(tracing), Some(context)) = (self.tracing.as_ref(), context) {
            tracing.inject(context, headers);
        }
    }
}

/// What the exchange's span says once it has an answer (never the key:
/// its fingerprint).
pub(super) fn annotate_exchange(
    cx: &Exchange<'_>,
    method: &str,
    status: u16,
    decision: &'static str,
    limit: Option<&str>,
) {
    let Some(trace) = &cx.trace else { return };
    if !trace.span().is_recording() {
        return;
    }
    let mut attributes = vec![
        KeyValue::new("http.request.method", method.to_owned()),
        KeyValue::new("http.response.status_code", i64::from(status)),
        KeyValue::new("turnstile.decision", decision),
        KeyValue::new("turnstile.cost", i64::from(cx.cost)),
    ];
    if let Ok(id) = cx.request_id.to_str() {
        attributes.push(KeyValue::new("turnstile.request_id", id.to_owned()));
    }
    if let Some(route) = cx.route {
        attributes.push(KeyValue::new(
            "turnstile.route",
            StringValue::from(route.name.clone()),
        ));
    }
    if let Some(who) = &cx.who {
        attributes.push(KeyValue::new(
            "turnstile.plan",
            StringValue::from(who.plan.name.clone()),
        ));
        attributes.push(KeyValue::new(
            "turnstile.key_fp",
            who.caller.fingerprint.to_string(),
        ));
        if let Some(account) = &who.caller.account {
            attributes.push(KeyValue::new(
                "turnstile.account",
                StringValue::from(account.clone()),
            ));
        }
    } else if let Some(fp) = &cx.refused_key {
        attributes.push(KeyValue::new("turnstile.key_fp", fp.to_string()));
    }
    if let Some(limit) = limit {
        attributes.push(KeyValue::new("turnstile.limit", limit.to_owned()));
    }
    annotate(trace, attributes);
}
