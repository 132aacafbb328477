//! Step 5: every limit of the caller's plan that covers the route, decided
//! together by the store; and what the exchange then watches its answer
//! for (jobs, docs/configuration.md, "Jobs").

use std::sync::Arc;

use http::request::Parts;
use smallvec::SmallVec;

use super::{Decided, Exchange, Identified, Turnstile};
use crate::config::{AppliedLimit, Plan, Policy, Route};
use crate::inspect::RequestBody;
use crate::jobs;
use crate::limits::Rule;
use crate::responses::{self, Checked, Refusal};
use crate::store::{JobCounter, Lease, LimitCheck, Store, Subject};

impl Turnstile {
    /// Decides the request's limits; admitted: the slots it holds. The
    /// verdicts are kept in `cx` for the rate-limit headers either way.
    pub(super) async fn decide(&self, cx: &mut Exchange<'_>) -> Result<Lease, Refusal> {
        let (Some(route), Some(who)) = (cx.route, cx.who.as_ref()) else {
            return Ok(Lease::default());
        };
        let applied: &[AppliedLimit] = &who.plan.by_route[route.index];
        let checks = limit_checks(who, applied);
        if checks.is_empty() {
            return Ok(Lease::default());
        }
        let d = match self.store.decide(&checks).await {
            Ok(d) => d,
            Err(e) => {
                self.metrics.store_error();
                tracing::error!(error = %e, "counter store failed");
                return Err(Refusal::StoreUnavailable(e.to_string()));
            }
        };
        let checked: Vec<Checked<'_>> = applied
            .iter()
            .zip(d.verdicts)
            .map(|(a, verdict)| Checked {
                spec: &who.plan.limits[a.limit],
                verdict,
            })
            .collect();
        let refusal = (!d.admitted).then(|| {
            match responses::rate_limited(&checked, d.now, &route.name, &who.plan.name) {
                Some(details) => Refusal::RateLimited(Box::new(details)),
                None => Refusal::StoreUnavailable("refused without a refusing limit".into()),
            }
        });
        cx.decided = Some(Decided {
            now: d.now,
            admitted: d.admitted,
            checks,
            checked,
        });
        match refusal {
            Some(refusal) => Err(refusal),
            None => Ok(d.lease),
        }
    }

    /// What this exchange watches its answer for (docs/configuration.md, "Jobs"): the pending
    /// job slots its admission took (out of `lease`), or the job its status
    /// poll or cancel names.
    pub(super) fn job_watcher(
        &self,
        policy: &Policy,
        route: &Route,
        who: &Identified<'_>,
        parts: &Parts,
        body: &RequestBody,
        lease: &mut Lease,
    ) -> Option<jobs::Watcher> {
        if matches!(route.job, jobs::JobRole::None) {
            return None;
        }
        let caller = &who.caller;
        let watch = jobs::watch(
            &route.job,
            &route.matcher.path,
            parts,
            body.parsed(),
            lease.take_jobs(),
            || job_counters(who.plan, &caller.digest, caller.account.as_ref()),
        )?;
        Some(jobs::Watcher {
            watch,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            max: policy.server.mcp_max_body,
            rpc_id: body.rpc_id().cloned(),
        })
    }
}

/// The counters of a request: one per limit of the caller's plan that
/// covers the route.
fn limit_checks<'p>(
    who: &Identified<'p>,
    applied: &'p [crate::config::AppliedLimit],
) -> SmallVec<[LimitCheck<'p>; 4]> {
    let caller = &who.caller;
    applied
        .iter()
        .map(|a| {
            let spec = &who.plan.limits[a.limit];
            LimitCheck {
                subject: Subject::counted(spec.per, &caller.digest, caller.account.as_ref()),
                group: Subject::group(&caller.digest, caller.account.as_ref()),
                counter: a.counter,
                rule: &spec.rule,
                queue: spec.queue,
                pinned: caller.registered,
            }
        })
        .collect()
}

/// The jobs counters of `plan` for a caller: every jobs limit, every route
/// it counts (per-route limits have one counter per route), deduplicated.
fn job_counters(
    plan: &Plan,
    digest: &crate::identity::KeyDigest,
    account: Option<&Arc<str>>,
) -> Vec<JobCounter> {
    let mut out: Vec<JobCounter> = Vec::new();
    for applied in plan.by_route.iter().flatten() {
        let spec = &plan.limits[applied.limit];
        if !matches!(spec.rule, Rule::Jobs(_)) || out.iter().any(|c| c.counter == applied.counter) {
            continue;
        }
        out.push(JobCounter {
            subject: Subject::counted(spec.per, digest, account),
            group: Subject::group(digest, account),
            counter: applied.counter,
            rule: spec.rule,
        });
    }
    out
}
