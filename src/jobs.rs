//! The job step of the pipeline (docs/configuration.md, "Jobs"): what a route's answer means for
//! the jobs in progress. A submission's answer names a job (its pending
//! slot becomes the job's), a status answer in a done state or a cancel
//! answer ends one. The counting itself is the `jobs` limit kind
//! (`limits/jobs.rs`) in the stores; this module reads the ids.

use http::request::Parts;
use serde_json::Value;

use crate::metrics::Metrics;
use crate::routing::PathPattern;
use crate::store::{CounterStore, JobClaim, OwnedCheck};
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
        counters: Vec<OwnedCheck>,
    },
}

/// The watch for one request on `role`, if there is anything to watch.
/// `claims`: the pending slots its admission took.
pub fn watch(
    role: &JobRole,
    pattern: &PathPattern,
    parts: &Parts,
    json: Option<&Value>,
    claims: Vec<JobClaim>,
    counters: impl FnOnce() -> Vec<OwnedCheck>,
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

impl Watch {
    /// Applies a 2xx answer with these headers and JSON document.
    pub(crate) async fn act(
        self,
        store: &CounterStore,
        metrics: &Metrics,
        headers: &http::HeaderMap,
        doc: Option<&Value>,
    ) {
        match self {
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
                match store.end_job(&counters, &id).await {
                    Ok(true) => metrics.job_ended(how.label()),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "could not end a job"),
                }
            }
        }
    }

    /// Where the answer says what this watch needs.
    pub(crate) fn source(&self) -> Option<&ValueSource> {
        match self {
            Watch::Submit { id, .. } => Some(id),
            Watch::End {
                state: Some((state, _)),
                ..
            } => Some(state),
            Watch::End { state: None, .. } => None,
        }
    }
}
