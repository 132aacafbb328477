//! The job step of the pipeline (docs/configuration.md, "Jobs"): what a route's answer means for
//! the jobs in progress. A submission's answer names a job (its pending
//! slot becomes the job's), a status answer in a done state or a cancel
//! answer ends one. The counting itself is the `jobs` limit kind
//! (`limits/jobs.rs`) in the stores; this module reads the ids.

use std::sync::Arc;

use http::request::Parts;
use http::Response;
use http_body_util::BodyExt;
use serde_json::Value;

use crate::body::Body;
use crate::metrics::Metrics;
use crate::routing::PathPattern;
use crate::store::{CounterStore, JobClaim, JobCounter};
use crate::tap::{Follow, Framing, Reader, Tap};
use crate::values::ValueSource;

/// What a route does for job accounting (`job`, `job_status`, `job_cancel`).
#[derive(Debug, Clone, Default)]
pub enum JobRole {
    /// Nothing.
    #[default]
    None,
    /// `job = { id }`: a 2xx answer naming an id at `id` starts a job.
    Submit {
        /// Where the answer names the job (`json:` or `header:`).
        id: ValueSource,
    },
    /// `job_status = { id, state, done }`: a 2xx answer whose `state` is in
    /// `done` ends job `id` of the caller.
    Status {
        /// Where the request names the job.
        id: ValueSource,
        /// Where the answer says the job's state.
        state: ValueSource,
        /// The states in which a job has ended.
        done: Vec<String>,
    },
    /// `job_cancel = { id }`: a 2xx answer ends job `id` of the caller.
    Cancel {
        /// Where the request names the job.
        id: ValueSource,
    },
}

impl JobRole {
    /// Whether reading the request's id needs its JSON body.
    pub fn needs_request_json(&self) -> bool {
        match self {
            JobRole::Status { id, .. } | JobRole::Cancel { id } => id.needs_json(),
            _ => false,
        }
    }
}

/// How a job ended, for `turnstile_jobs_ended_total{how}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A status answer in a done state.
    Done,
    /// A cancel answer.
    Cancelled,
    /// `max_duration` passed.
    Expired,
    /// The admin API.
    Admin,
}

impl Ended {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Ended::Done => "done",
            Ended::Cancelled => "cancelled",
            Ended::Expired => "expired",
            Ended::Admin => "admin",
        }
    }
}

/// What an exchange watches its answer for.
pub enum Watch {
    /// A submission holding pending job slots.
    Submit {
        /// Where the answer names the job.
        id: ValueSource,
        /// The pending slots (one per jobs limit covering the route).
        claims: Vec<JobClaim>,
    },
    /// A status poll or a cancel for job `id` of the caller.
    End {
        /// The job.
        id: String,
        /// `Some((state, done))` for a status poll; `None` for a cancel.
        state: Option<(ValueSource, Vec<String>)>,
        /// The caller's jobs counters.
        counters: Vec<JobCounter>,
    },
}

/// Everything the answer's handling needs, owned: it may outlive the
/// request (a client gone before the answer).
pub struct Watcher {
    /// What to watch for.
    pub watch: Watch,
    /// Where jobs are counted.
    pub store: CounterStore,
    /// For `turnstile_jobs_ended_total`.
    pub metrics: Arc<Metrics>,
    /// At most this much of the answer is read (`[server] mcp_max_body`).
    pub max: u64,
    /// The request's JSON-RPC id, to find the answer in an SSE stream.
    pub rpc_id: Option<Value>,
}

/// The watch for one request on `role`, if there is anything to watch.
/// `claims`: the pending slots its admission took.
pub fn watch(
    role: &JobRole,
    pattern: &PathPattern,
    parts: &Parts,
    json: Option<&Value>,
    claims: Vec<JobClaim>,
    counters: impl FnOnce() -> Vec<JobCounter>,
) -> Option<Watch> {
    let job_id = |id: &ValueSource| {
        let path = crate::path::match_form(parts.uri.path());
        id.from_request(&parts.headers, &path, parts.uri.query(), pattern, json)
            .map(|v| v.into_owned())
    };
    match role {
        JobRole::None => None,
        JobRole::Submit { id } if !claims.is_empty() => Some(Watch::Submit {
            id: id.clone(),
            claims,
        }),
        JobRole::Submit { .. } => None,
        JobRole::Status { id, state, done } => {
            let id = job_id(id)?;
            let counters = counters();
            (!counters.is_empty()).then(|| Watch::End {
                id,
                state: Some((state.clone(), done.clone())),
                counters,
            })
        }
        JobRole::Cancel { id } => {
            let id = job_id(id)?;
            let counters = counters();
            (!counters.is_empty()).then_some(Watch::End {
                id,
                state: None,
                counters,
            })
        }
    }
}

impl Watcher {
    /// Acts on the upstream's answer head, and taps its body when the value
    /// is in it. Anything but a 2xx: pending slots are given back, no job ends.
    pub async fn answer(mut self, response: Response<Body>) -> Response<Body> {
        if !response.status().is_success() {
            return response;
        }
        let source = match &self.watch {
            Watch::Submit { id, .. } => id,
            Watch::End {
                state: Some((state, _)),
                ..
            } => state,
            Watch::End { state: None, .. } => {
                self.act(None, None).await;
                return response;
            }
        };
        if !source.needs_json() {
            self.act(Some(response.headers()), None).await;
            return response;
        }
        let Some(framing) = Framing::of(response.headers()) else {
            return response;
        };
        let (parts, body) = response.into_parts();
        let max = self.max;
        let rpc_id = self.rpc_id.take();
        // The value is in the document: the answer's headers are not needed.
        let reader: Reader = Box::new(move |doc: Option<Value>| -> Option<Follow> {
            let doc = doc?;
            Some(Box::pin(async move {
                self.act(None, Some(&doc)).await;
            }))
        });
        Response::from_parts(parts, Tap::new(body, framing, max, rpc_id, reader).boxed())
    }

    /// Applies a 2xx answer with these headers and JSON document.
    async fn act(self, headers: Option<&http::HeaderMap>, doc: Option<&Value>) {
        let empty = http::HeaderMap::new();
        let headers = headers.unwrap_or(&empty);
        match self.watch {
            Watch::Submit { id, claims } => {
                let Some(job) = id.from_response(headers, doc) else {
                    return;
                };
                for claim in claims {
                    if let Err(e) = claim.bind(&job).await {
                        tracing::warn!(error = %e, "could not record a job: its slot frees at the lease's end");
                    }
                }
            }
            Watch::End {
                id,
                state,
                counters,
            } => {
                let how = match &state {
                    None => Ended::Cancelled,
                    Some((state, done)) => {
                        let Some(now) = state.from_response(headers, doc) else {
                            return;
                        };
                        if !done.iter().any(|d| *d == *now) {
                            return;
                        }
                        Ended::Done
                    }
                };
                match self.store.end_job(&counters, &id).await {
                    Ok(true) => self.metrics.job_ended(how.label()),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "could not end a job"),
                }
            }
        }
    }
}
