//! What an admitted exchange watches its upstream's answer for: the job
//! it names or ends (`jobs`), and what it says the request cost
//! (`settle`, docs/configuration.md, "Cost, credits and refunds"). Values
//! in headers are read from the head; values in the body are read while it
//! streams ([`crate::tap`]), acting before the client sees its end.

use std::sync::Arc;

use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::body::Body;
use crate::clock::Nanos;
use crate::jobs::Watch;
use crate::metrics::Metrics;
use crate::store::{CounterStore, OwnedCheck};
use crate::tap::{Follow, Framing, Reader, Tap};
use crate::values::ValueSource;

/// A reserved cost to settle from the answer (`settle`).
#[derive(Debug)]
pub struct Settle {
    /// Where the answer says what the request cost.
    pub source: ValueSource,
    /// What was deducted at admission.
    pub estimate: u32,
    /// The cost-counting checks it was deducted from.
    pub checks: Vec<OwnedCheck>,
    /// When the request was admitted.
    pub at: Nanos,
    /// Route name, for `turnstile_credits_spent_total`.
    pub route: Arc<str>,
    /// Whether a credits balance is among `checks`.
    pub credits: bool,
}

impl Settle {
    /// The upstream's figure replaces the estimate: the difference charged
    /// or given back; no figure, the estimate stands.
    async fn act(
        self,
        store: &CounterStore,
        metrics: &Metrics,
        headers: &HeaderMap,
        doc: Option<&Value>,
    ) {
        let figure = self
            .source
            .from_response(headers, doc)
            .and_then(|v| crate::cost::settled_figure(&v));
        let spent = figure.unwrap_or(self.estimate);
        if self.credits {
            metrics.credits_spent(&self.route, u64::from(spent));
        }
        let delta = i64::from(spent) - i64::from(self.estimate);
        if let Err(e) = store.settle(&self.checks, self.at, delta).await {
            tracing::warn!(error = %e, "could not settle a request's cost: the estimate stands");
        }
    }
}

/// Everything the answer's handling needs, owned: it may outlive the
/// request (a client gone before the answer).
pub struct Watcher {
    /// The job to watch for.
    pub watch: Option<Watch>,
    /// The cost to settle.
    pub settle: Option<Settle>,
    /// Where jobs and costs are counted.
    pub store: CounterStore,
    /// For `turnstile_jobs_ended_total` and `turnstile_credits_spent_total`.
    pub metrics: Arc<Metrics>,
    /// At most this much of the answer is read (`[server] mcp_max_body`).
    pub max: u64,
    /// The request's JSON-RPC id, to find the answer in an SSE stream.
    pub rpc_id: Option<Value>,
}

impl Watcher {
    /// Acts on the upstream's answer head, and taps its body when a value
    /// is in it. Anything but a 2xx: pending job slots are given back, no
    /// job ends, an estimate stands (or the exchange is refunded, `refund_on`).
    pub async fn answer(mut self, response: Response<Body>) -> Response<Body> {
        if !response.status().is_success() {
            return response;
        }
        let in_body = self
            .watch
            .as_ref()
            .and_then(Watch::source)
            .is_some_and(ValueSource::needs_json)
            || self.settle.as_ref().is_some_and(|s| s.source.needs_json());
        let framing = Framing::of(response.headers());
        let Some(framing) = framing.filter(|_| in_body) else {
            let headers = response.headers().clone();
            self.act(&headers, None).await;
            return response;
        };
        let (parts, body) = response.into_parts();
        let max = self.max;
        let rpc_id = self.rpc_id.take();
        let headers = parts.headers.clone();
        let reader: Reader = Box::new(move |doc: Option<Value>| -> Option<Follow> {
            Some(Box::pin(async move {
                self.act(&headers, doc.as_ref()).await;
            }))
        });
        Response::from_parts(parts, Tap::new(body, framing, max, rpc_id, reader).boxed())
    }

    /// Applies a 2xx answer with these headers and JSON document.
    async fn act(self, headers: &HeaderMap, doc: Option<&Value>) {
        if let Some(watch) = self.watch {
            watch.act(&self.store, &self.metrics, headers, doc).await;
        }
        if let Some(settle) = self.settle {
            settle.act(&self.store, &self.metrics, headers, doc).await;
        }
    }
}
