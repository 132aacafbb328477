//! What an admitted exchange watches its upstream's answer for: the job
//! it names or ends (`jobs`), and what it says the request cost
//! (`settle`, docs/configuration.md, "Cost, credits and refunds"). Values
//! in headers are read from the head; values in the body are read while it
//! streams ([`crate::content::tap`]), acting before the client sees its end.

use std::sync::Arc;

use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::clock::Nanos;
use crate::content::decode::{Coding, Decoder};
use crate::content::tap::{Doc, Follow, Framing, Reader, Reading, Tap};
use crate::content::values::ValueSource;
use crate::jobs::Watch;
use crate::observe::metrics::Metrics;
use crate::store::{CounterStore, Origin, OwnedCheck};
use crate::wire::body::Body;

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
        (headers, doc): (&HeaderMap, &Doc),
        origin: Option<&Origin>,
    ) {
        let figure = self
            .source
            .from_response(headers, doc)
            .ok()
            .flatten()
            .and_then(|v| crate::content::cost::settled_figure(&v));
        let spent = figure.unwrap_or(self.estimate);
        if self.credits {
            metrics.credits_spent(&self.route, u64::from(spent));
        }
        let delta = i64::from(spent) - i64::from(self.estimate);
        if let Err(e) = store.settle(&self.checks, self.at, delta, origin).await {
            tracing::warn!(error = %e, "could not settle a request's cost: the estimate stands");
        }
    }
}

/// How to read a 2xx answer's body, or (when the body need not or cannot
/// be read) the document to act on at once: nothing to read in the body
/// (`nothing_wanted`), a partial answer, a content type or coding
/// turnstile does not read.
fn how_to_read(
    response: &Response<Body>,
    nothing_wanted: bool,
    max: u64,
) -> Result<(Framing, Option<Decoder>), Doc> {
    if response.status() == StatusCode::PARTIAL_CONTENT {
        return Err(Doc::Unreadable("a partial answer (206)"));
    }
    if nothing_wanted {
        return Err(Doc::Nothing);
    }
    let headers = response.headers();
    let Some(framing) = Framing::of(headers) else {
        return Err(Doc::Unreadable(
            "its content type is not JSON or an event stream",
        ));
    };
    match Coding::of(headers, usize::try_from(max).unwrap_or(usize::MAX)) {
        Coding::Identity => Ok((framing, None)),
        Coding::Known(d) => Ok((framing, Some(d))),
        Coding::Unknown => Err(Doc::Unreadable(
            "a content coding turnstile does not decode",
        )),
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
    /// The capacity pools a job's slot may be held in.
    pub pools: Arc<crate::capacity::Pools>,
    /// For `turnstile_jobs_ended_total` and `turnstile_credits_spent_total`.
    pub metrics: Arc<Metrics>,
    /// At most this much of the answer is read (`[server] mcp_max_body`).
    pub max: u64,
    /// The request's JSON-RPC id, to find the answer in an SSE stream.
    pub rpc_id: Option<Value>,
    /// The route and the caller's key fingerprint, for the line logged
    /// when a submission's answer cannot be read.
    pub route: Arc<str>,
    /// See `route`.
    pub key_fp: Arc<str>,
    /// The exchange's span, when traced: it gets the job's id.
    pub trace: Option<opentelemetry::Context>,
    /// Where the exchange's access line reads the job's id.
    pub note: Option<crate::observe::access_log::JobNote>,
    /// The exchange, for the ledger's events (with a ledger).
    pub origin: Option<Arc<Origin>>,
}

impl Watcher {
    /// Acts on the upstream's answer head, and taps its body when a value
    /// is in it. Anything but a 2xx: pending job slots are given back, no
    /// job ends, an estimate stands (or the exchange is refunded,
    /// `refund_on`). A 2xx that cannot be read — a partial answer, a
    /// content type or coding turnstile does not read — is acted on as
    /// unreadable: a submission keeps its slot.
    pub async fn answer(mut self, response: Response<Body>) -> Response<Body> {
        let status = response.status();
        if !status.is_success() {
            return response;
        }
        let wanted = self.pointers();
        let (framing, decoder) = match how_to_read(&response, wanted.is_empty(), self.max) {
            Ok(found) => found,
            Err(doc) => {
                self.act(response.headers().clone(), doc).await;
                return response;
            }
        };
        let (parts, body) = response.into_parts();
        let reading = Reading {
            framing,
            max: self.max,
            rpc_id: self.rpc_id.take(),
            wanted,
            decoder,
        };
        let headers = parts.headers.clone();
        let reader: Reader =
            Box::new(move |doc: Doc| -> Option<Follow> { Some(self.act(headers, doc)) });
        Response::from_parts(parts, Tap::new(body, reading, reader).boxed())
    }

    /// No answer within the route's timeout: the upstream may be running
    /// the work, so a submission keeps its slot (nothing ends, the
    /// estimate stands).
    pub fn unanswered(self) -> Follow {
        self.act(
            HeaderMap::new(),
            Doc::Unreadable("no answer within the route's timeout"),
        )
    }

    /// The JSON pointers the answer is read at.
    fn pointers(&self) -> Vec<String> {
        let watch = self.watch.as_ref().and_then(Watch::source);
        let settle = self.settle.as_ref().map(|s| &s.source);
        watch
            .into_iter()
            .chain(settle)
            .filter_map(ValueSource::pointer)
            .map(str::to_owned)
            .collect()
    }

    /// Applies a 2xx answer with these headers and document. Boxed: the
    /// store's futures are large, and the exchange's future (copied on
    /// every request, of every route) should not carry them inline.
    fn act(self, headers: HeaderMap, doc: Doc) -> Follow {
        Box::pin(self.act_now(headers, doc))
    }

    async fn act_now(self, headers: HeaderMap, doc: Doc) {
        let headers = &headers;
        if let Some(watch) = self.watch {
            let (job, unreadable) = watch
                .act(
                    (&self.store, &self.pools, &self.metrics),
                    headers,
                    &doc,
                    self.origin.as_deref(),
                )
                .await;
            if let (Some(note), Some(job), None) = (&self.note, &job, unreadable) {
                let _ = note.set(job.clone());
            }
            if let (Some(trace), Some(job)) = (&self.trace, job) {
                let shown = if unreadable.is_some() {
                    String::new()
                } else {
                    job
                };
                crate::observe::trace::annotate(
                    trace,
                    [opentelemetry::KeyValue::new("turnstile.job_id", shown)],
                );
            }
            if let Some(why) = unreadable {
                self.metrics.job_unreadable(&self.route);
                tracing::warn!(
                    route = &*self.route,
                    key_fp = &*self.key_fp,
                    why,
                    "a job submission's answer could not be read: its slot is held until max_duration (or the admin API ends it)"
                );
            }
        }
        if let Some(settle) = self.settle {
            settle
                .act(
                    &self.store,
                    &self.metrics,
                    (headers, &doc),
                    self.origin.as_deref(),
                )
                .await;
        }
    }
}
