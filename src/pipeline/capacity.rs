//! Step 5, continued: a slot of the route's capacity pool
//! (docs/capacity.md), taken only once the caller's own limits admitted
//! the request. A request refused by the pool consumes nothing: its
//! limits are given back.

use super::{Exchange, Turnstile};
use crate::capacity::{Asker, FairPer, Refused};
use crate::jobs::JobRole;
use crate::respond::{OverCapacity, Refusal};
use crate::store::{Lease, Store, Subject};

impl Turnstile {
    /// Takes a slot of the route's pool into `lease` (waiting for one in
    /// fair order); on a job submission route the slot is a pending job
    /// claim, bound to the job the answer names.
    pub(super) async fn take_capacity(
        &self,
        cx: &mut Exchange<'_>,
        lease: &mut Lease,
    ) -> Result<(), Refusal> {
        let (Some(route), Some(who)) = (cx.route, cx.who.as_ref()) else {
            return Ok(());
        };
        let Some(spec) = route.capacity.and_then(|i| cx.live.policy.capacity.get(i)) else {
            return Ok(());
        };
        let caller = &who.caller;
        let owner = Subject::group(&caller.digest, caller.account.as_ref());
        let asker = Asker {
            plan: who.plan.name.clone(),
            fair: match spec.fair_per {
                FairPer::Key => Subject::key(&caller.digest),
                FairPer::Account => owner.clone(),
            },
            owner,
        };
        let refused = match self.pools.acquire(spec, &asker).await {
            Ok(slot) => {
                if matches!(route.job, JobRole::Submit { .. }) {
                    lease.push_job(slot.into_claim());
                } else {
                    lease.hold(Box::new(slot));
                }
                return Ok(());
            }
            Err(refused) => refused,
        };
        // Nothing consumed: what the caller's limits counted goes back
        // (its own slots go back with `lease`).
        if let Some(d) = cx.decided.take().filter(|d| d.admitted) {
            if let Err(e) = self
                .store
                .refund(&d.checks, d.now, cx.origin.as_ref())
                .await
            {
                tracing::warn!(error = %e, "could not give back a request refused for capacity");
            }
        }
        Err(match refused {
            Refused::Busy(b) => Refusal::OverCapacity(Box::new(OverCapacity {
                name: b.name,
                max: b.max,
                waiting: b.waiting,
                retry_after: b.retry_after,
            })),
            Refused::Store(e) => {
                self.metrics.store_error();
                Refusal::StoreUnavailable(e.to_string())
            }
        })
    }
}
