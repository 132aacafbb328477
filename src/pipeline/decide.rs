//! Step 5: every limit of the caller's plan that covers the route, decided
//! together by the store; and what the exchange then watches its answer
//! for (jobs, docs/configuration.md, "Jobs").

use std::sync::Arc;

use opentelemetry::trace::SpanKind;
use smallvec::SmallVec;

use super::{Decided, Exchange, Identified, Turnstile};
use crate::config::{AppliedLimit, Policy, Route};
use crate::jobs;
use crate::jobs::answer;
use crate::limits::Rule;
use crate::pipeline::inspect::RequestBody;
use crate::respond::{self, Checked, Refusal};
use crate::store::{Lease, LimitCheck, Origin, OwnedCheck, Store, StoreError, Subject};

impl Turnstile {
    /// Decides the request's limits; admitted: the slots it holds. The
    /// verdicts are kept in `cx` for the rate-limit headers either way.
    /// [`Turnstile::decide`] inside its own span when the exchange is traced.
    pub(super) async fn decide_traced(&self, cx: &mut Exchange<'_>) -> Result<Lease, Refusal> {
        let span = self.child_span(cx, "turnstile.decide", SpanKind::Internal);
        let decided = self.decide(cx).await;
        drop(span);
        decided
    }

    pub(super) async fn decide(&self, cx: &mut Exchange<'_>) -> Result<Lease, Refusal> {
        let (Some(route), true) = (cx.route, cx.who.is_some()) else {
            return Ok(Lease::default());
        };
        // Also for a route without limits: a status poll ends jobs.
        cx.origin = self.ledger().map(|_| origin(cx, route));
        let Some(who) = cx.who.as_ref() else {
            return Ok(Lease::default());
        };
        let applied: &[AppliedLimit] = &who.plan.by_route[route.index];
        let checks = limit_checks(who, applied, cx.cost);
        if checks.is_empty() {
            return Ok(Lease::default());
        }
        let d = match self.store.decide(&checks, cx.origin.as_ref()).await {
            Ok(d) => d,
            Err(StoreError::Full) => {
                return Err(Refusal::Overloaded(StoreError::Full.to_string()));
            }
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
        for c in checked
            .iter()
            .filter(|c| c.spec.shadow && !c.verdict.admitted)
        {
            self.metrics.shadow_refused(&c.spec.name);
            if !self.refusal_log.admit("shadow", d.now) {
                continue;
            }
            tracing::info!(
                route = &*route.name,
                plan = &*who.plan.name,
                key_fp = who.caller.fingerprint.as_str(),
                limit = &*c.spec.name,
                "shadow limit would refuse (not enforced)"
            );
        }
        let refusal = (!d.admitted).then(|| {
            if let Some(c) = checked
                .iter()
                .find(|c| !c.verdict.admitted && matches!(c.spec.rule, Rule::Credits(_)))
            {
                // Waiting does not help: out of credits comes first.
                return Refusal::InsufficientCredits(Box::new(respond::InsufficientCredits {
                    name: c.spec.name.clone(),
                    balance: i64::from(c.verdict.remaining),
                    cost: cx.cost,
                }));
            }
            match respond::rate_limited(&checked, d.now, &route.name, &who.plan.name) {
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
            None => {
                self.durable(cx, d.written).await?;
                Ok(d.lease)
            }
        }
    }

    /// With `[ledger] durable = "sync"`: waits until the events of the
    /// request's charge are on disk. When they cannot be written in time
    /// the request is refused, and what it counted given back.
    async fn durable(&self, cx: &mut Exchange<'_>, written: u64) -> Result<(), Refusal> {
        let Some(ledger) = self.ledger() else {
            return Ok(());
        };
        let Err(e) = ledger.durable(written).await else {
            return Ok(());
        };
        tracing::error!(error = %e, "a charge could not be written to the ledger");
        if let Some(d) = cx.decided.take() {
            if let Err(e) = self
                .store
                .refund(&d.checks, d.now, cx.origin.as_ref())
                .await
            {
                tracing::warn!(error = %e, "could not give back a request the ledger could not write");
            }
        }
        Err(Refusal::StoreUnavailable(e.to_string()))
    }

    /// What this exchange watches its answer for: the pending job slots
    /// its admission took (out of `lease`) or the job its status poll or
    /// cancel names (docs/configuration.md, "Jobs"), and the cost to settle
    /// ("Cost, credits and refunds").
    pub(super) fn answer_watcher(
        &self,
        cx: &mut Exchange<'_>,
        route: &Route,
        job_id: Option<String>,
        body: &RequestBody,
        lease: &mut Lease,
    ) -> Option<answer::Watcher> {
        if !matches!(route.job, jobs::JobRole::None) {
            // The job it is about, for the access line: a poll's or
            // cancel's from the request, a submission's from its answer.
            let note = crate::observe::access_log::JobNote::default();
            if let Some(id) = job_id.as_ref().filter(|id| !jobs::is_unreadable(id)) {
                let _ = note.set(id.clone());
            }
            cx.job = Some(note);
        }
        let cx = &*cx;
        let who = cx.who.as_ref()?;
        let policy = &cx.live.policy;
        let watch = if matches!(route.job, jobs::JobRole::None) {
            None
        } else {
            let caller = &who.caller;
            let owner = (!policy.capacity.is_empty())
                .then(|| Subject::group(&caller.digest, caller.account.as_ref()));
            let claims = lease.take_jobs();
            jobs::watch(
                &route.job,
                job_id,
                claims,
                || job_counters(policy, &caller.digest, caller.account.as_ref()),
                owner,
            )
        };
        let settle = route.settle.as_ref().and_then(|source| {
            let d = cx.decided.as_ref()?;
            let checks: Vec<OwnedCheck> = d
                .checked
                .iter()
                .zip(&d.checks)
                .filter(|(c, _)| c.spec.counts_cost)
                .map(|(_, check)| OwnedCheck::of(check))
                .collect();
            (!checks.is_empty()).then(|| answer::Settle {
                source: source.clone(),
                estimate: cx.cost,
                credits: checks.iter().any(|c| matches!(c.rule, Rule::Credits(_))),
                checks,
                at: d.now,
                route: route.name.clone(),
            })
        });
        if watch.is_none() && settle.is_none() {
            return None;
        }
        Some(answer::Watcher {
            watch,
            settle,
            store: self.store.clone(),
            pools: self.pools.clone(),
            metrics: self.metrics.clone(),
            max: policy.server.mcp_max_body,
            rpc_id: body.rpc_id().cloned(),
            route: route.name.clone(),
            key_fp: Arc::from(who.caller.fingerprint.as_str()),
            trace: cx.trace.clone(),
            note: cx.job.clone(),
            origin: cx.origin.clone(),
        })
    }
}

/// The exchange as the ledger's events name it.
fn origin(cx: &Exchange<'_>, route: &Route) -> Arc<Origin> {
    Arc::new(Origin {
        request_id: cx.request_id.to_str().unwrap_or_default().into(),
        route: route.name.clone(),
        key_fp: cx
            .who
            .as_ref()
            .map_or("", |w| w.caller.fingerprint.as_str())
            .into(),
    })
}

/// The counters of a request: one per limit of the caller's plan that
/// covers the route, each counting 1 or, where the limit counts cost, `cost`.
fn limit_checks<'p>(
    who: &Identified<'p>,
    applied: &'p [crate::config::AppliedLimit],
    cost: u32,
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
                shadow: spec.shadow,
                units: if spec.counts_cost { cost } else { 1 },
            }
        })
        .collect()
}

