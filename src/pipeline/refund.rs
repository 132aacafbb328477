//! What an admitted exchange's ending does to what it was charged: given
//! back (a body that failed, an outcome `refund_on` lists) or counted as
//! spent.

use http::Response;

use super::{Exchange, Turnstile};
use crate::content::cost::RefundReason;
use crate::respond::Refusal;
use crate::store::Store;
use crate::wire::body::Body;

impl Turnstile {
    /// What an admitted exchange consumed, once its outcome is known: all of
    /// it given back when the body failed on its way or when `refund_on`
    /// lists the outcome; otherwise its credits are counted as spent
    /// (where the answer will settle them, by the settlement instead).
    pub(super) async fn account(
        &self,
        cx: &Exchange<'_>,
        outcome: &Result<Response<Body>, Refusal>,
    ) {
        let (Some(route), Some(d)) = (cx.route, cx.decided.as_ref()) else {
            return;
        };
        if !d.admitted {
            return;
        }
        let on = &route.refund_on;
        let (refund, reason) = match outcome {
            Ok(response) => match on.answer(response.status()) {
                Some(reason) => (true, Some(reason)),
                None => (false, None),
            },
            Err(r) if r.is_body_fault() => (true, None),
            Err(Refusal::BadGateway(_)) if on.connect => (true, Some(RefundReason::Connect)),
            Err(Refusal::UpstreamTimeout(_)) if on.timeout => (true, Some(RefundReason::Timeout)),
            Err(_) => (false, None),
        };
        if refund {
            if let Err(e) = self
                .store
                .refund(&d.checks, d.now, cx.origin.as_ref())
                .await
            {
                tracing::warn!(error = %e, "could not refund a request");
            }
            if let Some(reason) = reason {
                self.metrics.refunded(&route.name, &reason.label());
            }
            return;
        }
        let settles_later =
            route.settle.is_some() && matches!(outcome, Ok(r) if r.status().is_success());
        let credits = d
            .checks
            .iter()
            .any(|c| matches!(c.rule, crate::limits::Rule::Credits(_)));
        if credits && !settles_later {
            self.metrics.credits_spent(&route.name, u64::from(cx.cost));
        }
    }
}
