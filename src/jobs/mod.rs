//! The job step of the pipeline (docs/configuration.md, "Jobs"): what a route's answer means for
//! the jobs in progress. A submission's answer names a job (its pending
//! slot becomes the job's), a status answer in a done state or a cancel
//! answer ends one. The counting itself is the `jobs` limit kind
//! (`limits/jobs.rs`) in the stores; this module reads the ids.
//!
//! Also [`answer`]: what an exchange watches its answer for (the job it
//! started or ended, the settled cost), acted on once the answer is read.
//!
//! May import: [`crate::capacity`], [`crate::observe`], [`crate::store`],
//! [`crate::content`], [`crate::limits`], [`crate::wire`], [`crate::clock`].

pub mod answer;

use crate::capacity::Pools;
use crate::content::tap::Doc;
use crate::content::values::ValueSource;
use crate::observe::metrics::Metrics;
use crate::store::{CounterStore, How, JobClaim, Origin, OwnedCheck, Subject};

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
    /// `job_cancel = { id, state?, done? }`: a 2xx answer ends job `id` of
    /// the caller — with `state`, only when the answer's state is in `done`.
    Cancel {
        /// Where the request names the job.
        id: ValueSource,
        /// Where the answer says the job's state, and the states that mean
        /// it was cancelled.
        check: Option<(ValueSource, Vec<String>)>,
    },
}

/// The prefix of the id a job is held under when its submission's answer
/// could not be read: no request can name it (ids read from requests are
/// refused with it), only expiry or the admin API ends it.
pub const UNREADABLE: &str = "\u{1}unreadable:";

/// Whether a held job's id is one made for an unreadable answer.
pub fn is_unreadable(id: &str) -> bool {
    id.starts_with(UNREADABLE)
}

/// A fresh id for a job whose submission's answer could not be read.
pub fn unreadable_id() -> String {
    let mut buf = [0u8; 8];
    // Without randomness, the time still tells submissions apart.
    if getrandom::fill(&mut buf).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        buf = t.to_le_bytes();
    }
    format!("{UNREADABLE}{}", hex::encode(buf))
}

impl JobRole {
    /// Where the request names its job (status polls and cancels).
    pub fn request_id(&self) -> Option<&ValueSource> {
        match self {
            JobRole::Status { id, .. } | JobRole::Cancel { id, .. } => Some(id),
            _ => None,
        }
    }

    /// Whether reading the request's id needs its JSON body.
    pub fn needs_request_json(&self) -> bool {
        self.request_id().is_some_and(ValueSource::needs_json)
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
    /// The admin API (`DELETE /v1/jobs`).
    Admin,
    /// The upstream's own backend, through `POST /v1/jobs/end`.
    Upstream,
}

impl Ended {
    /// As the ledger writes it (`job.ended`'s `how`): the upstream's own
    /// ending is `done`.
    pub fn how(self) -> How {
        match self {
            Ended::Done | Ended::Upstream => How::Done,
            Ended::Cancelled => How::Cancelled,
            Ended::Expired => How::Expired,
            Ended::Admin => How::Admin,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Ended::Done => "done",
            Ended::Cancelled => "cancelled",
            Ended::Expired => "expired",
            Ended::Admin => "admin",
            Ended::Upstream => "upstream",
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
        /// `Some((state, done))`: the answer's state must be listed (a
        /// status poll, a checked cancel); `None`: any 2xx ends it.
        state: Option<(ValueSource, Vec<String>)>,
        /// How the job ends when it does.
        how: Ended,
        /// The caller's jobs counters.
        counters: Vec<OwnedCheck>,
        /// The caller (its group), whose capacity slots held by the job end too.
        owner: Option<Subject>,
    },
}

/// The watch for one request on `role`, if there is anything to watch.
/// `claims`: the pending slots its admission took; `job_id`: the job the
/// request names (read by the caller, which refuses ambiguous values);
/// `owner`: the caller, when capacity pools may hold its jobs.
pub fn watch(
    role: &JobRole,
    job_id: Option<String>,
    claims: Vec<JobClaim>,
    counters: impl FnOnce() -> Vec<OwnedCheck>,
    owner: Option<Subject>,
) -> Option<Watch> {
    let end = |state: Option<(ValueSource, Vec<String>)>, how: Ended| {
        // An id no request can name (see `UNREADABLE`) ends nothing.
        let id = job_id.filter(|id| !is_unreadable(id))?;
        let counters = counters();
        (!counters.is_empty() || owner.is_some()).then_some(Watch::End {
            id,
            state,
            how,
            counters,
            owner,
        })
    };
    match role {
        JobRole::None => None,
        JobRole::Submit { id } if !claims.is_empty() => Some(Watch::Submit {
            id: id.clone(),
            claims,
        }),
        JobRole::Submit { .. } => None,
        JobRole::Status { state, done, .. } => {
            end(Some((state.clone(), done.clone())), Ended::Done)
        }
        JobRole::Cancel { check, .. } => end(check.clone(), Ended::Cancelled),
    }
}

impl Watch {
    /// Applies a 2xx answer with these headers and document, and returns the
    /// job it is about (when there is one). A submission whose answer cannot
    /// be read at its id keeps its slot as a job without a known id; the
    /// reason is returned too, to be counted and logged.
    pub(crate) async fn act(
        self,
        (store, pools, metrics): (&CounterStore, &Pools, &Metrics),
        headers: &http::HeaderMap,
        doc: &Doc,
        origin: Option<&Origin>,
    ) -> (Option<String>, Option<&'static str>) {
        match self {
            Watch::Submit { id, claims } => {
                let (job, unreadable) = match id.from_response(headers, doc) {
                    Ok(Some(job)) => (job, None),
                    // Readable, and no job named: the slots go back.
                    Ok(None) => return (None, None),
                    Err(why) => (unreadable_id(), Some(why.0)),
                };
                for claim in claims {
                    if let Err(e) = claim.bind(&job).await {
                        tracing::warn!(error = %e, "could not record a job: its slot frees at the lease's end");
                    }
                }
                (Some(job), unreadable)
            }
            Watch::End {
                id,
                state,
                how,
                counters,
                owner,
            } => {
                let job = Some(id.to_string());
                if let Some((state, done)) = &state {
                    let Ok(Some(now)) = state.from_response(headers, doc) else {
                        return (job, None);
                    };
                    if !done.contains(&now) {
                        return (job, None);
                    }
                }
                let held = match store.end_job(&counters, &id, how.how(), origin).await {
                    Ok(held) => held,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not end a job");
                        false
                    }
                };
                let pooled = match &owner {
                    Some(owner) => match pools.end_job(&id, Some(owner)).await {
                        Ok(pools) => !pools.is_empty(),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not end a job's capacity slot");
                            false
                        }
                    },
                    None => false,
                };
                if held || pooled {
                    metrics.job_ended(how.label());
                }
                (job, None)
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