/// The jobs counters a caller may hold jobs in: every jobs limit of every
/// plan (a job started under one plan is ended by a poll under another),
/// every route it counts (per-route limits have one counter per route),
/// deduplicated.
fn job_counters(
    policy: &Policy,
    digest: &crate::keys::identity::KeyDigest,
    account: Option<&Arc<str>>,
) -> Vec<OwnedCheck> {
    let mut out: Vec<OwnedCheck> = Vec::new();
    let applied = policy
        .plans
        .iter()
        .flat_map(|plan| plan.by_route.iter().flatten().map(move |a| (plan, a)));
    for (plan, applied) in applied {
        let spec = &plan.limits[applied.limit];
        let subject = Subject::counted(spec.per, digest, account);
        let known = out
            .iter()
            .any(|c| c.counter == applied.counter && c.subject == subject);
        if !matches!(spec.rule, Rule::Jobs(_)) || known {
            continue;
        }
        out.push(OwnedCheck {
            subject,
            group: Subject::group(digest, account),
            counter: applied.counter,
            rule: spec.rule,
            units: 1,
        });
    }
    out
}

/// The names of every limit that can refuse on route `index`, once each.
pub(super) fn limit_names(policy: &Policy, index: usize) -> Vec<Arc<str>> {
    let mut names: Vec<Arc<str>> = Vec::new();
    for plan in &policy.plans {
        let applied = plan.by_route.get(index).into_iter().flatten();
        for spec in applied.filter_map(|a| plan.limits.get(a.limit)) {
            if !names.contains(&spec.name) {
                names.push(spec.name.clone());
            }
        }
    }
    names
}

/// What an exchange's access line says it spent: the cost at admission (on
/// routes with a `cost`) and the credits balance after it.
pub(super) fn spent(cx: &Exchange<'_>) -> (Option<u32>, Option<i64>) {
    let priced = cx.route.is_some_and(|r| r.cost.is_some());
    let cost = (priced && cx.decided.is_some()).then_some(cx.cost);
    let balance = cx.decided.as_ref().and_then(|d| {
        d.checked
            .iter()
            .find(|c| matches!(c.spec.rule, Rule::Credits(_)))
            .map(|c| i64::from(c.verdict.remaining))
    });
    (cost, balance)
}
